"""The full-data baseline: every training example, every epoch (the hooks' defaults).

Tuning (a sweep's [tuning] table): ERM's own settings are the protocol's learning rate and weight
decay, drawn log-uniformly from the same ranges as JTT's and Group DRO's (`protocol_space`), so that
the group-robustness comparison tunes the settings they share alike (the JTT paper tunes both for ERM).
"""

from benchmarks.api import Method, Space, register


@register("full")
class Full(Method):
    """Train on the whole training set under the protocol."""

    protocol_space = {"lr": Space.range(1e-3, 1e-1, log=True), "weight_decay": Space.range(1e-4, 1e-1, log=True)}
