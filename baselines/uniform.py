"""Uniform random subsets: one static subset for the whole run, or a fresh one every epoch."""

from __future__ import annotations

from benchmarks.api import EpochPlan, Method, Param, Traits, register
from benchmarks.kit.subsets import (
    FRACTION,
    StaticSubset,
    class_balanced_random_subset,
    random_subset,
    subset_size,
)


@register("uniform")
class Uniform(StaticSubset):
    """A static random subset of round(fraction * N) examples, drawn once from the run's seed."""

    params = {"fraction": FRACTION,
              "class_balanced": Param(False, "keep each class's share of the training set")}

    def prepare(self, ctx) -> None:
        labels = ctx.data.train.labels
        k = subset_size(len(labels), self.hparams["fraction"])
        generator = ctx.generator("uniform-subset")
        if self.hparams["class_balanced"]:
            self.subset = class_balanced_random_subset(labels, k, generator)
        else:
            self.subset = random_subset(len(labels), k, generator)


@register("uniform-epoch")
class UniformEpoch(Method):
    """A fresh random subset of round(fraction * N) examples every epoch."""

    params = {"fraction": FRACTION}
    traits = Traits(headline_params=("fraction",))

    def plan_epoch(self, epoch: int) -> EpochPlan:
        n = self.ctx.num_train
        return EpochPlan(random_subset(n, subset_size(n, self.hparams["fraction"]),
                                       self.ctx.generator("uniform-epoch", epoch)))
