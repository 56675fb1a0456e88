"""The public contract between the suite and a data-efficiency method: everything a method author needs.

    from benchmarks.api import Method, Param, Space, Traits, register, Batch, EpochPlan, Selection, Step, StepInfo

A method is a class registered under a name (`@register("name")`), with its parameters declared in
`params` (name -> `Param`: default, range or choices, and the search space a tuned sweep draws from,
`space=(choices)` or `space=Space.range(low, high, log=True)`) and its traits in ONE place, `traits =
Traits(...)` (kind, held-out split, oracle group labels, candidate factor, data-parallel limits ...).
`protocol_space` (protocol setting -> Space) names the protocol settings the method's paper tunes for
it (JTT's learning rate and weight decay, shared by both stages): a tuned sweep draws them with the
parameters, and each trial runs with the drawn values as protocol overrides (benchmarks/jobs/tuning.py).
Per-example information is always keyed by the ORIGINAL training-set index, which every batch
carries (`Batch.index`). What a method may read of the run is its `RunContext` (`self.ctx` after
`setup`): the protocol, the data, the device, the meter, seeded generators, the cache folder.

Hooks, all optional (the defaults train the protocol's model on the full data with cross-entropy),
in the order a run calls them, with what each costs:
  build_model(ctx)             what is trained (default: the protocol's model). Not charged; also
                               called on a throwaway instance to measure the reference's cost.
  prepare(ctx)                 work before training: proxy runs, scoring, RELA's targets, RHO-Loss's
                               irreducible model. ONCE per run, never again on a resume (its results
                               travel in `state_dict` or the cache). Charged as selection: every pass
                               it runs goes through `ctx.meter.measure("selection", key)` or the kit's
                               helpers (benchmarks/kit/proxies.py); resumable after a preemption
                               through the kit's cache and partial proxy checkpoints.
  setup(ctx)                   on EVERY process start, resumes included, once the method's state is
                               complete: after `prepare` on a fresh start, after `load_state_dict`
                               on a resume (and on the other ranks of a data-parallel run, after they
                               receive rank 0's prepared state). Restores in-memory state that the
                               checkpoint does not hold (device copies, tables rebuilt from the cache
                               or from the state). NEVER charged: it runs with the meter paused and
                               invisible to any FLOP counter. Its randomness comes from ctx.generator
                               (the same draws on every start), never the global RNG. The base stores
                               `self.ctx = ctx`: an override calls super().setup(ctx) first. Hooks
                               before it (build_model, prepare, load_state_dict) get no self.ctx: they
                               read the ctx they are given. The reference-cost probe calls build_model
                               and setup on a throwaway instance, never prepare.
  for each epoch:
    plan_epoch(epoch)          which examples it visits, with loss weights (not charged: CPU bookkeeping)
    for each step:
      select(batch, model, s)  keep k of a candidate batch of batch_size x candidate_factor();
                               charged as selection; BatchNorm statistics are restored after it
                               unless traits.select_updates_batchnorm
      cost_variant()           which measured step cost applies (a method whose objective changes)
      objective(model, batch)  the per-example loss (base: the protocol's cross-entropy); charged as
                               train (it is the step's forward and backward, views and targets
                               included); skipped when the selection carries the kept examples'
                               gradient (one pass)
      after_step(model, s)     after the optimiser step (a moving-average target); charged as train
      observe(info)            per-example outcomes of the step; charged as selection
    epoch_info(epoch)          extra numbers for the curve (not charged)
  backbone(model)              the part the evaluation reads and a saved model names (default: all of it)
  evaluate(model, ctx)         replaces the protocol's evaluation; charged to eval (not compared)
  summary()                    numbers for the record's method_stats (not charged)
  example_sets()               sets of training examples the record describes by group (after training)
  state_dict() / load_state_dict(state)   what a checkpoint holds to resume the method exactly
Hooks are found by whether the class overrides them (`overrides`); the trainer skips the others.
Also on the class: `check_params(params)` (a classmethod: checks spanning several parameters, when a
run or sweep is resolved) and `candidate_factor()` (traits.candidate_factor, resolved from the
parameter it may name: the one figure the trainer reads for online selection).

Registries: methods (`register`) and datasets (`register_dataset`), both importable from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

# Re-exported for method authors. None of these modules imports this one at import time, so importing
# benchmarks.api first (or any of them first) never meets a half-initialised module.
from benchmarks.core.context import RunContext
from benchmarks.core.models import embed
from benchmarks.core.protocol import Protocol
from benchmarks.core.registry import Param, Space, register
from benchmarks.data.registry import register_dataset

if TYPE_CHECKING:
    from benchmarks.core.augment import Views

__all__ = [
    # the method contract
    "Method", "Traits", "Param", "Space", "register", "overrides", "cross_entropy", "KINDS",
    # what the hooks receive and return
    "Batch", "EpochPlan", "Selection", "Step", "StepInfo", "RunContext", "Protocol",
    # a model's penultimate features (every model of the suite has them)
    "embed",
    # datasets
    "register_dataset",
]

KINDS = ("supervised", "self-supervised")  # the protocols' tasks a method can fit


@dataclass
class Batch:
    x: torch.Tensor  # float inputs on the device, augmented as the protocol says (unless the method opts out)
    y: torch.Tensor  # labels on the device
    index: torch.Tensor  # original training-set indices (on the device)
    weight: torch.Tensor | None = None  # per-example loss weights from the epoch plan
    raw: torch.Tensor | None = None  # the un-augmented uint8 images [B, C, H, W] (in-memory splits only)
    views: Views | None = field(default=None, repr=False)  # draws augmented views of `raw`, seeded
    # Group labels (on the device), filled only for a method whose traits say reads_train_groups (an
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
        benchmarks/core/augment.py; None takes the protocol's `view_augment`. Draws come from the run's
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


@dataclass(frozen=True)
class Traits:
    """What a method IS, declared once as a class attribute: `traits = Traits(...)`.

    The harness reads these before and around a run (which protocols a method fits, what data it
    gets, how the trainer draws and augments its batches, whether it can run data-parallel); a
    subclass changes some with `traits = Base.traits.replace(...)`.
    """

    # Which protocols the method fits: "supervised" (a classifier with labels) or "self-supervised".
    kind: str = "supervised"
    # True: the method uses the protocol's held-out split (ctx.data.holdout); a protocol without one is
    # refused when the run is resolved.
    needs_holdout: bool = False
    # True: the method reads TRAINING group labels (batch.group, ctx.data.train.groups). It is then an
    # oracle reference (Group DRO), marked so in `list` and in tables, and needs data with groups. For
    # every other method the training split's group labels are hidden: reading them raises.
    reads_train_groups: bool = False
    # True: a group-robustness method (JTT, Group DRO); `bench` runs it by default only where the data has groups.
    for_groups: bool = False
    # Online selection: the trainer draws candidate batches of this x batch_size for `select`. An int,
    # or the name of the method's integer parameter that holds it (read by Method.candidate_factor()).
    candidate_factor: int | str = 1
    # False: batch.x is the un-augmented image (the method draws its own views from batch.raw).
    augment_batches: bool = True
    # True: `select` may update BatchNorm running statistics (by default they are restored after it).
    select_updates_batchnorm: bool = False
    # Data parallel: True when some trainable parameters may get no gradient in a step (DDP must look).
    unused_parameters: bool = False
    # Data parallel: why the method cannot be spread over ranks (state it updates from a rank's own
    # shard would differ between ranks), or "" when it can. A data-parallel run of it is refused.
    single_process_only: str = ""
    # Keep the final model next to the record (a prior or teacher for later runs).
    save_model: bool = False
    # Parameters a table always names, even at their defaults (what a reader compares rows by).
    headline_params: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Traits.kind must be one of {KINDS}, got {self.kind!r}")
        factor = self.candidate_factor
        if not (isinstance(factor, str) or (isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1)):
            raise ValueError(f"Traits.candidate_factor must be an int >= 1 or a parameter's name, got {factor!r}")
        if not isinstance(self.headline_params, tuple):
            raise ValueError(f"Traits.headline_params must be a tuple of parameter names, got {self.headline_params!r}")

    def replace(self, **changes: Any) -> Traits:
        """These traits with some changed (a subclass's traits from its base's)."""
        return dataclasses.replace(self, **changes)


def cross_entropy(model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's per-example training loss: (cross-entropy [B] in float32, logits [B, C])."""
    logits = model(batch.x)
    loss = F.cross_entropy(logits.float(), batch.y, reduction="none", label_smoothing=label_smoothing)
    return loss, logits


class Method:
    """Base class: full-data training. Subclasses are registered with @register("name").

    The hooks and their costs are in this module's docstring.
    """

    name: ClassVar[str] = "base"
    params: ClassVar[dict[str, Param]] = {}
    traits: ClassVar[Traits] = Traits()
    # Protocol settings (lr, weight_decay, ...) the method's paper tunes for it, with their search
    # spaces; a tuned sweep's trials run with the drawn values as protocol overrides. Empty: none.
    protocol_space: ClassVar[dict[str, Space]] = {}

    def __init__(self, **params: Any):
        self.hparams = params
        self.ctx: RunContext | None = None  # set by `setup`

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Checks that span parameters (each alone is checked by its Param); raise BenchError.

        Called when parameters are resolved, so a sweep with an impossible combination fails when it
        is loaded, not when its job runs.
        """

    def candidate_factor(self) -> int:
        """Online selection: candidates drawn per kept example (traits.candidate_factor, resolved from the
        parameter it names). The trainer reads this, and only this."""
        factor = self.traits.candidate_factor
        return int(self.hparams[factor]) if isinstance(factor, str) else factor

    # -- lifecycle -------------------------------------------------------------------------------
    def build_model(self, ctx: RunContext) -> torch.nn.Module | None:
        """What the run trains, when it is more than the protocol's model (None: ctx.new_model("main")).

        The optimiser trains every parameter with requires_grad; checkpoints hold the whole module.
        """
        return None

    def backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part the evaluation reads: a classifier for accuracy, an encoder for a linear probe."""
        return model

    def prepare(self, ctx: RunContext) -> None:
        """Work before training (proxy runs, scoring), once per run, charged as selection."""

    def setup(self, ctx: RunContext) -> None:
        """On every process start, once the state is complete (module docstring); never charged.

        Restores what the checkpoint does not hold; an override calls super().setup(ctx) first.
        """
        self.ctx = ctx

    # -- training --------------------------------------------------------------------------------
    def plan_epoch(self, epoch: int) -> EpochPlan | None:
        """None means: every training example once, weight 1."""
        return None

    def select(self, batch: Batch, model: torch.nn.Module, step: Step) -> Selection | None:
        """Online selection from a candidate batch; None keeps the whole batch."""
        return None

    def cost_variant(self) -> Hashable:
        """What the next training step's cost depends on besides the batch shape (None: nothing).

        The meter measures a step's FLOPs once per key and reuses the figure. A method whose objective
        changes cost during a run (RELA trains with its own loss, then switches to BYOL's) returns one
        value per variant, so each variant is measured once instead of the first one being charged for all.
        """
        return None

    def objective(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-example loss of a batch: (loss [B], logits [B, C] or None). It may draw views with
        batch.view(). The base is the protocol's cross-entropy (the trainer runs it with its own
        protocol, so a method that keeps it needs no context)."""
        return cross_entropy(model, batch, self.ctx.protocol.label_smoothing)

    def after_step(self, model: torch.nn.Module, step: Step) -> None:
        """After each optimiser step (e.g. a moving-average target network)."""

    def observe(self, info: StepInfo) -> None:
        """Per-example outcomes of each training step."""

    def epoch_info(self, epoch: int) -> dict:
        """Extra numbers for the curve at the end of an epoch."""
        return {}

    # -- after training --------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, ctx: RunContext) -> dict | None:
        """Metrics replacing the protocol's evaluation; None keeps the protocol's. Metered as eval."""
        return None

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

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the method exactly (called before `setup` too)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output; called before `setup`, so without self.ctx."""


def overrides(method: Method, hook: str) -> bool:
    """Whether the method's class implements `hook` (the trainer skips hooks that do nothing)."""
    return getattr(type(method), hook) is not getattr(Method, hook)
