"""Data-efficiency methods, one module each; importing the package registers them."""

from . import infobatch  # noqa: F401
