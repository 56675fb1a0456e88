"""What self-supervised methods share: BYOL's networks, its loss, the moving-average target, the budget.

BYOL (Grill et al., NeurIPS 2020), as the RELA paper's official code (LINs-lab/ReLA, on lightly) runs it:
- online network = backbone -> projector -> predictor; target network = a copy of backbone ->
  projector whose parameters are an exponential moving average (EMA) of the online ones and that
  receives no gradient (requires_grad=False, forward under no_grad);
- projector feat -> 2 feat -> 256 and predictor 256 -> 2 feat -> 256, each Linear, BatchNorm1d,
  ReLU, Linear (lightly's BYOLProjectionHead / BYOLPredictionHead);
- the symmetric loss 0.5 * [(1 - cos(p1, z2)) + (1 - cos(p2, z1))] per example: p = the online
  prediction of one view, z = the target projection of the other. The official code minimises
  -cos (lightly's NegativeCosineSimilarity); "1 -" only shifts it, so the gradients are the same,
  and the loss stays >= 0 (the trainer's records read better). The BYOL paper's 2 - 2 cos summed
  over both directions is 4x this: the same optimum, and under Adam(W) nearly the same steps;
- EMA momentum 0.99, fixed (official code), or the BYOL paper's cosine schedule from the base
  momentum to 1 over the run (`momentum_schedule = "cosine"`);
- the EMA moves parameters only; BatchNorm statistics of the target come from its own forward
  passes in train mode (lightly's update_momentum does the same);
- `budget`: the share of the reference's steps a run takes, by training each epoch on a fresh
  random subset of round(budget * N) examples (the official code's `data_ratio`, which resamples
  every epoch; it floors instead of rounding). Under the protocol's "epochs" budget this gives a
  budget-times-shorter run.

Views: the protocol's `view_augment` pipeline, both views alike. The official CIFAR views differ
only in solarize (lightly's view 2 solarizes with p = 0.2, view 1 never); a protocol states which
single pipeline it uses.

Decisions:
- The backbone is the protocol's model; its classifier head is left unused (no gradient reaches
  it, AdamW skips it), and the evaluation reads the backbone's penultimate features (`embed`).
- The EMA is applied in `after_step`, i.e. after each optimiser step; the official code applies it
  at the start of the next step. The two differ by when the first and last updates happen, not in
  the sequence of target weights the steps see.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.api import EpochPlan, Method, Param, Step, Traits
from benchmarks.core.models import embed
from benchmarks.errors import BenchError
from benchmarks.kit.subsets import random_subset, subset_size

PROJECTION_DIM = 256  # the official code's projector output and predictor sizes
MOMENTUM_SCHEDULES = ("constant", "cosine")

SSL_PARAMS = {
    "budget": Param(1.0, "share of the reference's steps: each epoch trains on a fresh random subset of this share "
                    "(the official code's data_ratio)", low=0.0, high=1.0, low_open=True),
    "momentum": Param(0.99, "EMA momentum of the target network (the official code's fixed 0.99; the BYOL paper "
                      "starts its cosine schedule at 0.996)", low=0.0, high=1.0),
    "momentum_schedule": Param("constant", "constant (official code) or cosine to 1 over the run (BYOL paper)",
                               choices=MOMENTUM_SCHEDULES),
}


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear: BYOL's projector and predictor."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def feature_dim(backbone: nn.Module) -> int:
    """The size of a backbone's penultimate features (timm's and the suite's models say num_features)."""
    dim = getattr(backbone, "num_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise BenchError(f"model {type(backbone).__name__} does not say its feature size (num_features); "
                         "self-supervised methods need it to size their heads")
    return dim


class BYOLNetworks(nn.Module):
    """Online backbone, projector and predictor; target backbone and projector (EMA copies, no gradient)."""

    def __init__(self, backbone: nn.Module, projection_dim: int = PROJECTION_DIM):
        super().__init__()
        dim = feature_dim(backbone)
        self.backbone = backbone
        self.projector = mlp_head(dim, 2 * dim, projection_dim)
        self.predictor = mlp_head(projection_dim, 2 * dim, projection_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.backbone)

    def online_pairs(self):
        """(online module, its target copy): the pairs the EMA updates."""
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]


def byol_loss(model: BYOLNetworks, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-example symmetric BYOL loss of two views [B] (module docstring); the target gets no gradient."""
    p1 = model.predictor(model.projector(embed(model.backbone, first)))
    p2 = model.predictor(model.projector(embed(model.backbone, second)))
    with torch.no_grad():
        z1 = model.target_projector(embed(model.target_backbone, first))
        z2 = model.target_projector(embed(model.target_backbone, second))
    return 0.5 * ((1 - F.cosine_similarity(p1.float(), z2.float(), dim=1))
                  + (1 - F.cosine_similarity(p2.float(), z1.float(), dim=1)))


def momentum_at(base: float, schedule: str, progress: float) -> float:
    """The EMA momentum at `progress` (share of the run done): fixed, or BYOL's cosine from base to 1."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return 1 - (1 - base) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2
    raise ValueError(schedule)


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter (buffers untouched)."""
    for o, t in zip(online.parameters(), target.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1 - momentum)


def budget_plan(n: int, budget: float, generator: torch.Generator) -> EpochPlan:
    """One epoch of a budgeted run: a fresh random round(budget * n) of the n examples."""
    if budget >= 1.0:
        return EpochPlan(torch.arange(n))
    return EpochPlan(random_subset(n, subset_size(n, budget), generator))


class BYOLMethod(Method):
    """The shared skeleton of BYOL-trained methods: networks, views, EMA target, budget (module docstring).

    Not registered itself; baselines/byol.py registers plain BYOL and methods/rela.py builds on it.
    """

    traits = Traits(kind="self-supervised",
                    augment_batches=False,  # views are drawn from the raw images with batch.view()
                    unused_parameters=True,  # the backbone's classifier head gets no gradient (DDP must not wait)
                    headline_params=("budget",))
    params = SSL_PARAMS

    def build_model(self, ctx) -> BYOLNetworks:
        return BYOLNetworks(ctx.new_model("main"))

    def backbone(self, model: BYOLNetworks) -> nn.Module:
        return model.backbone

    def plan_epoch(self, epoch: int) -> EpochPlan:
        return budget_plan(self.ctx.num_train, self.hparams["budget"], self.ctx.generator("ssl-budget", epoch))

    def objective(self, model: BYOLNetworks, batch):
        return byol_loss(model, batch.view(), batch.view()), None

    def after_step(self, model: BYOLNetworks, step: Step) -> None:
        momentum = momentum_at(self.hparams["momentum"], self.hparams["momentum_schedule"], step.progress)
        for online, target in model.online_pairs():
            ema_update(online, target, momentum)
