"""Forgetting events: the counter against hand-written presentation sequences, and through the trainer."""

from __future__ import annotations

import pytest
import torch

from benchmarks.api import StepInfo
from benchmarks.core.compute import ComputeMeter
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.train import RunContext
from benchmarks.data import load_data
from benchmarks.errors import BenchError
from benchmarks.kit.proxies import train_proxy
from benchmarks.kit.scoring import select_by_scores
from conftest import quiet
from methods.forgetting import ForgettingCounter

C, W = True, False  # correct, wrong
# example -> its outcome at each presentation, in order
SEQUENCES = {
    0: [C, C, C, C],  # unforgettable: learned, never forgotten -> 0
    1: [W, W, W, W],  # never learned -> the most forgettable of all
    2: [C, W, C, W],  # 2 events
    3: [W, C, W, C],  # 1 event (the first presentation has no predecessor)
    4: [C, W, W, C],  # 1 event (staying wrong is not a new event)
    5: [W, C],  # presented twice only: 0 events
    6: [C, W],  # presented twice only: 1 event
}
EXPECTED_EVENTS = {0: 0, 2: 2, 3: 1, 4: 1, 5: 0, 6: 1}


def feed(counter: ForgettingCounter, sequences: dict, seed: int = 0) -> None:
    """Present the examples in shuffled minibatches of varying size, each example at most once per step."""
    g = torch.Generator().manual_seed(seed)
    position = dict.fromkeys(sequences, 0)
    step = 0
    while any(position[i] < len(s) for i, s in sequences.items()):
        pending = [i for i, s in sequences.items() if position[i] < len(s)]
        batch = [pending[j] for j in torch.randperm(len(pending), generator=g).tolist()]
        batch = batch[:max(1, int(torch.randint(1, len(batch) + 1, (1,), generator=g)))]
        correct = torch.tensor([sequences[i][position[i]] for i in batch])
        for i in batch:
            position[i] += 1
        step += 1
        n = len(batch)
        counter.observe(StepInfo(epoch=0, step=step, index=torch.tensor(batch), loss=torch.zeros(n),
                                 correct=correct, logits=torch.zeros(n, 3)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_match_hand_written_sequences(seed):
    counter = ForgettingCounter(len(SEQUENCES) + 1)  # example 7 is never presented
    feed(counter, SEQUENCES, seed)
    scores = counter.scores()
    for i, events in EXPECTED_EVENTS.items():
        assert scores[i].item() == events, i
    assert scores[1].item() == 4  # never learned: the largest presentation count, as the official code
    learned = [i for i in EXPECTED_EVENTS]
    assert scores[1] > scores[learned].max()  # strictly above every learned example
    assert counter.presentations[:7].tolist() == [len(SEQUENCES[i]) for i in range(7)]
    stats = counter.stats()
    assert stats["unforgettable_share"] == pytest.approx(2 / 8)  # examples 0 and 5
    assert stats["never_learned_share"] == pytest.approx(2 / 8)  # example 1, and 7 (never presented)
    assert stats["presentations"] == 4


def test_never_learned_are_kept_first_by_mode_hardest():
    counter = ForgettingCounter(len(SEQUENCES))
    feed(counter, SEQUENCES)
    kept = select_by_scores(counter.scores(), 2 / 7, generator=torch.Generator())
    assert kept.tolist() == [1, 2]  # never learned, then the most forgotten


def test_counter_sees_every_example_once_per_proxy_epoch():
    protocol = apply_overrides(load_protocol("smoke"), {"epochs": 2})
    ctx = RunContext(protocol, load_data("synthetic"), torch.device("cpu"), ComputeMeter(), seed=0, log=quiet)
    counter = ForgettingCounter(ctx.num_train)
    train_proxy(ctx, 0, 2, method=counter)
    assert (counter.presentations == 2).all()
    scores = counter.scores()
    assert set(scores.unique().tolist()) <= {0.0, 1.0, 2.0}
    assert counter.learned.float().mean() > 0.5  # the proxy learns most of the synthetic data


def test_forgetting_needs_at_least_one_epoch():
    protocol = load_protocol("smoke")
    with pytest.raises(BenchError, match="score_epoch must be >= 1"):
        create_method("forgetting", score_epoch=0).resolved_epoch(protocol)
    assert create_method("forgetting").resolved_epoch(protocol) == protocol.epochs  # default: the whole training
