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

Decisions:
- The IL model is the protocol's model, trained through the harness's trainer on the held-out split
  (benchmarks.kit.proxies.train_proxy with split="holdout"), following the protocol's schedule for
  `il_epochs` of the protocol's epochs (default: all). Everything it costs (its training, the pass
  that scores the training set) is charged as selection. It is cached per (protocol, seed) like a
  score proxy, and a cache hit charges the FLOPs it cost.
- The IL model never sees an example it scores: the held-out split is disjoint from the training
  split (benchmarks.data.carve_holdout); tests/test_online.py checks every batch it trains on.
- Irreducible losses are computed once, un-augmented, in eval mode, as the paper's code does
  (one number per training example, keyed by its index); the training loss is computed per step on
  the augmented candidate in eval mode (benchmarks/online.py's scoring rule). Both are the training
  loss, the protocol's label smoothing included.
- candidate_factor defaults to 2, as every method of the family here (the paper keeps 10% of a
  larger candidate batch: --param candidate_factor=10 is that setting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.api import Batch, Param, RunContext, Step, register
from benchmarks.errors import BenchError
from benchmarks.kit.online import CANDIDATE_FACTOR, OnlineSelection, candidate_losses
from benchmarks.kit.proxies import per_example_pass, train_proxy

IL_TAG = "rho-irreducible"


def irreducible_losses(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    """The IL model's loss on every training example (eval mode, un-augmented), metered as selection."""
    def losses(model, batch):
        return F.cross_entropy(model(batch.x).float(), batch.y, reduction="none",
                               label_smoothing=ctx.protocol.label_smoothing)

    return per_example_pass(model, ctx, "rho-irreducible-pass", losses).to(ctx.device)


@register("rho-loss")
class RhoLoss(OnlineSelection):
    """Keep the k of B candidates with the highest training loss minus irreducible loss; the IL model
    is trained on the held-out split (cost charged as selection, cached per protocol and seed)."""

    traits = OnlineSelection.traits.replace(needs_holdout=True)
    params = {
        "candidate_factor": CANDIDATE_FACTOR,
        "il_epochs": Param(-1, "epochs of the protocol's schedule the irreducible-loss model trains "
                               "(-1: all of them)", low=-1),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.irreducible: torch.Tensor | None = None
        self.il_cached = False

    @classmethod
    def check_params(cls, params: dict) -> None:
        if params["il_epochs"] == 0:
            raise BenchError("method 'rho-loss': il_epochs=0 would score with an untrained model; "
                             "use -1 (all the protocol's epochs) or a count >= 1")

    def il_epochs(self, ctx: RunContext) -> int:
        epochs, protocol_epochs = self.hparams["il_epochs"], ctx.protocol.epochs
        return protocol_epochs if epochs == -1 else min(epochs, protocol_epochs)

    def prepare(self, ctx: RunContext) -> None:
        model, self.il_cached = train_proxy(ctx, 0, self.il_epochs(ctx), tag=IL_TAG, split="holdout")
        self.irreducible = irreducible_losses(model, ctx)

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        if self.irreducible is not None:  # prepare's, or a checkpoint's (loaded on the CPU)
            self.irreducible = self.irreducible.to(ctx.device)

    def scores(self, batch: Batch, model: torch.nn.Module, step: Step) -> torch.Tensor:
        training = candidate_losses(model, batch.x, batch.y, self.ctx.protocol.label_smoothing, step)
        return training - self.irreducible[batch.index]

    def summary(self) -> dict:
        il = self.irreducible
        return {"scores_cached": self.il_cached, "il_epochs": self.il_epochs(self.ctx),
                "irreducible_loss_mean": float(il.mean()) if il is not None else None}

    def state_dict(self) -> dict:  # a resumed run does not call prepare: the losses travel in the checkpoint
        return {"irreducible": self.irreducible.cpu() if self.irreducible is not None else None,
                "il_cached": self.il_cached}

    def load_state_dict(self, state: dict) -> None:
        self.irreducible = state["irreducible"]  # moved to the device by setup
        self.il_cached = state["il_cached"]
