"""Baselines every method is compared against; importing the package registers them."""

from . import coreset, full, uniform  # noqa: F401
