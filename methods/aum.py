"""Area under the margin (AUM; Pleiss, Zhang, Elenberg, Weinberger, NeurIPS 2020), a training-dynamics score.

At every presentation of an example inside a training minibatch (train mode, augmented, before the
optimiser step: StepInfo.logits), its margin is the logit of the assigned class minus the largest
other logit. AUM is the margin averaged over the example's presentations during `score_epoch`
epochs of proxy training (default -1: all of the protocol's epochs, as CCS's scores come from a
whole training run). A LOW AUM is hard (mislabelled or ambiguous): the score kind says so
(`higher_is_harder=False`), so mode "hardest" keeps the lowest AUM and CCS drops the lowest first.

Two kinds, both recorded by the same proxy run as forgetting events (benchmarks/kit/scoring.py):
- aum: the margin of the logits, averaged (Pleiss et al., eq. 1-2). CCS's default score.
- aum-softmax: the margin of the softmax probabilities, averaged. The CCS code
  (generate_importance_score.py, 'accumulated_margin') accumulates this one, summed over the logged
  steps; with one presentation per epoch the sum is the mean times the epoch count, which changes
  neither the ranking nor the CCS bins (they scale with the scores), so the mean is stored.
The two rank examples differently (a softmax margin saturates at +-1); the CCS paper names AUM.

Use: `python -m benchmarks run --protocol fashion-mnist --method ccs --param fraction=0.3` (CCS by
AUM), `--method aum --param fraction=0.5` (keep the lowest AUM), or export them with
`python -m benchmarks scores --protocol fashion-mnist --score aum --score-runs 2 --out aum.csv`.

Decisions: margins are accumulated in float64 on the training device without host syncs; an example
assumed to appear at most once per minibatch (true of the proxy's full-data epochs); an example never
presented scores 0 (proxies visit every example, so this does not happen in a run).
"""

from __future__ import annotations

import torch

from benchmarks.api import Method, StepInfo, register
from benchmarks.kit.scoring import ScoreKind, ScoreSelection, epoch_param, register_score_kind, score_params


def assigned_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the value at the label minus the largest value at any other class."""
    assigned = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return assigned - others.max(1).values


class MarginRecorder(Method):
    """Accumulates each example's margin at every presentation, from the trainer's `observe` calls."""

    name = "aum-recorder"

    def __init__(self, labels: torch.Tensor, softmax: bool = False):
        super().__init__()
        self.labels = labels
        self.softmax = softmax
        self.margin_sum = torch.zeros(len(labels), dtype=torch.float64)
        self.presentations = torch.zeros(len(labels), dtype=torch.long)

    def observe(self, step: StepInfo) -> None:
        index = step.index
        if self.margin_sum.device != index.device:
            self.labels, self.margin_sum, self.presentations = (
                t.to(index.device) for t in (self.labels, self.margin_sum, self.presentations))
        values = step.logits.float()
        if self.softmax:
            values = values.softmax(1)
        self.margin_sum[index] += assigned_margins(values, self.labels[index]).double()
        self.presentations[index] += 1

    def scores(self) -> torch.Tensor:
        """AUM per example: the mean margin over its presentations."""
        return (self.margin_sum / self.presentations.clamp_min(1)).cpu().float()

    def stats(self) -> dict:
        scores = self.scores()
        return {"presentations": int(self.presentations.max().item()),
                "negative_aum_share": (scores < 0).float().mean().item()}

    def state_dict(self) -> dict:  # a proxy stopped mid-training resumes with its sums
        return {"margin_sum": self.margin_sum.cpu().clone(), "presentations": self.presentations.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.margin_sum = state["margin_sum"].clone()
        self.presentations = state["presentations"].clone()


def all_epochs(epochs: int) -> int:
    return epochs


register_score_kind("aum", ScoreKind(observer=lambda ctx: MarginRecorder(ctx.data.train.labels),
                                     auto_epoch=all_epochs, higher_is_harder=False))
register_score_kind("aum-softmax", ScoreKind(observer=lambda ctx: MarginRecorder(ctx.data.train.labels, softmax=True),
                                             auto_epoch=all_epochs, higher_is_harder=False))

AUM_EPOCH = epoch_param(-1, "proxy epochs over which margins are averaged; -1 = all the protocol's")


@register("aum")
class AUM(ScoreSelection):
    """Keep examples by area under the margin of proxy runs (Pleiss et al. 2020); mode hardest keeps the lowest."""

    score_kind = "aum"
    params = score_params(AUM_EPOCH, score_runs=1)  # Pleiss et al. record the margins of one training run

    def extra_stats(self, extra: list[dict]) -> dict:
        return {"negative_aum_share": sum(e["negative_aum_share"] for e in extra) / len(extra)}
