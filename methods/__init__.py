"""Data-efficiency methods, one module each; importing the package registers them."""

from . import forgetting, infobatch, scores  # noqa: F401
