"""What online batch selection methods share: the candidate batch, the scoring rule, keeping the top k.

Online selection (GREATS, RHO-Loss, max-loss, grad-norm, uniform-online): every step the trainer
draws a candidate batch of B = k x `candidate_factor` examples (k = the protocol's batch size) and
the method's `select` keeps k of them to train on. Every method of the family draws the same B and
trains on the same k, so they compare at equal steps and equal examples per step. (The official
GREATS code gives its max-loss, grad-norm and RHO-Loss baselines an un-enlarged batch and keeps half
of it: they then train on half as many examples per step as GREATS. Not here.)

Decisions shared by the family:
- Scoring passes run with BatchNorm in eval mode (running statistics), so an example's score does
  not depend on which other examples share its candidate batch and per-example gradients exist (the
  rule of benchmarks/kit/ghost.py and of GraNd). They do not move BatchNorm statistics either. A method
  whose official code scores otherwise follows its code and says so in its docstring (the trainer
  still restores BatchNorm's running statistics after `select`).
- Scores are of the training loss as the trainer computes it (the protocol's label smoothing
  included), on the candidate batch as it will be trained (augmented).
- The candidate batch of an epoch's last step may be short: it keeps ceil(n / candidate_factor).
- Ties in a top-k keep the earlier candidate (a stable sort), so a selection is a pure function of
  the scores.
Cost: everything `select` runs is metered as selection by the trainer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from benchmarks.api import Batch, Method, Param, Selection, Step, Traits

CANDIDATE_FACTOR = Param(2, "candidate batch = batch_size x this; train on the best batch_size of it", low=1)


def kept_count(n_candidates: int, factor: int) -> int:
    """How many of n candidates a step trains on: ceil(n / factor)."""
    return -(-n_candidates // factor)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k highest scores, highest first; ties keep the earlier position."""
    return torch.sort(scores.detach().float(), descending=True, stable=True).indices[:k]  # on the device: no sync


@contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for a scoring pass (BatchNorm from running statistics), the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def candidate_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float,
                     step: Step) -> torch.Tensor:
    """Per-example training loss of the candidates, eval mode, no gradient."""
    with scoring_mode(model), torch.no_grad(), step.autocast():
        logits = model(x)
    return F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=label_smoothing)


class OnlineSelection(Method):
    """Base of the family: candidate batches of k x candidate_factor, keep k by `scores` (highest first).

    A subclass defines `scores(batch, model, step)`, or overrides `select` for a rule that is not a
    top-k of per-example scores (GREATS's greedy pick).
    """

    # A subclass's params hold "candidate_factor" (CANDIDATE_FACTOR): the trainer's candidate batch follows it.
    traits = Traits(candidate_factor="candidate_factor", headline_params=("candidate_factor",))

    def kept(self, batch: Batch) -> int:
        return kept_count(len(batch.y), self.candidate_factor())

    def scores(self, batch: Batch, model: torch.nn.Module, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def select(self, batch: Batch, model: torch.nn.Module, step: Step) -> Selection | None:
        k = self.kept(batch)
        if k >= len(batch.y):
            return None
        return Selection(keep=top_k(self.scores(batch, model, step), k))
