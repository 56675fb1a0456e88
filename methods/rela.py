"""RELA (Sun, Jiang, Lin, NeurIPS 2024, "Efficiency for Free: Ideal Data Are Transportable Representations").

Two parts:
- RELA-D (`prepare`): a frozen prior model (benchmarks/kit/priors.py: `random`, a model saved by a run
  of this suite, or a timm model) is run once over the UN-augmented training images; its features
  are reduced by PCA to k = min(student feature size, prior feature size) components and z-scored
  per component (`pca_targets`): one target vector per example.
- RELA-F (`objective`): loss = lambda * L_RELA + (1 - lambda) * L_BYOL, with
  L_RELA = mean over two augmented views of 1 - cos(W h(x) + b, target(x)), h the student's
  backbone features and (W, b) a linear map; L_BYOL as in benchmarks/kit/ssl.py. lambda starts at 1
  and drops to 0 for good, either by the official plateau rule (`PlateauSwitch`) or at a fixed
  epoch (`switch_epoch`). The step at which it switches is recorded (`switch_step`).

Use: `python -m benchmarks run --protocol ssl-fashion --method rela --param budget=0.2 --param prior=random`,
or `--param prior=run:<run_id>` with a model saved by `--save-model`.

Decisions, and the official code's (LINs-lab/ReLA) details they keep or fix:
- W and b ARE trained: they are part of the model the optimiser is built from. The official code
  creates `transfer` after its optimiser's parameter list is fixed (configure_optimizers lists
  backbone, heads and classifier only), so its W, b stay at their random initialisation.
- lambda is 1 or 0, as both official rules make it: with lambda = 1 a step computes only the RELA
  loss (two backbone passes and W, no target network, no projector), with lambda = 0 only BYOL's.
  The two steps cost differently, so the method tells the trainer which one comes next
  (`cost_variant`) and the meter measures each once. The EMA target keeps following the online
  network during the RELA phase (the official code calls its momentum update there too).
- The plateau rule, as the official code orders it: before a RELA step, if rho >= 0.995 switch;
  after it, rho <- exp(-max(S - F, 0)) from the PREVIOUS F and S, then F <- 0.999 F + 0.001 l and
  S <- 0.99 S + 0.01 F with the step's RELA loss l (F = 1, S = 2, rho = 0 at the start). With a
  constant loss S - F decays as 0.99^t, so the switch comes after 528 RELA steps at the earliest:
  in a short run (a small budget) it may never come.
- The fixed alternative switches at the start of epoch `switch_epoch` (the official `rela_conlam`
  is a share of the epochs, int(conlam * epochs); an epoch number says the same without rounding).
- RELA's views: random-resized-crop scale (0.5, 1), flip, color jitter 0.8/0.8/0.8/0.2 with
  p = 0.8, grayscale p = 0.2 (the official TransformReLA); after the switch the protocol's BYOL
  views, as the official code swaps its dataset transform.
- Targets: the official code's PCA (covariance eigenvectors; its components come in ascending
  order, ours descending, which a learned W does not notice) and z-score (population std). Here
  each component's sign is fixed (largest loading positive) so targets are reproducible across
  libraries, a component without variance is set to 0 instead of divided by 0, and k = min(student,
  prior) features as in the official code. The prior sees the un-augmented images; the random prior
  is a frozen copy of the student's own initialisation (the official "rand" prior is the student's
  backbone before training).
- Cost: the prior's forward passes and the PCA's products are charged as selection (measured); the
  eigendecomposition itself is not counted by flop_counter (O(d^3), small beside the passes).
  Targets are cached per (training data, prior, k) under OUT/cache/rela-targets/; a hit charges
  what computing them cost. The prior's own training is not charged (the paper treats priors as
  free public models); a record names its prior.
- A resumed run reloads its targets from the cache in `setup` (or recomputes them there, where
  nothing is charged: they were charged before the checkpoint), so checkpoints do not carry an
  N x k table. A recomputed table is not cached: a later run's hit would charge nothing for it.
- The official code reports the linear probe's mean over its last 3 epochs; the suite reports the
  last epoch, as for every method.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.api import Param, embed, register
from benchmarks.kit.priors import check_prior_spec, load_prior, prior_identity
from benchmarks.kit.proxies import cached_artefact, dataset_artefact, embedding_pass, file_label, load_cached
from benchmarks.kit.ssl import SSL_PARAMS, BYOLMethod, BYOLNetworks, byol_loss, feature_dim

RELA_VIEWS = [{"name": "random-resized-crop", "scale": [0.5, 1.0]}, "flip",
              {"name": "color-jitter", "p": 0.8, "brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.2},
              {"name": "grayscale", "p": 0.2}]
SWITCH_AT = 0.995  # the official threshold on rho
FAST, SLOW = 0.999, 0.99  # the official EMA rates of F (of the loss) and S (of F)
PCA_CHUNK = 65536  # rows per product, so the PCA of a large dataset never holds an N x d float64 copy


def pca_targets(features: torch.Tensor, k: int) -> torch.Tensor:
    """RELA-D's targets: the top-k principal components of the features [N, d], z-scored per component.

    Covariance eigenvectors in float64, descending variance, each sign fixed so that its largest
    loading is positive; population std as the official code; a component with no variance is 0.
    """
    n, d = features.shape
    if not 1 <= k <= d or n < 2:
        raise ValueError(f"cannot take {k} principal components of {n} x {d} features")
    chunks = range(0, n, PCA_CHUNK)
    mean = sum(features[i:i + PCA_CHUNK].double().sum(0) for i in chunks) / n
    covariance = torch.zeros(d, d, dtype=torch.float64, device=features.device)
    for i in chunks:
        centered = features[i:i + PCA_CHUNK].double() - mean
        covariance += centered.T @ centered
    _, vectors = torch.linalg.eigh(covariance / (n - 1))
    components = vectors.flip(1)[:, :k]
    signs = torch.sign(components[components.abs().argmax(0), torch.arange(k, device=features.device)])
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    reduced = torch.empty(n, k, dtype=torch.float32, device=features.device)
    total, squares = torch.zeros(k, dtype=torch.float64, device=features.device), torch.zeros_like(mean[:k])
    for i in chunks:
        block = (features[i:i + PCA_CHUNK].double() - mean) @ components
        total += block.sum(0)
        squares += (block * block).sum(0)
        reduced[i:i + PCA_CHUNK] = block.float()
    center = total / n
    std = (squares / n - center * center).clamp_min(0).sqrt()
    usable = std > 1e-12 * std.max().clamp_min(1e-300)
    scale = torch.where(usable, std, torch.ones_like(std))
    return ((reduced.double() - center) / scale * usable).float()


@dataclass
class PlateauSwitch:
    """The official lambda rule: RELA's loss until its slow average stops falling (module docstring)."""

    fast: float = 1.0  # F, an EMA of the RELA loss
    slow: float = 2.0  # S, an EMA of F
    rho: float = 0.0

    @property
    def switched(self) -> bool:
        return self.rho >= SWITCH_AT

    def update(self, loss: float) -> None:
        self.rho = math.exp(-max(self.slow - self.fast, 0.0))  # from the previous F and S, as the official code
        self.fast = FAST * self.fast + (1 - FAST) * loss
        self.slow = SLOW * self.slow + (1 - SLOW) * self.fast


def rela_steps(losses) -> int | None:
    """How many steps the plateau rule trains with RELA's loss, given the RELA losses those steps would see;
    None when it has not switched by the end of the sequence."""
    rule = PlateauSwitch()
    for i, loss in enumerate(losses):
        if rule.switched:
            return i
        rule.update(float(loss))
    return len(losses) if rule.switched else None


class RELANetworks(BYOLNetworks):
    """BYOL's networks plus RELA's linear map (W, b) from the student's features to the targets."""

    def __init__(self, backbone: nn.Module, target_dim: int):
        super().__init__(backbone)
        self.transfer = nn.Linear(self.feature_dim, target_dim)


def rela_loss(model: RELANetworks, first: torch.Tensor, second: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean over the two views of 1 - cos(W h(view) + b, target)."""
    predicted = [model.transfer(embed(model.backbone, view)).float() for view in (first, second)]
    return 0.5 * sum(1 - F.cosine_similarity(p, target, dim=1) for p in predicted)


@register("rela")
class RELA(BYOLMethod):
    """RELA: a prior's PCA'd features as targets (RELA-D), then BYOL once their loss plateaus (RELA-F)."""

    # The plateau rule reads the rank's own loss: ranks could switch phase at different steps.
    traits = BYOLMethod.traits.replace(
        headline_params=("budget", "prior"),
        single_process_only="its plateau rule reads each rank's own loss, so ranks could switch phase apart")
    params = dict(SSL_PARAMS, **{
        "prior": Param("random", "the prior model: random, run:<run_id>, timm:<name> or timm:<name>@<weights file>"),
        "switch_epoch": Param(-1, "-1: the official plateau rule switches lambda to 0; e >= 0: switch at the start "
                              "of epoch e (0-based)", low=-1),
    })

    def __init__(self, **params):
        super().__init__(**params)
        self.targets: torch.Tensor | None = None
        self.target_dim: int | None = None
        self._encoder = None  # the loaded prior, between build_model and prepare (or setup, on a resume)
        self.rule = PlateauSwitch()
        self.phase = "rela"
        self.steps = 0  # optimiser steps taken
        self.switch_step: int | None = None  # the first step trained with lambda = 0
        self.switch_epoch: int | None = None  # the (0-based) epoch in which lambda dropped to 0
        self._last_loss: torch.Tensor | None = None

    @classmethod
    def check_params(cls, params: dict) -> None:
        check_prior_spec(params["prior"])

    # -- RELA-D -------------------------------------------------------------------------------------
    def _prior(self, ctx):
        if self._encoder is None:
            self._encoder = load_prior(self.hparams["prior"], ctx, random_init=lambda: ctx.new_model("main"))
        return self._encoder

    def build_model(self, ctx) -> RELANetworks:
        backbone = ctx.new_model("main")
        prior_dim = self._prior(ctx).feature_dim(ctx.data.input_shape)
        self.target_dim = min(prior_dim, feature_dim(backbone))
        return RELANetworks(backbone, self.target_dim)

    def _cache(self, ctx):
        """(path, key) of the targets: an artefact of the training data, the prior and k alone."""
        prior = self.hparams["prior"]
        return dataset_artefact(ctx, "rela-targets", f"{file_label(prior)}-k{self.target_dim}", k=self.target_dim,
                                **prior_identity(prior, ctx))

    def _generate(self, ctx) -> torch.Tensor:
        """The prior's features of every (un-augmented) training example -> PCA -> z-score, metered as selection."""
        encoder = self._prior(ctx)
        features = embedding_pass(encoder, ctx, tag=("rela-prior", self.hparams["prior"]))
        with ctx.meter.measure("selection", ("rela-pca", tuple(features.shape), self.target_dim)):
            return pca_targets(features, self.target_dim)

    def prepare(self, ctx) -> None:
        cached, _ = cached_artefact(ctx, *self._cache(ctx), lambda: {"targets": self._generate(ctx).cpu()})
        self._keep(cached["targets"], ctx)

    def _keep(self, targets: torch.Tensor, ctx) -> None:
        # In-memory datasets keep the targets beside the images on the device; a streaming one on the CPU.
        device = ctx.device if not getattr(ctx.data.train, "streaming", False) else torch.device("cpu")
        self.targets = targets.to(device)
        self._encoder = None  # the prior is no longer needed

    def setup(self, ctx) -> None:
        """A resumed run's targets (the checkpoint does not hold them): from the cache, else recomputed.
        Nothing here is charged (they were, in prepare, before the checkpoint)."""
        super().setup(ctx)
        if self.targets is None:
            cached = load_cached(*self._cache(ctx), ctx.log)
            self._keep(cached["targets"] if cached is not None else self._generate(ctx), ctx)

    # -- RELA-F -------------------------------------------------------------------------------------
    def plan_epoch(self, epoch: int):
        switch_epoch = self.hparams["switch_epoch"]
        if self.phase == "rela" and 0 <= switch_epoch <= epoch:
            self._switch(epoch)
        return super().plan_epoch(epoch)

    def _switch(self, epoch: int) -> None:
        self.phase, self.switch_step, self.switch_epoch = "byol", self.steps, epoch

    def cost_variant(self) -> str:
        return self.phase

    def objective(self, model: RELANetworks, batch):
        if self.phase == "byol":
            return byol_loss(model, batch.view(), batch.view()), None
        target = self.targets[batch.index.to(self.targets.device)].to(batch.x.device)
        losses = rela_loss(model, batch.view(RELA_VIEWS), batch.view(RELA_VIEWS), target)
        self._last_loss = losses.detach().mean()
        return losses, None

    def after_step(self, model: RELANetworks, step) -> None:
        super().after_step(model, step)
        self.steps = step.step
        if self.phase == "rela" and self.hparams["switch_epoch"] < 0:
            self.rule.update(self._last_loss.item())  # one host sync per step, as the official rule's .item()
            if self.rule.switched:
                self._switch(step.epoch)

    def epoch_info(self, epoch: int) -> dict:
        info = {"rela_lambda": 1.0 if self.phase == "rela" else 0.0}
        if self.hparams["switch_epoch"] < 0:
            info["rela_rho"] = self.rule.rho
        return info

    def summary(self) -> dict:
        return {"prior": self.hparams["prior"], "target_dim": self.target_dim, "switch_step": self.switch_step,
                "switch_epoch": self.switch_epoch,
                "rela_steps": self.switch_step if self.switch_step is not None else self.steps}

    def state_dict(self) -> dict:
        return {"rule": asdict(self.rule), "phase": self.phase, "steps": self.steps, "switch_step": self.switch_step,
                "switch_epoch": self.switch_epoch, "target_dim": self.target_dim}

    def load_state_dict(self, state: dict) -> None:
        self.rule = PlateauSwitch(**state["rule"])
        self.phase, self.steps = state["phase"], state["steps"]
        self.switch_step, self.switch_epoch = state["switch_step"], state["switch_epoch"]
        self.target_dim = state["target_dim"]
