"""Baselines every method is compared against; importing the package registers them."""

from . import byol, coreset, full, group_dro, online, uniform  # noqa: F401
