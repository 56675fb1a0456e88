"""AUM (area under the margin): the recorder against hand computations on logged margin sequences, the
shared training-dynamics proxy run (forgetting and AUM from one run, each cached and charged in full),
and resuming a recorder from a partial checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.api import Method, StepInfo
from benchmarks.core.compute import ComputeMeter
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.train import RunContext
from benchmarks.data import load_data
from benchmarks.kit.proxies import train_proxy
from benchmarks.kit.scoring import SCORE_KINDS, DynamicsRecorders, compute_scores, select_by_scores
from conftest import quiet
from methods.aum import MarginRecorder, assigned_margins
from methods.forgetting import ForgettingCounter

LABELS = torch.tensor([1, 2, 0])
# (indices, logits) per training step, 3 classes. Margin = logit of the label - the largest other logit.
STEPS = [
    ([0, 1], [[2.0, 1.0, 0.0],    # example 0, label 1: 1 - 2 = -1
              [0.0, 0.0, 5.0]]),  # example 1, label 2: 5 - 0 = 5
    ([1, 0], [[1.0, 4.0, 2.0],    # example 1: 2 - 4 = -2
              [0.0, 3.0, 1.0]]),  # example 0: 3 - 1 = 2
    ([1], [[0.0, 1.0, 1.0]]),     # example 1: 1 - 1 = 0 (a tie with another class)
    ([2], [[-1.0, -3.0, -0.5]]),  # example 2, label 0: -1 - (-0.5) = -0.5
]
EXPECTED_AUM = [(-1 + 2) / 2, (5 - 2 + 0) / 3, -0.5]


def feed(recorder: Method, steps=STEPS) -> None:
    for step, (index, logits) in enumerate(steps, 1):
        logits = torch.tensor(logits)
        recorder.observe(StepInfo(epoch=0, step=step, index=torch.tensor(index), loss=torch.zeros(len(index)),
                                  correct=logits.argmax(1) == LABELS[index], logits=logits))


def test_aum_is_the_mean_logit_margin_over_presentations():
    recorder = MarginRecorder(LABELS)
    feed(recorder)
    assert recorder.scores().tolist() == pytest.approx(EXPECTED_AUM)
    assert recorder.presentations.tolist() == [2, 3, 1]
    assert recorder.stats() == {"presentations": 3, "negative_aum_share": pytest.approx(1 / 3)}


def test_aum_softmax_is_the_mean_probability_margin():
    def probabilities(row):
        exps = [math.exp(v) for v in row]
        return [e / sum(exps) for e in exps]

    margins: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for index, logits in STEPS:  # by hand: softmax of each row, the label's probability minus the largest other
        for i, row in zip(index, logits):
            p = probabilities(row)
            label = int(LABELS[i])
            margins[i].append(p[label] - max(v for c, v in enumerate(p) if c != label))
    recorder = MarginRecorder(LABELS, softmax=True)
    feed(recorder)
    assert recorder.scores().tolist() == pytest.approx([sum(m) / len(m) for m in margins.values()], abs=1e-6)


def test_assigned_margins_with_ties_and_large_values():
    logits = torch.tensor([[3.0, 3.0, 1.0], [1e6, -1e6, 0.0]])
    assert assigned_margins(logits, torch.tensor([0, 1])).tolist() == [0.0, -2e6]


def test_low_aum_is_hard():
    scores = torch.tensor(EXPECTED_AUM)
    assert not SCORE_KINDS["aum"].higher_is_harder
    hardest = select_by_scores(scores, 1 / 3, generator=torch.Generator(), higher_is_harder=False)
    assert hardest.tolist() == [2]  # the lowest AUM
    easiest = select_by_scores(scores, 1 / 3, mode="easiest", generator=torch.Generator(), higher_is_harder=False)
    assert easiest.tolist() == [1]


def test_recorder_state_round_trip_resumes_the_sums():
    whole = MarginRecorder(LABELS)
    feed(whole)
    first = MarginRecorder(LABELS)
    feed(first, STEPS[:2])
    resumed = MarginRecorder(LABELS)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, STEPS[2:])
    assert torch.equal(resumed.scores(), whole.scores())
    counter = ForgettingCounter(3)
    feed(counter, STEPS[:2])
    restored = ForgettingCounter(3)
    restored.load_state_dict(counter.state_dict())
    assert all(torch.equal(getattr(restored, k), getattr(counter, k)) for k in counter.state_dict())


def smoke_ctx(cache_dir=None, seed: int = 0, **overrides) -> RunContext:
    protocol = apply_overrides(load_protocol("smoke"), overrides)
    data = load_data(protocol.dataset, None, protocol.data_kwargs)
    return RunContext(protocol, data, torch.device("cpu"), ComputeMeter(), seed=seed, log=quiet, cache_dir=cache_dir)


def test_one_proxy_run_records_forgetting_and_aum_and_charges_each_in_full(tmp_path):
    first = smoke_ctx(tmp_path, epochs=2)
    aum, info = compute_scores(first, "aum", 1, 2)
    assert not info["cached"][0]
    spent = first.meter.flops["selection"]
    second = smoke_ctx(tmp_path, epochs=2)
    forgetting, info = compute_scores(second, "forgetting", 1, 2)
    assert info["cached"][0]  # recorded by the AUM run
    assert second.meter.flops["selection"] == spent > 0  # charged what the run cost, as if computed alone
    # ... and the same numbers as a proxy run that watches alone (a proxy's training ignores its observers)
    alone = smoke_ctx(None, epochs=2)
    counter, recorder = ForgettingCounter(alone.num_train), MarginRecorder(alone.data.train.labels)
    train_proxy(alone, 0, 2, method=DynamicsRecorders({"forgetting": counter}))
    train_proxy(alone, 0, 2, method=DynamicsRecorders({"aum": recorder}))
    assert torch.equal(forgetting, counter.scores()) and torch.allclose(aum, recorder.scores())
    assert alone.meter.flops["selection"] == 2 * spent


def test_aum_method_keeps_the_lowest_aum_end_to_end(tmp_path):
    from benchmarks.core.run import RunSpec, execute

    record = execute(RunSpec("smoke", "aum", {"score_runs": 1, "fraction": 0.25}, 0, {"epochs": 2}), tmp_path,
                     log=quiet)
    stats = record["method_stats"]
    assert record["status"] == "complete" and stats["score"] == "aum" and stats["score_epoch"] == 2
    assert stats["kept_score_mean"] < stats["score_mean"]  # the hard end: low margins
    with pytest.raises(Exception, match="score_epoch must be >= 1"):
        create_method("aum", score_epoch=0).resolved_epoch(load_protocol("smoke"))
