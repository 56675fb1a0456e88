"""InfoBatch: the per-epoch decision against a brute-force reference, its statistics, state and a run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks.api import StepInfo
from benchmarks.core.compute import ComputeMeter
from benchmarks.core.context import derive_seed
from benchmarks.core.optim import lr_at
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, execute
from benchmarks.core.train import RunContext, Trainer
from benchmarks.data import load_data
from methods.infobatch import InfoBatch, plan_from_scores, prune_epochs


def fake_ctx(n: int, epochs: int = 8, seed: int = 0):
    """What InfoBatch reads from a RunContext, without data or a model."""
    return SimpleNamespace(num_train=n, protocol=SimpleNamespace(epochs=epochs), device=torch.device("cpu"),
                           generator=lambda *tags: torch.Generator().manual_seed(derive_seed(seed, *tags)))


def method_with(scores, epochs: int = 8, seed: int = 0, **params) -> InfoBatch:
    method = create_method("infobatch", **params)
    method.load_state_dict({"scores": torch.as_tensor(scores, dtype=torch.float32), "skipped": {}})
    method.setup(fake_ctx(len(scores), epochs, seed))
    return method


def brute_force(scores: list[float], r: float, seed: int) -> tuple[list[int], list[float]]:
    """The kept indices and weights, one example at a time.

    Shares one convention with the implementation: example i is skipped iff it is below the mean and
    the i-th of N float64 uniforms from the seeded generator is < r.
    """
    mean = math.fsum(scores) / len(scores)
    u = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    kept, weights = [], []
    for i, s in enumerate(scores):
        if s < mean and u[i] < r:
            continue
        kept.append(i)
        weights.append(1 / (1 - r) if s < mean else 1.0)
    return kept, weights


# 0..100 shuffled: the mean is exactly 50, one example sits exactly at it (kept, weight 1), 50 are below.
SCORES = torch.randperm(101, generator=torch.Generator().manual_seed(1)).float().tolist()


@pytest.mark.parametrize("r", [0.3, 0.5, 0.7])
def test_plan_matches_brute_force(r):
    for seed in range(5):
        kept, weights, n_skipped, n_well = plan_from_scores(torch.tensor(SCORES), r,
                                                            torch.Generator().manual_seed(seed))
        ref_kept, ref_weights = brute_force(SCORES, r, seed)
        assert kept.tolist() == ref_kept
        assert weights.tolist() == pytest.approx(ref_weights, rel=1e-6)
        assert n_skipped == len(SCORES) - len(ref_kept)
        assert n_well == 50
        assert SCORES.index(50.0) in kept.tolist()


@pytest.mark.parametrize("r", [0.95, 0.99])
def test_prune_ratio_above_09_acts_as_09_as_in_the_reference(r):
    # The reference keeps max(0.1, 1 - r) of the well-learned examples: r = 0.99 skips each with
    # probability 0.9 and weights the kept ones by 10 (not 100).
    for seed in range(5):
        kept, weights, n_skipped, _ = plan_from_scores(torch.tensor(SCORES), r, torch.Generator().manual_seed(seed))
        ref_kept, ref_weights = brute_force(SCORES, 0.9, seed)
        assert kept.tolist() == ref_kept and n_skipped == len(SCORES) - len(ref_kept)
        assert weights.tolist() == pytest.approx(ref_weights, rel=1e-6)
        assert float(weights.max()) == pytest.approx(10.0) and len(ref_kept) > len(SCORES) - 50
    # ... and the test can tell: the uncapped rule skips more and weights by 1 / (1 - r).
    uncapped, _ = brute_force(SCORES, r, 0)
    assert len(uncapped) < len(plan_from_scores(torch.tensor(SCORES), r, torch.Generator().manual_seed(0))[0])
    assert method_with(SCORES, prune_ratio=r).summary()["effective_prune_ratio"] == 0.9
    assert method_with(SCORES, prune_ratio=0.7).summary()["effective_prune_ratio"] == 0.7  # at most 0.9: as given


def test_realised_share_matches_expected_share():
    # Each of the 50 below-mean examples is skipped with probability r: expected share r * 50 / 101.
    r, draws = 0.5, 400
    shares = [plan_from_scores(torch.tensor(SCORES), r, torch.Generator().manual_seed(s))[2] / 101
              for s in range(draws)]
    expected = r * 50 / 101
    std = math.sqrt(50 * r * (1 - r)) / 101  # binomial
    assert abs(sum(shares) / draws - expected) < 4 * std / math.sqrt(draws)


@pytest.mark.parametrize("value,n", [(3.0, 50_000), (0.1, 50_000), (2.3025851, 1_281_167), (1e-7, 7)])
def test_all_equal_scores_prune_nothing(value, n):
    kept, weights, n_skipped, n_well = plan_from_scores(torch.full((n,), value), 0.7,
                                                        torch.Generator().manual_seed(0))
    assert n_skipped == 0 and n_well == 0 and len(kept) == n
    assert bool((weights == 1).all())


def test_first_epoch_trains_on_everything():
    method = create_method("infobatch")
    method.setup(fake_ctx(1000))
    plan = method.plan_epoch(0)  # fresh table: every score is the initial constant
    assert len(plan.indices) == 1000 and plan.info["pruned_share"] == 0.0


def reference_pruning_epochs(delta: float, epochs: int) -> list[int]:
    """Which epochs prune in the reference code (NUS-HPC-AI-Lab/InfoBatch, IBSampler), step by step.

    The sampler resets once when it is built and once when each epoch starts iterating it; a reset
    prunes unless its count of earlier resets exceeds stop_prune = num_epochs * delta.
    """
    stop_prune = epochs * delta
    iterations = 0

    def reset() -> bool:
        nonlocal iterations
        prunes = not iterations > stop_prune
        iterations += 1
        return prunes

    reset()  # IBSampler.__init__
    return [epoch for epoch in range(epochs) if reset()]  # IBSampler.__iter__ at each epoch


GRID = [(delta, epochs) for delta in (0.875, 0.5, 0.07, 0.29, 0.0, 1.0, 0.9, 0.333)
        for epochs in (1, 2, 3, 8, 10, 90, 100, 200)]


@pytest.mark.parametrize("delta,epochs", GRID)
def test_annealing_follows_the_reference_rule(delta, epochs):
    pruning = reference_pruning_epochs(delta, epochs)
    assert pruning == list(range(len(pruning)))  # a leading block of epochs
    assert prune_epochs(delta, epochs) == len(pruning)


@pytest.mark.parametrize("delta,epochs,pruning", [(0.875, 90, 78), (0.875, 200, 175), (0.875, 3, 2),
                                                   (0.875, 8, 7), (0.07, 100, 7), (0.29, 100, 28)])
def test_annealing_examples_from_the_issue(delta, epochs, pruning):
    # 90 epochs: 78 (the earlier ceil rule gave 79); the 3-epoch smoke protocol anneals in its last epoch.
    assert prune_epochs(delta, epochs) == pruning
    method = method_with(SCORES, epochs=epochs, delta=delta, prune_ratio=0.5)
    for epoch in {0, pruning - 1, pruning, epochs - 1} & set(range(epochs)):
        plan = method.plan_epoch(epoch)
        if epoch < pruning:
            assert len(plan.indices) < len(SCORES)  # 50 candidates at r=0.5: never all kept here
            assert plan.weights is not None and float(plan.weights.max()) == 2.0
        else:
            assert plan.indices.tolist() == list(range(len(SCORES))) and plan.weights is None
            assert plan.info["pruned_share"] == 0.0


def test_decision_is_a_pure_function_of_scores_epoch_and_seed():
    # Two "ranks" holding the same table make the same decision; another seed or epoch differs.
    a, b = method_with(SCORES, seed=0), method_with(SCORES, seed=0)
    plan_a, plan_b = a.plan_epoch(3), b.plan_epoch(3)
    assert torch.equal(plan_a.indices, plan_b.indices) and torch.equal(plan_a.weights, plan_b.weights)
    assert torch.equal(a.plan_epoch(3).indices, plan_a.indices)  # re-planning does not advance any RNG
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(b.plan_epoch(3).indices, plan_a.indices)
    assert not torch.equal(method_with(SCORES, seed=1).plan_epoch(3).indices, plan_a.indices)
    assert not torch.equal(a.plan_epoch(4).indices, plan_a.indices)


@pytest.mark.parametrize("r", [0.5, 0.7])
def test_weighted_loss_is_unbiased(r):
    losses = torch.rand(60, generator=torch.Generator().manual_seed(7)) * 3
    n, draws = len(losses), 3000
    estimates = torch.empty(draws, dtype=torch.float64)
    for d in range(draws):
        kept, weights, _, _ = plan_from_scores(losses, r, torch.Generator().manual_seed(d))
        estimates[d] = (weights.double() * losses[kept].double()).sum() / n
    tolerance = 4 * estimates.std() / math.sqrt(draws)  # 4 standard errors of the mean of the draws
    assert abs(estimates.mean() - losses.double().mean()) < tolerance
    # ... and the test can tell: dropping the 1/(1-r) rescaling is biased far beyond that tolerance.
    below = losses.double() < losses.double().mean()
    assert r * losses.double()[below].sum() / n > 10 * tolerance


def test_observe_updates_scores_by_original_index():
    method = method_with([3.0] * 10)
    method.observe(StepInfo(epoch=0, step=1, index=torch.tensor([7, 2]), loss=torch.tensor([0.5, 0.25]),
                            correct=torch.tensor([True, False]), logits=torch.zeros(2, 3)))
    expected = [3.0] * 10
    expected[7], expected[2] = 0.5, 0.25
    assert method.state_dict()["scores"].tolist() == expected


def test_state_dict_round_trip():
    method = method_with(SCORES)
    for epoch in range(3):
        method.plan_epoch(epoch)
    state = method.state_dict()
    method.observe(StepInfo(epoch=3, step=1, index=torch.tensor([0]), loss=torch.tensor([99.0]),
                            correct=torch.tensor([True]), logits=torch.zeros(1, 3)))
    assert state["scores"][0] != 99.0  # the saved state is a copy

    resumed = create_method("infobatch")
    resumed.load_state_dict(state)
    resumed.setup(fake_ctx(len(SCORES)))
    fresh = method_with(SCORES)
    for epoch in range(3):
        fresh.plan_epoch(epoch)
    assert resumed.summary() == fresh.summary() and resumed.summary()["saved_passes"] > 0
    plan_r, plan_f = resumed.plan_epoch(3), fresh.plan_epoch(3)
    assert torch.equal(plan_r.indices, plan_f.indices) and torch.equal(plan_r.weights, plan_f.weights)


def test_smoke_run_charges_only_visited_examples(tmp_path):
    rec = execute(RunSpec("smoke", "infobatch", {"prune_ratio": 0.5}, 0, {"epochs": 4}), tmp_path,
                  log=lambda *a: None, progress=False)
    stats, compute = rec["method_stats"], rec["compute"]
    assert stats["prune_epochs"] == 3 and stats["saved_passes"] > 0  # floor(0.875 * 4)
    assert compute["fraction"] < 1
    assert compute["fraction"] == pytest.approx(1 - stats["pruned_share"], rel=1e-12)
    assert compute["train_examples"] == rec["n_train"] * 4 - stats["saved_passes"]
    shares = [row["pruned_share"] for row in rec["curve"]]
    assert shares[0] == 0.0 and all(s > 0 for s in shares[1:3])  # epoch 0: all scores equal
    assert shares[3] == 0.0  # the last epoch anneals: full data
    assert [row["examples"] for row in rec["curve"]] == [round(rec["n_train"] * (1 - s)) for s in shares]


class LrRecorder(InfoBatch):
    """InfoBatch that also notes the learning rate the trainer used for each step (test only)."""

    def observe(self, step: StepInfo) -> None:
        super().observe(step)
        self.lrs.append((step.epoch, self.optimizer.param_groups[0]["lr"]))


def test_lr_schedule_completes_in_a_pruned_run():
    protocol = apply_overrides(load_protocol("smoke"), {"epochs": 4, "schedule": "onecycle"})
    data = load_data(protocol.dataset, None, protocol.data_kwargs)
    ctx = RunContext(protocol=protocol, data=data, device=torch.device("cpu"), meter=ComputeMeter(),
                     seed=0, log=lambda *a: None)
    method = LrRecorder(prune_ratio=0.7, delta=1.0)
    method.setup(ctx)
    method.lrs = []
    trainer = Trainer(ctx, ctx.new_model("main"), method, evaluate=False)
    method.optimizer = trainer.optimizer
    trainer.fit()

    steps = [sum(1 for e, _ in method.lrs if e == epoch) for epoch in range(4)]
    full_steps = -(-len(data.train) // protocol.batch_size)
    assert steps[0] == full_steps and all(s < full_steps for s in steps[1:])  # pruning shortened epochs
    for epoch in range(4):  # each epoch starts exactly where the schedule says, whatever its length
        first = next(lr for e, lr in method.lrs if e == epoch)
        assert first == pytest.approx(lr_at(protocol, epoch))
    last = method.lrs[-1][1]
    assert last == pytest.approx(lr_at(protocol, 4 - 1 / steps[-1]))
    assert last < 0.01 * protocol.lr  # the anneal reached the bottom of the cycle
    # A scheduler sized for the full-data step count would have stopped far up the curve.
    stale_progress = len(method.lrs) / full_steps
    assert lr_at(protocol, stale_progress) > 10 * last
