"""Subset arithmetic shared by static-selection methods: sizes, class quotas, seeded sampling."""

from __future__ import annotations

import torch

from benchmarks.api import EpochPlan, Method, Param, Traits

FRACTION = Param(0.5, "share of the training set kept", low=0.0, high=1.0, low_open=True)


def subset_size(n: int, fraction: float) -> int:
    """round(fraction * n), at least 1: the number of examples a static subset keeps."""
    return max(1, min(n, round(fraction * n)))


def class_quotas(labels: torch.Tensor, k: int) -> dict[int, int]:
    """Per-class counts proportional to class sizes that sum to exactly k (largest remainders)."""
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * k / len(labels)
    quota = exact.floor().long()
    remainder = k - int(quota.sum())
    order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[order[:remainder]] += 1
    return {int(c): int(q) for c, q in zip(classes, quota)}


def random_subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:k].sort().values


def class_balanced_random_subset(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k examples, each class represented in proportion to its size, uniform within a class."""
    chosen = []
    for cls, quota in class_quotas(labels, k).items():
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    return torch.cat(chosen).sort().values


class StaticSubset(Method):
    """A method that chooses one subset in `prepare` and trains on it every epoch.

    Subclasses set `self.subset` (sorted original indices) and `self.stats` (for the record's
    method_stats); both are checkpointed, since `prepare` does not run again on resume.
    """

    traits = Traits(headline_params=("fraction",))

    def __init__(self, **params):
        super().__init__(**params)
        self.subset: torch.Tensor | None = None
        self.stats: dict = {}

    def plan_epoch(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.subset)

    def summary(self) -> dict:
        return dict(self.stats)

    def state_dict(self) -> dict:
        return {"subset": self.subset, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.subset, self.stats = state["subset"], dict(state["stats"])
