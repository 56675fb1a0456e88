"""InfoBatch (Qin et al., ICLR 2024): skip part of the well-learned examples each epoch, rescale the rest.

Algorithm, once per epoch, from a score table that holds each example's latest training loss:
  1. "well learned" = score strictly below the mean score;
  2. skip each well-learned example with probability `prune_ratio`; keep all the others;
  3. weight the kept well-learned examples by 1/(1 - prune_ratio), everything else by 1, so the
     weighted loss is an unbiased estimate of the full-data loss;
  4. anneal: from epoch floor(delta * epochs) on (0-based), train on the full data with weight 1.

Use: `python -m benchmarks run --protocol infobatch-cifar100 --method infobatch --param prune_ratio=0.5`.
It works through `plan_epoch` and `observe` only (`setup` puts the score table on the device: a
fresh one, or the checkpoint's); nothing in torch is patched.

Decisions, and the known pitfalls of the reference code they avoid:
- `prune_ratio` is NOT the share of the dataset skipped (only below-mean examples are candidates):
  the realised share is reported per epoch (`pruned_share` in the curve) and overall in `summary()`.
- prune_ratio above 0.9 acts as 0.9, as in the reference code, which keeps at least a tenth of the
  well-learned examples (its keep ratio is max(0.1, 1 - prune_ratio)): r = 0.99 skips each with
  probability 0.9 and weights the kept ones by 10, not by 100 (`effective_prune_ratio`; the record's
  `summary()` names the ratio used).
- Each well-learned example is skipped by an independent draw (the paper's analysis), not a fixed
  floor((1-r) * n) count as in the reference code: the 1/(1-r) weight is then exactly unbiased, and
  the realised count differs from the fixed one by O(sqrt(n)) examples.
- Annealing follows the reference code exactly: its sampler is reset once when it is built and
  once at the start of every epoch, and a reset prunes iff its running count is <= delta * epochs;
  so epoch e (0-based) prunes iff e + 1 <= delta * epochs, i.e. the first floor(delta * epochs)
  epochs prune. 90 epochs at delta 0.875 (78.75) prune 78 epochs and train the last 12 on full data;
  200 epochs prune 175; the 3-epoch smoke protocol prunes 2 and anneals in its last. The product is
  taken in float64 as the reference does, so a product just below a whole number counts as that
  reference counts it (0.29 * 100 = 28.999999999999996: 28 epochs). (An earlier version pruned
  ceil(delta * epochs) epochs, one more whenever delta * epochs is not whole.) Epochs count the
  protocol's epochs (ctx.protocol.epochs), i.e. the main run's.
- Ties: the mean is computed in float64 over the float32 table. A float64 sum of up to 2^29 equal
  float32 values is exact, so when all scores are equal (the start: all 3.0) the mean equals them
  exactly and nothing is "strictly below": epoch 0 trains on the full data. Examples exactly at the
  mean are kept with weight 1.
- The learning-rate schedule cannot go stale when pruning shortens an epoch: the trainer sets the lr
  from fractional epoch progress computed from each epoch's true step count
  (benchmarks.core.optim.lr_at), not from a scheduler built for the full-data step count, so a pruned run
  still reaches the schedule's final value (tests/test_infobatch.py checks this).
- Under budget = "iterations" the trainer refills every epoch to the full example count, so
  InfoBatch saves nothing there; its protocols use budget = "epochs".
- Tuning: nothing has a search space. prune_ratio and delta set how much compute is saved, the
  axis a table compares (as a subset's fraction); tuned on validation accuracy they would drift to
  the least pruning. A tuned sweep gives InfoBatch's block `tune = false`, or fixes them with its grid.

Multi-GPU: the epoch plan is a pure function of (score table, epoch, run seed): the random draws come
from ctx.generator("infobatch", epoch) and nothing else (no global RNG), and the mean is computed on
the CPU in float64. So every rank makes the identical decision PROVIDED every rank holds the same
table: under data parallelism each rank sees only its shard of a batch, so the per-step (index, loss)
pairs must be all-gathered across ranks before `observe` writes them into the table (the trainer is
single-process today, so `observe` sees the whole batch).
"""

from __future__ import annotations

import math

import torch

from benchmarks.api import EpochPlan, Method, Param, StepInfo, Traits, register

INITIAL_SCORE = 3.0  # every example starts "not well learned" until its loss has been seen
MAX_PRUNE_RATIO = 0.9  # the reference keeps at least 10% of the well-learned examples


def effective_prune_ratio(prune_ratio: float) -> float:
    """The ratio the reference code applies: prune_ratio capped at 0.9 (its keep ratio is max(0.1, 1 - r)).

    min() rather than 1 - max(0.1, 1 - r), so that every r <= 0.9 is used exactly as given.
    """
    return min(prune_ratio, MAX_PRUNE_RATIO)


def prune_epochs(delta: float, epochs: int) -> int:
    """The number of leading epochs that prune: epoch e prunes iff e + 1 <= delta * epochs (the reference)."""
    return min(epochs, math.floor(delta * epochs))


def plan_from_scores(scores: torch.Tensor, prune_ratio: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """One pruning epoch's decision: (kept indices, their weights, number skipped, number well learned).

    A pure function of its inputs; `scores` is the CPU score table. A prune_ratio above 0.9 acts as 0.9
    (`effective_prune_ratio`).
    """
    prune_ratio = effective_prune_ratio(prune_ratio)
    scores = scores.double()  # see the module docstring: all-equal scores give an exact mean
    well_learned = scores < scores.mean()
    # One draw per example, whether or not it is a candidate, so an example's draw does not depend on
    # how many others are below the mean.
    skip = well_learned & (torch.rand(len(scores), generator=generator, dtype=torch.float64) < prune_ratio)
    kept = (~skip).nonzero().flatten()
    weights = torch.ones(len(kept), dtype=torch.float32)
    weights[well_learned[kept]] = 1.0 / (1.0 - prune_ratio)
    return kept, weights, int(skip.sum()), int(well_learned.sum())


@register("infobatch")
class InfoBatch(Method):
    """Skip a random share prune_ratio of the below-mean-loss examples per epoch, reweight the rest; anneal."""

    traits = Traits(headline_params=("prune_ratio",))
    params = {
        "prune_ratio": Param(0.5, "probability of skipping each below-mean-loss example in an epoch; above 0.9 "
                                  "it acts as 0.9 (the reference code keeps at least 10% of them)",
                             low=0.0, high=1.0, high_open=True),
        "delta": Param(0.875, "share of the epochs that prune; the rest train on the full data",
                       low=0.0, high=1.0),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.scores: torch.Tensor | None = None  # latest loss per example, on the training device after setup
        self.skipped: dict[int, int] = {}  # epoch -> examples skipped (keyed, so re-planning an epoch is harmless)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        # A fresh run starts from the initial table; a resumed one from its checkpoint's (loaded on the CPU).
        if self.scores is None:
            self.scores = torch.full((ctx.num_train,), INITIAL_SCORE)
        self.scores = self.scores.to(ctx.device)

    def plan_epoch(self, epoch: int) -> EpochPlan:
        n = self.ctx.num_train
        if epoch >= prune_epochs(self.hparams["delta"], self.ctx.protocol.epochs):
            self.skipped[epoch] = 0
            return EpochPlan(torch.arange(n), info={"pruned_share": 0.0})
        kept, weights, n_skipped, n_well = plan_from_scores(
            self.scores.cpu(), self.hparams["prune_ratio"], self.ctx.generator("infobatch", epoch))
        self.skipped[epoch] = n_skipped
        return EpochPlan(kept, weights, info={"pruned_share": n_skipped / n, "well_learned_share": n_well / n})

    def observe(self, step: StepInfo) -> None:
        # The raw (unweighted) per-example loss, written on the device: no host sync per step.
        self.scores[step.index] = step.loss.float()

    def summary(self) -> dict:
        saved = sum(self.skipped.values())
        planned = self.ctx.num_train * len(self.skipped)
        return {"saved_passes": saved,  # examples skipped over all epochs: each is one forward + backward
                "pruned_share": saved / planned if planned else 0.0,
                "prune_epochs": prune_epochs(self.hparams["delta"], self.ctx.protocol.epochs),
                "effective_prune_ratio": effective_prune_ratio(self.hparams["prune_ratio"])}

    def state_dict(self) -> dict:
        scores = self.scores.detach().cpu().clone() if self.scores is not None else None  # None: before setup
        return {"scores": scores, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].clone() if state["scores"] is not None else None
        self.skipped = dict(state["skipped"])
