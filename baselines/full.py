"""The full-data baseline: every training example, every epoch (the hooks' defaults)."""

from benchmarks.api import Method, register


@register("full")
class Full(Method):
    """Train on the whole training set under the protocol."""
