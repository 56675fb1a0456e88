"""The contract between the trainer and a data-efficiency method.

A method implements any of the hooks below; the defaults do nothing, so the base class trains the
protocol's model on the full data. Per-example information is always keyed by the ORIGINAL
training-set index, which every batch carries (`Batch.index`).

Order of the hooks in a run:
  build_model(ctx)             what is trained (default: the protocol's model)
  prepare(ctx)                 work before training, charged as selection
  for each epoch:
    plan_epoch(epoch)          which examples it visits, with loss weights
    for each step:
      select(batch, model, s)  keep k of a candidate batch (charged as selection)
      cost_variant()           which measured step cost applies (a method whose objective changes)
      objective(model, batch)  the per-example loss (default: cross-entropy); skipped when the
                               selection carries the kept examples' gradient (one pass)
      after_step(model, s)     after the optimiser step (a moving-average target)
      observe(info)            per-example outcomes of the step
    epoch_info(epoch)
  evaluate(model, ctx)         replaces the protocol's evaluation (charged to eval)
  summary()                    numbers for the record
  example_sets()               sets of training examples the record describes by group (after training)
Everything a hook runs is metered (benchmarks/compute.py): passes of its own inside `prepare` go
through `ctx.meter.measure("selection", key)` or the shared helpers of benchmarks/proxies.py.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from benchmarks.core.augment import Views
    from benchmarks.core.registry import Param
    from benchmarks.core.train import RunContext


@dataclass
class Batch:
    x: torch.Tensor  # float inputs on the device, augmented as the protocol says (unless the method opts out)
    y: torch.Tensor  # labels on the device
    index: torch.Tensor  # original training-set indices (on the device)
    weight: torch.Tensor | None = None  # per-example loss weights from the epoch plan
    raw: torch.Tensor | None = None  # the un-augmented uint8 images [B, C, H, W] (in-memory splits only)
    views: Views | None = field(default=None, repr=False)  # draws augmented views of `raw`, seeded
    # Group labels (on the device), filled only for a method that declares reads_train_groups (an
    # oracle such as Group DRO) on data with groups; None for every other method (benchmarks/data/splits.py).
    group: torch.Tensor | None = None
    # Data parallel: this rank's rows of the global batch of `total` examples; `raw` then holds the
    # GLOBAL batch's images, so that views are drawn for all of it (the same draws on every rank and
    # in one process) and this rank keeps its rows.
    shard: slice | None = None
    total: int | None = None

    def view(self, pipeline=None) -> torch.Tensor:
        """A freshly augmented, normalised view of the batch's raw images.

        `pipeline`: a list of augmentation specs (names or {name = ..., params}) from the registry in
        benchmarks/augment.py; None takes the protocol's `view_augment`. Draws come from the run's
        seeded augmentation generator, so a resumed run draws the same views.
        """
        if self.views is None or self.raw is None:
            raise ValueError("this batch has no raw images to draw views from (streaming datasets use their "
                             "loader's transforms)")
        views = self.views.draw(self.raw, pipeline)
        return views if self.shard is None else views[self.shard]

    def take(self, keep: torch.Tensor, weight: torch.Tensor | None = None) -> Batch:
        """The examples at positions `keep`, with `weight` (default: their plan weights)."""
        if weight is None and self.weight is not None:
            weight = self.weight[keep]
        raw = self.raw[keep] if self.raw is not None and self.shard is None else None
        return Batch(x=self.x[keep], y=self.y[keep], index=self.index[keep], weight=weight, raw=raw,
                     views=self.views if raw is not None else None,
                     group=self.group[keep] if self.group is not None else None)


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
    # One pass (optional): the gradient of the kept examples' loss, mean(weight * loss), that `select`
    # already formed from its own candidate pass (parameter name -> tensor, one per trainable
    # parameter). The trainer then steps with it instead of running the objective again, and `observe`
    # gets the kept examples' `losses` and `logits` from here. Only valid when the candidate pass IS the
    # training forward (no BatchNorm batch statistics, the method's objective unchanged).
    gradients: dict[str, torch.Tensor] | None = None
    losses: torch.Tensor | None = None  # [k], detached, required with gradients
    logits: torch.Tensor | None = None  # [k, C], detached, or None


@dataclass
class Step:
    """Where training stands, given to `select` and `after_step`."""

    epoch: int  # 0-based
    step: int  # optimiser steps taken before this one (after_step: including it)
    lr: float  # the learning rate of this step
    progress: float  # share of the run's training done, in [0, 1]
    autocast: Callable[[], AbstractContextManager]  # the mixed-precision context the trainer runs the model in


@dataclass
class StepInfo:
    """What `observe` sees after each optimiser step, all aligned with the trained batch."""

    epoch: int
    step: int
    index: torch.Tensor
    loss: torch.Tensor  # per-example loss, detached
    correct: torch.Tensor | None  # bool, prediction == label (train mode, before the update); None without logits
    logits: torch.Tensor | None  # detached


class Method:
    """Base class: full-data training. Subclasses are registered with @register("name")."""

    name: ClassVar[str] = "base"
    params: ClassVar[dict[str, Param]] = {}
    # Set by a subclass that replaces the per-example loss:
    # callable(model, batch) -> (loss [B], logits [B, C] or None). It may draw views with batch.view().
    objective: Any = None
    # Online selection: the trainer draws candidate batches of candidate_multiplier x batch_size for `select`
    # (an instance may set its own from a parameter).
    candidate_multiplier: ClassVar[int] = 1
    # True: the method uses the protocol's held-out split (ctx.data.holdout); a protocol without one is
    # refused when the run is resolved.
    needs_holdout: ClassVar[bool] = False
    # False: batch.x is the un-augmented image (the method draws its own views from batch.raw).
    augment_batches: ClassVar[bool] = True
    # True: `select` may update BatchNorm running statistics (by default they are restored after it).
    select_updates_batchnorm: ClassVar[bool] = False
    # Which protocols the method fits: "supervised" (a classifier with labels) or "self-supervised".
    kind: ClassVar[str] = "supervised"
    # Parameters a table always names, even at their defaults (what a reader compares rows by).
    headline_params: ClassVar[tuple[str, ...]] = ()
    # Keep the final model next to the record (a prior or teacher for later runs).
    save_model: ClassVar[bool] = False
    # Data parallel: True when some trainable parameters may get no gradient in a step (DDP must look).
    unused_parameters: ClassVar[bool] = False
    # Data parallel: why the method cannot be spread over ranks (state it updates from a rank's own
    # shard would differ between ranks), or "" when it can. A data-parallel run of it is refused.
    single_process_only: ClassVar[str] = ""
    # True: the method reads TRAINING group labels (batch.group, ctx.data.train.groups). It is then an
    # oracle reference (Group DRO), marked so in `list` and in tables, and needs data with groups. For
    # every other method the training split's group labels are hidden: reading them raises.
    reads_train_groups: ClassVar[bool] = False
    # True: a group-robustness method (JTT, Group DRO); `bench` runs it by default only where the data has groups.
    for_groups: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.hparams = params
        self.ctx: RunContext | None = None

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Checks that span parameters (each alone is checked by its Param); raise BenchError.

        Called when parameters are resolved, so a sweep with an impossible combination fails when it
        is loaded, not when its job runs.
        """

    def build_model(self, ctx: RunContext) -> torch.nn.Module | None:
        """What the run trains, when it is more than the protocol's model (None: ctx.new_model("main")).

        The optimiser trains every parameter with requires_grad; checkpoints hold the whole module.
        """
        return None

    def backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part the evaluation reads: a classifier for accuracy, an encoder for a linear probe."""
        return model

    def prepare(self, ctx: RunContext) -> None:
        """Work before training (proxy runs, scoring), metered as selection."""

    def plan_epoch(self, epoch: int) -> EpochPlan | None:
        """None means: every training example once, weight 1."""
        return None

    def select(self, batch: Batch, model: torch.nn.Module, step: Step) -> Selection | None:
        """Online selection from a candidate batch; None keeps the whole batch."""
        return None

    def after_step(self, model: torch.nn.Module, step: Step) -> None:
        """After each optimiser step (e.g. a moving-average target network)."""

    def cost_variant(self) -> Hashable:
        """What the next training step's cost depends on besides the batch shape (None: nothing).

        The meter measures a step's FLOPs once per key and reuses the figure. A method whose objective
        changes cost during a run (RELA trains with its own loss, then switches to BYOL's) returns one
        value per variant, so each variant is measured once instead of the first one being charged for all.
        """
        return None

    def observe(self, info: StepInfo) -> None:
        """Per-example outcomes of each training step."""

    def evaluate(self, model: torch.nn.Module, ctx: RunContext) -> dict | None:
        """Metrics replacing the protocol's evaluation; None keeps the protocol's. Metered as eval."""
        return None

    def epoch_info(self, epoch: int) -> dict:
        """Extra numbers for the curve at the end of an epoch."""
        return {}

    def summary(self) -> dict:
        """Extra numbers for the run record's `method_stats`."""
        return {}

    def example_sets(self) -> dict[str, torch.Tensor]:
        """Named sets of training examples (indices) whose group make-up the record should show.

        Called once after training. Where the data has groups, the harness counts each set's members
        per group from labels the method never sees (e.g. JTT's error set) and adds the counts to
        `method_stats`: a summary for the reader that cannot feed back into training.
        """
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the method exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def overrides(method: Method, hook: str) -> bool:
    """Whether the method's class implements `hook` (the trainer skips hooks that do nothing)."""
    return getattr(type(method), hook) is not getattr(Method, hook)
