"""RHO-Loss (Mindermann et al., ICML 2022, "Prioritized Training on Points that are Learnable, Worth
Learning, and Not Yet Learnt"): train on the candidates with the highest reducible loss.

Algorithm:
  before training: an irreducible-loss (IL) model is trained on the held-out split only
  (ctx.data.holdout), then scores every training example once: il_i = its loss on example i;
  every step, from a candidate batch of B = k x `candidate_factor`:
  reducible_i = training loss of the current model on i - il_i; keep the k highest.
High reducible loss = not yet learnt (high training loss) but learnable (low loss for a model that
never saw it): noisy or ambiguous points have a high IL and are skipped, easy ones a low training loss.

Use: python -m benchmarks run --protocol fashion-mnist --method rho-loss --set holdout=0.1

Defaults follow the official code (OATML/RHO-Loss), each with an option for the other behaviour:
- `scoring_mode = "train"` (default): candidates are scored with the model in TRAIN mode, BatchNorm
  normalising by the candidate batch's own statistics (MultiModels' `selection_train_mode`, default
  True). The scoring pass runs without gradients and leaves BatchNorm's running statistics alone:
  the trainer restores them after `select` (the official code lets the scoring forward move them;
  here only training steps do, so the model trained is the one a reader expects). "eval": BatchNorm
  from running statistics, as the rest of the online family (benchmarks/kit/online.py), so a score
  does not depend on the other candidates.
- `il_checkpoint = "best"` (default): the irreducible-loss model is the checkpoint, over its training
  epochs, with the lowest loss on data it never trained on (the official train_irreducible.py keeps
  ModelCheckpoint(monitor="val_loss_epoch", mode="min") and scores with best_model_path). The
  official monitor is the loss on the dataset's TEST split (its Lightning "val" loader is the test
  loader); the project never lets the test split choose anything, so the monitor here is the mean
  loss on the TRAINING split, which the IL model never trains on either (it trains on the held-out
  split only) and which is exactly what it scores: epoch e's pass gives epoch e's irreducible losses,
  and those of the best epoch are kept (the first, on a tie: Lightning replaces only on a strict
  improvement). That costs one forward pass over the training set per IL epoch, charged as selection.
  "last": the model after its last epoch, scored by one pass (the project's earlier default).

Decisions:
- The IL model is the protocol's model, trained through the harness's trainer on the held-out split
  (benchmarks.kit.proxies.train_proxy with split="holdout"), following the protocol's schedule for
  `il_epochs` of the protocol's epochs (default: all). Everything it costs (its training, the passes
  that score the training set) is charged as selection. It is cached per (protocol, seed) like a
  score proxy (with il_checkpoint = "best", the chosen losses are cached too), and a cache hit
  charges the FLOPs it cost. Its training resumes after a preemption (benchmarks/kit/proxies.py), the
  monitor's record so far included.
- The IL model never sees an example it scores: the held-out split is disjoint from the training
  split (benchmarks.data.carve_holdout); tests/test_online.py checks every batch it trains on.
- Irreducible losses are computed once per example, un-augmented, in eval mode, as the paper's code
  does (one number per training example, keyed by its index); the training loss is computed per step
  on the augmented candidate (`scoring_mode` above). Both are the training loss, the protocol's label
  smoothing included.
- candidate_factor defaults to 2, as every method of the family here (the paper keeps 10% of a
  larger candidate batch: --param candidate_factor=10 is that setting).
- Tuning: nothing has a search space. candidate_factor and il_epochs set the compute (the compared
  axis), scoring_mode and il_checkpoint follow the official code, and the paper runs one setting of
  them across its datasets. A tuned sweep gives its block `tune = false`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.api import Batch, Method, Param, RunContext, Step, register
from benchmarks.errors import BenchError
from benchmarks.kit.online import CANDIDATE_FACTOR, OnlineSelection, candidate_losses
from benchmarks.kit.proxies import cache_file, cache_key, cached_artefact, per_example_pass, train_proxy

IL_TAG = "rho-irreducible"
SCORING_MODES = ("train", "eval")
IL_CHECKPOINTS = ("best", "last")


def irreducible_losses(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    """The IL model's loss on every training example (eval mode, un-augmented), metered as selection."""
    def losses(model, batch):
        return F.cross_entropy(model(batch.x).float(), batch.y, reduction="none",
                               label_smoothing=ctx.protocol.label_smoothing)

    return per_example_pass(model, ctx, "rho-irreducible-pass", losses).to(ctx.device)


def train_mode_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float,
                      step: Step) -> torch.Tensor:
    """Per-example training loss of the candidates in TRAIN mode (BatchNorm from the batch's own
    statistics), no gradient. It moves BatchNorm's running statistics: the trainer restores them after
    `select` (RhoLoss does not declare select_updates_batchnorm)."""
    was_training = model.training
    model.train()
    try:
        with torch.no_grad(), step.autocast():
            logits = model(x)
    finally:
        model.train(was_training)
    return F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=label_smoothing)


def best_epoch(monitor: list[float]) -> int:
    """0-based index of the lowest monitored loss, the first on a tie (a checkpoint is replaced only by a
    strictly better one, as Lightning's ModelCheckpoint with mode="min")."""
    if not monitor:
        raise ValueError("no monitored epochs to choose from")
    best = 0
    for i, value in enumerate(monitor):
        if value < monitor[best]:
            best = i
    return best


class IrreducibleMonitor(Method):
    """Watches the IL model's training (it is the proxy trainer's method): at the end of every epoch it
    scores the run's TRAINING split with the model (the IL model trains on the held-out split only) and
    keeps the losses of the epoch whose mean is lowest so far (`best_epoch`)."""

    name = "rho-il-monitor"  # names the proxy's partial checkpoint

    def __init__(self, ctx: RunContext):
        super().__init__()
        self.run_ctx = ctx  # the run's context: its training split is what the IL model scores
        self.model: torch.nn.Module | None = None
        self.monitor: list[float] = []  # mean loss on the training split after each epoch
        self.best: torch.Tensor | None = None  # the losses of the best epoch so far (CPU)

    def after_step(self, model: torch.nn.Module, step: Step) -> None:
        # The trainer hands the model it trains to `select` and `after_step` only; keep it for the
        # epoch-end pass (no computation here).
        self.model = model

    def epoch_info(self, epoch: int) -> dict:
        losses = irreducible_losses(self.model, self.run_ctx)
        mean = float(losses.double().mean())
        self.monitor.append(mean)
        if best_epoch(self.monitor) == len(self.monitor) - 1:
            self.best = losses.cpu()
        return {}

    def state_dict(self) -> dict:
        """The record so far: an IL model stopped mid-training (preemption in `prepare`) resumes with it."""
        return {"monitor": list(self.monitor), "best": self.best.clone() if self.best is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.monitor = list(state["monitor"])
        self.best = state["best"].clone() if state["best"] is not None else None


@register("rho-loss")
class RhoLoss(OnlineSelection):
    """Keep the k of B candidates with the highest training loss minus irreducible loss; the IL model
    is trained on the held-out split (cost charged as selection, cached per protocol and seed)."""

    traits = OnlineSelection.traits.replace(needs_holdout=True)
    params = {
        "candidate_factor": CANDIDATE_FACTOR,
        "il_epochs": Param(-1, "epochs of the protocol's schedule the irreducible-loss model trains "
                               "(-1: all of them)", low=-1),
        "scoring_mode": Param("train", "mode of the candidate scoring pass: train (BatchNorm batch statistics, "
                                       "the official default) or eval (running statistics)", choices=SCORING_MODES),
        "il_checkpoint": Param("best", "which IL model scores: best (the epoch with the lowest loss on the "
                                       "training split, which it never trains on; the official code keeps its "
                                       "best checkpoint) or last", choices=IL_CHECKPOINTS),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.irreducible: torch.Tensor | None = None
        self.il_cached = False
        self.il_stats: dict = {}

    @classmethod
    def check_params(cls, params: dict) -> None:
        if params["il_epochs"] == 0:
            raise BenchError("method 'rho-loss': il_epochs=0 would score with an untrained model; "
                             "use -1 (all the protocol's epochs) or a count >= 1")

    def il_epochs(self, ctx: RunContext) -> int:
        epochs, protocol_epochs = self.hparams["il_epochs"], ctx.protocol.epochs
        return protocol_epochs if epochs == -1 else min(epochs, protocol_epochs)

    def prepare(self, ctx: RunContext) -> None:
        epochs = self.il_epochs(ctx)
        if self.hparams["il_checkpoint"] == "last":
            model, self.il_cached = train_proxy(ctx, 0, epochs, tag=IL_TAG, split="holdout")
            self.irreducible = irreducible_losses(model, ctx)
            return
        key = cache_key(ctx, kind="rho-irreducible-best", epoch=epochs, split_size=len(ctx.data.holdout))
        path = cache_file(ctx, "scores", f"rho-irreducible-best-epoch{epochs}-seed{ctx.seed}")

        def train_the_il_model() -> dict:
            monitor = IrreducibleMonitor(ctx)
            train_proxy(ctx, 0, epochs, method=monitor, tag=IL_TAG, split="holdout")
            return {"losses": monitor.best, "monitor": monitor.monitor}

        cached, self.il_cached = cached_artefact(ctx, path, key, train_the_il_model)
        self.irreducible = cached["losses"].to(ctx.device)
        self.il_stats = {"il_best_epoch": best_epoch(cached["monitor"]) + 1,  # 1-based, as the curve's epochs
                         "il_train_split_loss_by_epoch": list(cached["monitor"])}

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        if self.irreducible is not None:  # prepare's, or a checkpoint's (loaded on the CPU)
            self.irreducible = self.irreducible.to(ctx.device)

    def scores(self, batch: Batch, model: torch.nn.Module, step: Step) -> torch.Tensor:
        losses = train_mode_losses if self.hparams["scoring_mode"] == "train" else candidate_losses
        training = losses(model, batch.x, batch.y, self.ctx.protocol.label_smoothing, step)
        return training - self.irreducible[batch.index]

    def summary(self) -> dict:
        il = self.irreducible
        return {"scores_cached": self.il_cached, "il_epochs": self.il_epochs(self.ctx),
                "irreducible_loss_mean": float(il.mean()) if il is not None else None, **self.il_stats}

    def state_dict(self) -> dict:  # a resumed run does not call prepare: the losses travel in the checkpoint
        return {"irreducible": self.irreducible.cpu() if self.irreducible is not None else None,
                "il_cached": self.il_cached, "il_stats": dict(self.il_stats)}

    def load_state_dict(self, state: dict) -> None:
        self.irreducible = state["irreducible"]  # moved to the device by setup
        self.il_cached = state["il_cached"]
        self.il_stats = dict(state.get("il_stats", {}))
