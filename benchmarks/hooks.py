"""The contract between the trainer and a data-efficiency method.

A method implements any of the hooks below; the defaults do nothing, so the base class trains
on the full data. Per-example information is always keyed by the ORIGINAL dataset index,
which every batch carries (`Batch.index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from .registry import Param
    from .train import RunContext


@dataclass
class Batch:
    x: torch.Tensor  # float inputs on the device, augmented for training
    y: torch.Tensor  # labels on the device
    index: torch.Tensor  # original dataset indices (on the device)
    weight: torch.Tensor | None = None  # per-example loss weights from the epoch plan


@dataclass
class EpochPlan:
    """The examples one epoch visits, in any order, and optional per-example loss weights.

    The trainer shuffles the plan; an index may appear several times (upsampling).
    With weights, the batch loss is mean(weight * loss) over the batch, so weights with mean 1
    keep the loss scale of unweighted training.
    """

    indices: torch.Tensor  # int64, CPU
    weights: torch.Tensor | None = None  # float32, CPU, aligned with indices
    info: dict | None = None  # numbers the method wants in the curve (e.g. the realised pruned share)


@dataclass
class Selection:
    keep: torch.Tensor  # positions in the candidate batch to train on
    weights: torch.Tensor | None = None


@dataclass
class StepInfo:
    """What `observe` sees after each optimiser step, all aligned with the trained batch."""

    epoch: int
    step: int
    index: torch.Tensor
    loss: torch.Tensor  # per-example loss, detached
    correct: torch.Tensor  # bool, prediction == label (train mode, before the update)
    logits: torch.Tensor  # detached


class Method:
    """Base class: full-data training. Subclasses are registered with @register("name")."""

    name: ClassVar[str] = "base"
    params: ClassVar[dict[str, Param]] = {}
    # Set by a subclass that replaces the per-example loss: callable(model, batch) -> (loss[B], logits[B, C]).
    objective: Any = None
    # Online selection: the trainer draws candidate batches of candidate_multiplier x batch_size for `select`.
    candidate_multiplier: ClassVar[int] = 1
    # Parameters a table always names, even at their defaults (what a reader compares rows by).
    headline_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        self.hparams = params
        self.ctx: RunContext | None = None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Checks that span parameters (each alone is checked by its Param); raise BenchError.

        Called when parameters are resolved, so a sweep with an impossible combination fails when it
        is loaded, not when its job runs.
        """

    def prepare(self, ctx: RunContext) -> None:
        """Work before training (proxy runs, scoring); charge it to ctx.meter as selection."""

    def plan_epoch(self, epoch: int) -> EpochPlan | None:
        """None means: every training example once, weight 1."""
        return None

    def select(self, batch: Batch, model: torch.nn.Module) -> Selection | None:
        """Online selection from a candidate batch; None keeps the whole batch."""
        return None

    def observe(self, step: StepInfo) -> None:
        """Per-example outcomes of each training step."""

    def epoch_info(self, epoch: int) -> dict:
        """Extra numbers for the curve at the end of an epoch."""
        return {}

    def summary(self) -> dict:
        """Extra numbers for the run record's `method_stats`."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the method exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
