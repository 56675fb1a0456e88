"""Forgetting events (Toneva et al., ICLR 2019): keep the examples a proxy run forgets most often.

At every presentation of an example inside a training minibatch (train mode, augmented, before the
optimiser step: StepInfo.correct), record whether it was classified correctly. A forgetting event
is a correct -> incorrect transition between consecutive presentations of the same example.
The score is the number of events over `score_epoch` epochs of proxy training (default -1: all of
the protocol's epochs, as the paper counts over a whole 200-epoch training), averaged over
`score_runs` proxy runs; then the shared selection of benchmarks/kit/scoring.py (mode "hardest" = keep
the most forgotten, i.e. remove the least forgotten, as the paper).

Never-learned examples (never classified correctly at any presentation) are the most forgettable:
their score is the largest number of presentations of any example in the run (the number of
epochs when every example is seen once per epoch), the official code's convention. That is
strictly above every learned example's count: P presentations hold at most floor(P / 2) events.
(DeepCore and CCS give them 0, the same as unforgettable examples; that is the bug avoided here.)

Use: `python -m benchmarks run --protocol forgetting-cifar10 --method forgetting --param fraction=0.65`.
The counters live on the training device and are updated without host syncs. An example is assumed
to appear at most once per minibatch (true of the proxy's full-data epochs).
"""

from __future__ import annotations

import torch

from benchmarks.api import Method, StepInfo, register
from benchmarks.kit.scoring import ScoreKind, ScoreSelection, epoch_param, register_score_kind, score_params


class ForgettingCounter(Method):
    """Counts presentations and forgetting events per example from the trainer's `observe` calls."""

    name = "forgetting-counter"

    def __init__(self, n: int):
        super().__init__()
        self.presentations = torch.zeros(n, dtype=torch.long)
        self.events = torch.zeros(n, dtype=torch.long)
        self.last_correct = torch.zeros(n, dtype=torch.bool)
        self.learned = torch.zeros(n, dtype=torch.bool)

    def _to(self, device: torch.device) -> None:
        if self.events.device != device:
            for name in COUNTER_STATE:
                setattr(self, name, getattr(self, name).to(device))

    def observe(self, step: StepInfo) -> None:
        index, correct = step.index, step.correct.to(step.index.device)
        self._to(index.device)
        self.events[index] += (self.last_correct[index] & ~correct).long()
        self.last_correct[index] = correct
        self.learned[index] |= correct
        self.presentations[index] += 1

    def scores(self) -> torch.Tensor:
        """Forgetting events per example; never-learned examples get the largest presentation count."""
        scores = self.events.cpu().float()
        never = ~self.learned.cpu()
        scores[never] = float(self.presentations.max().item())
        return scores

    def stats(self) -> dict:
        learned = self.learned.cpu()
        return {"presentations": int(self.presentations.max().item()),
                "never_learned_share": (~learned).float().mean().item(),
                "unforgettable_share": (learned & (self.events.cpu() == 0)).float().mean().item()}

    def state_dict(self) -> dict:
        """The counts so far: a proxy stopped mid-run (preemption in `prepare`) resumes with them."""
        return {name: getattr(self, name).cpu().clone() for name in COUNTER_STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in COUNTER_STATE:
            setattr(self, name, state[name].clone())


COUNTER_STATE = ("presentations", "events", "last_correct", "learned")

# Recorded while the proxy trains, by the same proxy run as the other training-dynamics kinds (AUM).
register_score_kind("forgetting", ScoreKind(observer=lambda ctx: ForgettingCounter(ctx.num_train),
                                            auto_epoch=lambda epochs: epochs))


@register("forgetting")
class Forgetting(ScoreSelection):
    """Keep the most forgotten examples (forgetting events of proxy runs; never learned = most forgotten)."""

    score_kind = "forgetting"
    params = score_params(epoch_param(-1, "proxy epochs over which events are counted; -1 = all the protocol's"))

    def extra_stats(self, extra: list[dict]) -> dict:
        mean = {key: sum(e[key] for e in extra) / len(extra) for key in ("never_learned_share", "unforgettable_share")}
        return {**mean, "presentations": extra[0]["presentations"]}
