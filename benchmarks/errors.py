"""Errors the CLI turns into one readable line (no traceback)."""


class BenchError(Exception):
    """Bad input or a missing resource: the message alone tells the user what to fix."""


class NonFiniteLoss(BenchError):
    """The training loss became NaN or infinite; the run stops with a failed record."""
