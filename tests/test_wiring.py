"""The joints between kernels and the trainer, each checked by a test that fails on the wrong program:

- InfoBatch's loss weights reach the loss, aligned with the shuffled order (not dropped, not misplaced);
- score runs start from different initialisations (and the same run reproduces);
- forgetting, end to end, over several epochs where events happen, against a count from the logged steps;
- selection FLOPs of el2n, grand, forgetting and kcenter on `smoke` against totals derived by hand from
  the tiny CNN's layers (no code shared with the meter or the methods).
(CCS's parameters reaching the selection: tests/test_ccs.py, test_ccs_method_passes_*.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_scores import smoke_ctx

from benchmarks.api import Method, StepInfo
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.core.train import Trainer
from benchmarks.kit.proxies import train_proxy
from benchmarks.kit.scoring import DynamicsRecorders, compute_scores
from conftest import quiet
from methods.infobatch import InfoBatch

# -- InfoBatch weights through the trainer ---------------------------------------------------------


class WeightSpy(InfoBatch):
    """InfoBatch whose objective notes, per step, d(batch loss)/d(example loss): weight_i / batch size."""

    def __init__(self, **params):
        super().__init__(**params)
        self.plans, self.seen = {}, []

    def plan_epoch(self, epoch):
        plan = super().plan_epoch(epoch)
        weights = plan.weights if plan.weights is not None else torch.ones(len(plan.indices))
        self.plans[epoch] = dict(zip(plan.indices.tolist(), weights.tolist()))
        return plan

    def objective(self, model, batch):
        logits = model(batch.x)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        index, epoch = batch.index.clone(), len(self.plans) - 1
        losses.register_hook(lambda grad: self.seen.append((epoch, index, grad.detach().clone())))
        return losses, logits


def test_infobatch_weights_reach_the_loss_aligned_with_the_shuffled_order():
    ctx = smoke_ctx(epochs=3)  # floor(0.875 * 3) = 2 pruning epochs, then one on full data
    method = WeightSpy(prune_ratio=0.5, delta=0.875)
    method.setup(ctx)
    Trainer(ctx, ctx.new_model("main"), method, evaluate=False).fit()
    assert {epoch for epoch, *_ in method.seen} == {0, 1, 2}
    reweighted = 0
    for epoch, index, grad in method.seen:
        expected = torch.tensor([method.plans[epoch][i] for i in index.tolist()])  # by ORIGINAL index
        assert torch.allclose(grad * len(index), expected, atol=1e-6), epoch
        reweighted += int((expected == 2.0).sum())
    assert reweighted > 100  # the pruning epoch really carried weights 1 / (1 - 0.5) into the loss


# -- score runs ------------------------------------------------------------------------------------


def test_score_runs_start_from_different_initialisations():
    ctx = smoke_ctx()
    first, second, again = (train_proxy(ctx, run, 0)[0].state_dict() for run in (0, 1, 0))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # runs differ
    assert all(torch.equal(first[k], again[k]) for k in first)  # a run is reproducible
    # GraNd at initialisation depends on nothing but the initialisation: its runs must differ
    _, info = compute_scores(ctx, "grand", 3, 0)
    per_run = info["per_run"]
    for a in range(3):
        for b in range(a + 1, 3):
            assert (per_run[a] - per_run[b]).abs().mean() > 0.05 * per_run.abs().mean()
    # ... and so must trained proxies' EL2N (different initialisations and data orders)
    _, info = compute_scores(ctx, "el2n", 2, 1)
    assert not torch.allclose(info["per_run"][0], info["per_run"][1], atol=1e-3)


# -- forgetting end to end, where events can happen ------------------------------------------------


class StepLog(Method):
    """Every presentation's outcome, per example, in order (the raw material of a forgetting count)."""

    def __init__(self):
        super().__init__()
        self.outcomes: dict[int, list[bool]] = {}

    def observe(self, step: StepInfo) -> None:
        for i, ok in zip(step.index.tolist(), step.correct.tolist()):
            self.outcomes.setdefault(i, []).append(ok)

    def state_dict(self):
        return {}


def count_forgetting(outcomes: list[bool]) -> int:
    """By hand: correct -> wrong transitions; never correct: the number of presentations."""
    if not any(outcomes):
        return len(outcomes)
    return sum(1 for before, now in zip(outcomes, outcomes[1:]) if before and not now)


def test_forgetting_end_to_end_over_epochs_where_events_happen(tmp_path):
    epochs = 4
    spec = RunSpec("smoke", "forgetting", {"score_runs": 1, "score_epoch": epochs, "fraction": 0.25}, 0,
                   {"epochs": epochs})
    record = execute(spec, tmp_path, log=quiet)
    stats = record["method_stats"]
    # The same proxy run again, logged step by step (the run is deterministic: same seed, same tags).
    ctx = smoke_ctx(epochs=epochs)
    log = StepLog()
    train_proxy(ctx, 0, epochs, method=DynamicsRecorders({"log": log}))
    expected = torch.tensor([count_forgetting(log.outcomes[i]) for i in range(ctx.num_train)], dtype=torch.float32)
    assert all(len(v) == epochs for v in log.outcomes.values())
    learned = torch.tensor([any(log.outcomes[i]) for i in range(ctx.num_train)])
    assert (expected[learned] > 0).sum() > 20  # events really happen in this run (at one epoch they cannot)
    cached, info = compute_scores(build_context(spec.resolve().protocol, 0, log=quiet, cache_dir=tmp_path / "cache"),
                                  "forgetting", 1, epochs)
    assert info["cached"] == [True] and torch.equal(cached, expected)
    # the record's numbers follow from the same counts
    assert stats["unforgettable_share"] == pytest.approx(float((learned & (expected == 0)).float().mean()))
    assert stats["never_learned_share"] == pytest.approx(float((~learned).float().mean()))
    assert stats["kept_score_mean"] > stats["score_mean"]  # the most forgotten were kept


# -- selection FLOPs by hand -----------------------------------------------------------------------
# The smoke protocol's tiny-cnn on 1 x 8 x 8 inputs, 4 classes: conv1 3x3 1->8 (pad 1, no bias) on 8x8,
# BN, ReLU, 2x2 max-pool, conv2 3x3 8->16 on 4x4, BN, ReLU, global average pool, linear 16->4.
# FLOPs are 2 x multiply-adds; BN, ReLU, pooling, softmax and the optimiser count zero (as the papers').
CONV1 = 2 * (8 * 1 * 3 * 3) * (8 * 8)  # 9,216 per example
CONV2 = 2 * (16 * 8 * 3 * 3) * (4 * 4)  # 36,864
HEAD = 2 * 16 * 4  # 128
FORWARD = CONV1 + CONV2 + HEAD  # 46,208
# Autograd's backward: each layer's weight gradient costs its forward; every layer but the first also
# sends a gradient to its input (the first conv's input is the data: no gradient).
TRAIN_STEP = FORWARD + CONV1 + 2 * CONV2 + 2 * HEAD  # 129,408
EMBEDDING = CONV1 + CONV2  # the penultimate features: everything but the head
# GraNd (hooks): the forward; a backward to every layer's OUTPUT only (through the head's and conv2's
# inputs, no weight gradients); then per-example weight-gradient norms: conv1 and conv2 materialise
# G_i A_i^T (2 p d T: p x T output gradient, d x T input patches), which is cheaper than the ghost
# form for both (T d p <= T^2 (d + p)); the head's T = 1 norm is elementwise.
GRAND_PASS = FORWARD + (HEAD + CONV2) + 2 * 8 * 9 * 64 + 2 * 16 * 72 * 16  # 129,280
N = 1024  # smoke's training examples; batch 64 divides it
CLASS_SIZES = (222, 275, 253, 274)  # smoke's training labels
FEATURES = 16


def selection_flops(out, method: str, params: dict, epochs: int = 2) -> tuple[int, dict]:
    record = execute(RunSpec("smoke", method, params, 0, {"epochs": epochs}), out, log=quiet)
    return record["compute"]["selection_flops"], record["compute"]


def test_hand_count_el2n(tmp_path):
    flops, compute = selection_flops(tmp_path, "el2n", {"score_runs": 2, "score_epoch": 1, "fraction": 0.5})
    assert flops == 2 * (1 * N * TRAIN_STEP + N * FORWARD)  # per run: one proxy epoch, one scoring pass
    assert compute["train_flops"] == 2 * (N // 2) * TRAIN_STEP and compute["full_flops"] == 2 * N * TRAIN_STEP


def test_hand_count_grand(tmp_path):
    flops, _ = selection_flops(tmp_path, "grand", {"score_runs": 2, "fraction": 0.5})  # at initialisation: no training
    assert flops == 2 * N * GRAND_PASS


def test_hand_count_forgetting(tmp_path):
    flops, _ = selection_flops(tmp_path, "forgetting", {"score_runs": 2, "fraction": 0.5})  # events over both epochs
    assert flops == 2 * 2 * N * TRAIN_STEP  # the counting itself is elementwise


@pytest.mark.parametrize("class_balanced", [False, True])
def test_hand_count_kcenter(tmp_path, class_balanced):
    flops, _ = selection_flops(tmp_path, "kcenter", {"score_epoch": 1, "fraction": 0.5, "class_balanced": class_balanced})
    # k-center greedy: each pick but the last updates the distances with one matrix-vector product
    # over the group's n embeddings of dimension 16: 2 n d FLOPs.
    if class_balanced:
        # half of 222, 275, 253, 274 is 111, 137.5, 126.5, 137: 511 whole, and the one left over goes
        # to the first of the two equal remainders (class 1): quotas 111, 138, 126, 137
        quotas = (111, 138, 126, 137)
        greedy = sum((q - 1) * 2 * n * FEATURES for q, n in zip(quotas, CLASS_SIZES))
    else:
        greedy = (N // 2 - 1) * 2 * N * FEATURES
    assert flops == 1 * N * TRAIN_STEP + N * EMBEDDING + greedy
