"""Online batch selection baselines of the GREATS paper (Wang et al., NeurIPS 2024), in the same mode.

Each draws the same candidate batch of B = batch_size x candidate_factor examples as GREATS and
trains on the same k = batch_size of them (benchmarks/kit/online.py says why, and what the official
code does instead):
- uniform-online: k of the B at random (the control: random batches, paid for with B candidates).
- max-loss: the k with the highest training loss (Loshchilov & Hutter 2015's online batch
  selection by loss; GREATS's "MaxLoss"), one eval-mode forward over B.
- grad-norm: the k with the largest per-example gradient norm over all parameters (Katharopoulos &
  Fleuret 2018's importance signal, kept greedily as in GREATS's "GradNorm"), batched with
  benchmarks/kit/pergrad.py: one eval-mode forward and backward over B plus the per-layer norm products.
Use: python -m benchmarks run --protocol fashion-mnist --method max-loss --set holdout=0.1
(any protocol; the held-out split only matters for comparing with GREATS and RHO-Loss on the same data).
"""

from __future__ import annotations

import torch

from benchmarks.api import Batch, Selection, Step, register
from benchmarks.kit.online import CANDIDATE_FACTOR, OnlineSelection, candidate_losses
from benchmarks.kit.pergrad import per_example_grad_norms


@register("uniform-online")
class UniformOnline(OnlineSelection):
    """k of the B candidates at random, drawn from (run seed, step): the same on every resume."""

    params = {"candidate_factor": CANDIDATE_FACTOR}

    def select(self, batch: Batch, model: torch.nn.Module, step: Step) -> Selection | None:
        k = self.kept(batch)
        if k >= len(batch.y):
            return None
        return Selection(keep=torch.randperm(len(batch.y), generator=self.ctx.generator("uniform-online", step.step))[:k])


@register("max-loss")
class MaxLoss(OnlineSelection):
    """The k candidates with the highest training loss (eval-mode forward)."""

    params = {"candidate_factor": CANDIDATE_FACTOR}

    def scores(self, batch: Batch, model: torch.nn.Module, step: Step) -> torch.Tensor:
        return candidate_losses(model, batch.x, batch.y, self.ctx.protocol.label_smoothing, step)


@register("grad-norm")
class GradNorm(OnlineSelection):
    """The k candidates with the largest gradient norm of their training loss over all parameters."""

    params = {"candidate_factor": CANDIDATE_FACTOR}

    def scores(self, batch: Batch, model: torch.nn.Module, step: Step) -> torch.Tensor:
        with step.autocast():  # per_example_grad_norms switches to eval mode itself, and back
            return per_example_grad_norms(model, batch.x, batch.y,
                                          label_smoothing=self.ctx.protocol.label_smoothing)
