"""Group robustness: group metrics, checkpoint selection on validation, hidden training group labels,
JTT, Group DRO, the spurious-fashion and Waterbirds data, pretrained weights from a local file."""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch

from baselines.group_dro import GroupDRO, group_balanced_indices, group_mean_losses, update_group_weights
from benchmarks.api import Method, StepInfo
from benchmarks.core import train
from benchmarks.core.evaluation import accuracy, group_metrics
from benchmarks.core.models import create_model
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import register
from benchmarks.core.run import RunSpec, build_context, execute, final_metrics
from benchmarks.data import dataset_has_groups, load_data, search_roots
from benchmarks.data.splits import GroupLabelsHidden, TensorSplit, unhidden_groups
from benchmarks.data.spurious import assign_places, colour_backgrounds, make_spurious_fashion
from benchmarks.errors import BenchError
from benchmarks.reporting.tables import build_sections, markdown_tables
from conftest import quiet
from methods import jtt as jtt_module
from methods.jtt import JTT, EpochErrorLog, error_set, resolve_stage1_epochs, upsampled_indices

GROUPS = "smoke-groups"  # synthetic, 8 groups, a validation split, selection on validation worst-group


def run(out, method, params=None, seed=0, **overrides):
    return execute(RunSpec(GROUPS, method, params or {}, seed, overrides), out, log=quiet)


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """ERM, JTT and Group DRO on smoke-groups, once for the tests that only read their records."""
    out = tmp_path_factory.mktemp("three")
    return out, {m: run(out, m, {"lambda_up": 3} if m == "jtt" else {}) for m in ("full", "jtt", "group-dro")}


# -- group metrics -------------------------------------------------------------------------------


def test_group_metrics_match_hand_computed_values():
    #            group: 0  0  0  0  1  1  2  3  3  3
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    train_counts = torch.tensor([60, 10, 10, 20])
    metrics = group_metrics(correct, groups, 4, train_counts)
    assert metrics["group_acc"] == [0.75, 0.5, 0.0, 1.0]
    assert metrics["worst_group_acc"] == 0.0
    # 0.6 * 0.75 + 0.1 * 0.5 + 0.1 * 0 + 0.2 * 1 = 0.7; the plain average would be 7 / 10 = 0.7 too,
    # so the next case makes them differ.
    assert metrics["adjusted_avg_acc"] == pytest.approx(0.7)


def test_adjusted_average_weights_groups_by_the_train_proportions_not_the_splits():
    correct = torch.tensor([1, 1, 0, 0], dtype=torch.bool)  # group 0: 2/2 right, group 1: 0/2 right
    groups = torch.tensor([0, 0, 1, 1])
    # The split is balanced (plain average 0.5); training was 90% group 0.
    assert group_metrics(correct, groups, 2, torch.tensor([90, 10]))["adjusted_avg_acc"] == pytest.approx(0.9)
    assert group_metrics(correct, groups, 2, torch.tensor([10, 90]))["adjusted_avg_acc"] == pytest.approx(0.1)
    # A group the split lacks has no accuracy and its train weight is renormalised away.
    partial = group_metrics(correct, groups, 3, torch.tensor([45, 5, 50]))
    assert partial["group_acc"] == [1.0, 0.0, None] and partial["adjusted_avg_acc"] == pytest.approx(0.9)


def test_evaluation_reports_group_metrics_with_the_training_group_counts():
    ctx = build_context(load_protocol(GROUPS), 0, log=quiet)
    torch.manual_seed(0)
    model = create_model("tiny-cnn", in_chans=1, num_classes=4).eval()
    metrics = accuracy(model, ctx)
    counts = ctx.data.train_group_counts
    assert counts.tolist() == torch.bincount(unhidden_groups(ctx.data.train), minlength=8).tolist()
    assert counts.sum() == 1024
    for name, split in (("test", ctx.data.test), ("val", ctx.data.val)):
        with torch.no_grad():
            correct = model(split.normalize(split.images)).argmax(1) == split.labels
        by_group = [correct[split.groups == g].double().mean().item() for g in range(8)]
        assert metrics[f"{name}_group_acc"] == pytest.approx(by_group)
        assert metrics[f"{name}_worst_group_acc"] == pytest.approx(min(by_group))
        assert metrics[f"{name}_acc"] == pytest.approx(correct.double().mean().item())
        weights = counts.double() / counts.sum()
        assert metrics[f"{name}_adjusted_avg_acc"] == pytest.approx(sum(w * a for w, a in zip(weights.tolist(), by_group)))


def test_best_val_worst_group_reports_the_test_numbers_of_the_epoch_chosen_on_validation():
    curve = [{"epoch": 1, "test_acc": 0.90, "test_worst_group_acc": 0.80, "val_worst_group_acc": 0.50, "val_acc": 0.9},
             {"epoch": 2, "test_acc": 0.85, "test_worst_group_acc": 0.60, "val_worst_group_acc": 0.70, "val_acc": 0.8},
             {"epoch": 3, "test_acc": 0.95, "test_worst_group_acc": 0.90, "val_worst_group_acc": 0.65, "val_acc": 0.95}]
    chosen = final_metrics(curve, "best-val-worst-group")
    assert chosen["selected_epoch"] == 2 and chosen["test_worst_group_acc"] == 0.60 and chosen["test_acc"] == 0.85
    assert final_metrics(curve, "last-epoch")["selected_epoch"] == 3
    with pytest.raises(BenchError, match="needs a validation split with groups"):
        final_metrics([{"epoch": 1, "test_acc": 0.5}], "best-val-worst-group")


def test_records_carry_every_group_metric_on_val_and_test_and_the_rule(three_runs):
    _, records = three_runs
    for record in records.values():
        metrics = record["metrics"]
        for split in ("test", "val"):
            assert {f"{split}_acc", f"{split}_worst_group_acc", f"{split}_adjusted_avg_acc", f"{split}_group_acc"} <= set(metrics)
            assert len(metrics[f"{split}_group_acc"]) == 8
            assert metrics[f"{split}_worst_group_acc"] == min(metrics[f"{split}_group_acc"])
        assert record["selection_rule"] == "best-val-worst-group"
        selected = next(row for row in record["curve"] if row["epoch"] == metrics["selected_epoch"])
        assert selected["val_worst_group_acc"] == max(row["val_worst_group_acc"] for row in record["curve"])
        assert metrics["test_worst_group_acc"] == selected["test_worst_group_acc"]


def test_table_shows_adjusted_and_worst_group_marks_the_oracle_and_names_the_rule(three_runs):
    from benchmarks.core.record import load_records

    out, _ = three_runs
    records, problems = load_records(out / "runs")
    text = markdown_tables(build_sections(records, problems))[GROUPS]
    assert "| adjusted avg acc % (mean ± std) | worst-group acc % (mean ± std) |" in text
    assert "| group-dro (oracle) |" in text and "| jtt |" in text and "| full |" in text
    assert "rule 'best-val-worst-group' (the evaluated epoch with the highest validation worst-group accuracy" in text
    assert "weighted by the TRAINING group proportions" in text and "(oracle) = the method reads training group labels" in text


# -- training group labels are hidden from methods that do not declare they read them ------------


def test_a_hidden_split_raises_on_read_and_its_batches_carry_no_groups():
    split = TensorSplit(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), (0.5,), (0.5,),
                        torch.tensor([0, 3, 1, 2]))
    assert next(split.batches(torch.arange(4), 4)).group.tolist() == [0, 3, 1, 2]
    hidden = split.hide_groups("jtt")
    with pytest.raises(GroupLabelsHidden, match="hidden from method 'jtt'"):
        _ = hidden.groups
    assert next(hidden.batches(torch.arange(4), 4)).group is None
    for derived in (hidden.subset(torch.tensor([1, 2])), hidden.to(torch.device("cpu"))):
        with pytest.raises(GroupLabelsHidden):
            _ = derived.groups
    assert split.groups.tolist() == [0, 3, 1, 2]  # the original is untouched


@register("test-peeks-at-train-groups")
class PeeksAtTrainGroups(Method):
    """Test-only: a training path that reads the training group labels without declaring it."""

    def prepare(self, ctx):
        self.minority = (ctx.data.train.groups % 2).sum()


def test_a_method_that_reads_training_groups_without_declaring_it_fails(tmp_path):
    with pytest.raises(GroupLabelsHidden, match="test-peeks-at-train-groups"):
        run(tmp_path, "test-peeks-at-train-groups")


def test_no_training_path_of_full_or_jtt_reads_training_group_labels(tmp_path, monkeypatch):
    """Every read of training group labels by full or jtt would raise (they are hidden), so these runs
    complete only if no training path reads them; and their batches never carry them."""
    seen = {}
    original = train.Trainer._step

    def spy(self, batch, step, selection=None):
        seen.setdefault((self.method.name, self.tag), set()).add(batch.group is None)
        return original(self, batch, step, selection)

    monkeypatch.setattr(train.Trainer, "_step", spy)
    for method, params in (("full", {}), ("jtt", {"lambda_up": 3}), ("group-dro", {})):
        record = run(tmp_path, method, params)
        assert record["status"] == "complete" and record["reads_train_groups"] == (method == "group-dro")
    assert seen[("full", "main")] == {True}
    # stage 2, and stage 1 (watched by JTT's error log: the official train-mode rule)
    assert seen[("jtt", "main")] == {True} and seen[("jtt-error-log", "score-proxy-0")] == {True}
    assert seen[("group-dro", "main")] == {False}  # the oracle alone gets them


def test_a_group_label_reader_needs_data_with_groups():
    assert dataset_has_groups("spurious-fashion") and dataset_has_groups("waterbirds")
    assert not dataset_has_groups("fashion-mnist") and dataset_has_groups("synthetic", {"groups": True})
    with pytest.raises(BenchError, match="reads training group labels and protocol 'smoke'"):
        _ = RunSpec("smoke", "group-dro").run_id


def test_bench_runs_the_group_methods_by_default_only_where_the_data_has_groups(tmp_path, monkeypatch):
    import benchmarks.cli as cli
    from benchmarks.core.layout import ResultsLayout
    from benchmarks.jobs.sweep import read_manifest

    monkeypatch.setattr("benchmarks.jobs.preflight.check_runs", lambda *a, **k: None)
    ran = []
    for protocol in ("smoke", GROUPS):  # the runs bench would run: its manifest, written by --dry-run
        assert cli.main(["bench", "--protocol", protocol, "--seeds", "0", "--out", str(tmp_path), "--wandb", "off",
                         "--dry-run"]) == 0
        ran += [(line["protocol"], line["method"])
                for line in read_manifest(ResultsLayout(tmp_path).manifest(f"bench-{protocol}"))]
    assert ("smoke", "full") in ran and not {("smoke", "jtt"), ("smoke", "group-dro")} & set(ran)
    assert {(GROUPS, "full"), (GROUPS, "jtt"), (GROUPS, "group-dro")} <= set(ran)


# -- JTT ------------------------------------------------------------------------------------------


def test_error_set_and_upsampled_list_match_a_hand_example():
    predictions = torch.tensor([0, 1, 1, 0, 2, 2])
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    errors = error_set(predictions, labels)
    assert errors.tolist() == [1, 3, 5]  # misclassified: prediction != label (not the correct ones)
    plan = upsampled_indices(6, errors, 2)
    assert torch.bincount(plan, minlength=6).tolist() == [1, 3, 1, 3, 1, 3]  # 1 + lambda_up for errors
    assert upsampled_indices(6, errors, 0).tolist() == list(range(6))


class ConstantPredictor(torch.nn.Module):
    """Predicts class 0 for everything: the misclassified are exactly the examples not labelled 0."""

    def forward(self, x):
        logits = torch.zeros(len(x), 4)
        logits[:, 0] = 1.0
        return logits


def test_jtt_upsamples_the_misclassified_examples_not_the_correct_ones(monkeypatch):
    ctx = build_context(load_protocol(GROUPS), 0, log=quiet, method="jtt")
    monkeypatch.setattr(jtt_module, "train_proxy", lambda ctx, run, epochs: (ConstantPredictor(), False))
    # the eval-pass rule reads predictions from the stage-1 model (the train-log rule: tests below)
    method = JTT(stage1_epochs=-1, lambda_up=5, error_set="eval-pass")
    method.ctx = ctx
    method.prepare(ctx)
    labels = ctx.data.train.labels
    counts = torch.bincount(method.plan_epoch(0).indices, minlength=len(labels))
    assert torch.equal(counts[labels != 0], torch.full_like(counts[labels != 0], 6))
    assert torch.equal(counts[labels == 0], torch.ones_like(counts[labels == 0]))
    assert method.summary()["error_set_size"] == int((labels != 0).sum())


def test_jtt_reports_the_error_sets_group_make_up_counted_by_the_harness(three_runs):
    out, records = three_runs
    stats = records["jtt"]["method_stats"]
    ctx = build_context(load_protocol(GROUPS), 0, log=quiet, method="group-dro")  # sees the groups
    counts = stats["error_set_group_counts"]
    assert sum(counts) == stats["error_set_size"] > 0 and len(counts) == 8
    totals = torch.bincount(ctx.data.train.groups, minlength=8).tolist()
    assert stats["error_set_share_of_group"] == [pytest.approx(c / t) for c, t in zip(counts, totals)]
    assert stats["stage1_epochs"] == 1 and stats["stage2_epoch_examples"] == 1024 + 3 * stats["error_set_size"]
    # Stage 1 is charged as selection; stage 2's upsampled epochs make JTT cost more than ERM.
    assert records["jtt"]["compute"]["selection_flops"] > 0 and records["jtt"]["compute"]["fraction"] > 1


def test_jtt_stage_two_starts_from_a_fresh_model(tmp_path, monkeypatch):
    starts = {}
    original_fit = train.Trainer.fit

    def record_start(self, *args, **kwargs):
        starts[self.tag] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(train.Trainer, "fit", record_start)
    stage1 = {}
    original_proxy = jtt_module.train_proxy

    def keep_stage1(ctx, run, epochs, **kwargs):
        model, cached = original_proxy(ctx, run, epochs, **kwargs)
        stage1.update({k: v.clone() for k, v in model.state_dict().items()})
        return model, cached

    monkeypatch.setattr(jtt_module, "train_proxy", keep_stage1)
    run(tmp_path, "jtt", {"lambda_up": 3})
    fresh = build_context(load_protocol(GROUPS), 0, log=quiet).new_model("main").state_dict()
    assert all(torch.equal(starts["main"][k], fresh[k]) for k in fresh)  # the main run begins at a fresh init
    assert not torch.equal(stage1["head.weight"], fresh["head.weight"])  # ... not at the stage-1 model


def step_info(epoch, index, correct):
    index = torch.tensor(index)
    return StepInfo(epoch=epoch, step=0, index=index, loss=torch.zeros(len(index)),
                    correct=torch.tensor(correct), logits=None)


def test_train_log_error_set_is_the_official_rule_on_a_hand_made_log():
    # 6 examples, epoch 1 (0-based) logged: the predictions made while training through it, whatever
    # the examples did in the epochs before (or would do after).
    log = EpochErrorLog(6, epoch=1)
    log.observe(step_info(0, [0, 1, 2, 3, 4, 5], [False] * 6))  # epoch 0: not read
    log.observe(step_info(1, [4, 0, 2], [False, True, True]))
    log.observe(step_info(1, [5, 1, 3], [True, False, False]))
    log.observe(step_info(2, [0, 1, 2, 3, 4, 5], [False] * 6))  # a later epoch: not read
    assert log.errors().tolist() == [1, 3, 4]  # misclassified when trained on in epoch 1
    resumed = EpochErrorLog(6, epoch=1)
    resumed.load_state_dict(log.state_dict())
    assert torch.equal(resumed.errors(), log.errors())
    partial = EpochErrorLog(6, epoch=1)
    partial.observe(step_info(1, [4, 0, 2], [False, True, True]))
    with pytest.raises(RuntimeError, match="3 training examples were not visited in epoch 2"):
        partial.errors()


def test_jtt_error_set_is_read_while_stage_one_trains_its_last_epoch(tmp_path, monkeypatch):
    # Brute force: at every stage-1 step, a copy of the model predicts the batch as trained (train mode,
    # augmented, before the update); E = the examples it gets wrong in 0-based epoch T, T = 1 here.
    wrong, steps = set(), []
    original = train.Trainer._step

    def spy(self, batch, step, selection=None):
        if self.tag == "score-proxy-0":
            steps.append(step.epoch)
            with torch.no_grad():
                predicted = copy.deepcopy(self.model).train()(batch.x).argmax(1)
            if step.epoch == 1:
                wrong.update(batch.index[predicted != batch.y].tolist())
        return original(self, batch, step, selection)

    monkeypatch.setattr(train.Trainer, "_step", spy)
    ctx = build_context(load_protocol(GROUPS), 0, log=quiet, method="jtt")
    method = JTT(stage1_epochs=-1, lambda_up=3, error_set="train-log")
    method.ctx = ctx
    method.prepare(ctx)
    assert sorted(set(steps)) == [0, 1] and len(steps) == 2 * 16  # T + 1 = 2 epochs of 16 steps
    assert method.errors.tolist() == sorted(wrong) and len(wrong) > 0
    stats = method.summary()
    assert stats["stage1_epochs"] == 1 and stats["stage1_trained_epochs"] == 2 and stats["error_set_rule"] == "train-log"
    # The eval-pass option reads a separate eval-mode pass after T epochs: another set on the same data.
    other = JTT(stage1_epochs=-1, lambda_up=3, error_set="eval-pass")
    other.ctx = ctx
    other.prepare(ctx)
    assert other.summary()["stage1_trained_epochs"] == 1 and not torch.equal(other.errors, method.errors)


def test_train_log_stage_one_epochs_fit_in_the_protocol():
    protocol = load_protocol(GROUPS)  # 3 epochs
    assert resolve_stage1_epochs(-1, protocol, "train-log") == 1 and resolve_stage1_epochs(2, protocol, "train-log") == 2
    assert resolve_stage1_epochs(3, protocol, "eval-pass") == 3
    with pytest.raises(BenchError, match=r"stage1_epochs=3 must lie in \[0, 2\]"):
        resolve_stage1_epochs(3, protocol, "train-log")
    one = apply_overrides(protocol, {"epochs": 1})
    assert resolve_stage1_epochs(-1, one, "train-log") == 0  # the only epoch there is: 0-based epoch 0


def test_jtt_preempted_in_stage_one_resumes_to_the_same_result(tmp_path, monkeypatch):
    params = {"stage1_epochs": 2, "lambda_up": 3}
    reference = run(tmp_path / "ref", "jtt", params)
    original = train.Trainer._step

    def stop_in_stage_one(self, batch, step, selection=None):
        loss = original(self, batch, step, selection)
        if self.tag == "score-proxy-0" and self.state.step == 20:  # 16 steps per epoch: inside epoch 2
            train.STOP.set()
        return loss

    monkeypatch.setattr(train.Trainer, "_step", stop_in_stage_one)
    try:
        with pytest.raises(train.Preempted, match="in epoch 2 after step 4"):
            run(tmp_path / "cut", "jtt", params)
    finally:
        train.STOP.clear()
    monkeypatch.setattr(train.Trainer, "_step", original)
    resumed = run(tmp_path / "cut", "jtt", params)
    assert resumed["metrics"] == reference["metrics"] and resumed["compute"] == reference["compute"]
    assert resumed["method_stats"]["error_set_group_counts"] == reference["method_stats"]["error_set_group_counts"]


# -- Group DRO ------------------------------------------------------------------------------------


def test_group_dro_weights_follow_a_hand_computed_exponentiated_gradient_step():
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    losses = torch.tensor([1.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    raw = [0.25 * math.exp(0.1 * loss) for loss in (1.0, 2.0, 0.0, 0.5)]
    assert update_group_weights(q, losses, 0.1).tolist() == pytest.approx([r / sum(raw) for r in raw])
    adjustment = torch.tensor([2 / math.sqrt(100), 2 / math.sqrt(4), 2 / math.sqrt(25), 2 / math.sqrt(1)],
                              dtype=torch.float64)
    raw = [0.25 * math.exp(0.1 * (loss + 2 / math.sqrt(n))) for loss, n in zip((1.0, 2.0, 0.0, 0.5), (100, 4, 25, 1))]
    assert update_group_weights(q, losses, 0.1, adjustment).tolist() == pytest.approx([r / sum(raw) for r in raw])


def test_group_dro_loss_is_the_weighted_sum_of_group_means_with_the_updated_weights():
    losses = torch.tensor([1.0, 3.0, 2.0, 0.5, 0.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 3, 3])
    means, counts = group_mean_losses(losses, groups, 4)
    assert means.tolist() == [2.0, 2.0, 0.0, 0.5] and counts.tolist() == [2, 1, 0, 2]  # absent group 2: loss 0

    ctx = build_context(load_protocol(GROUPS), 0, log=quiet, method="group-dro")
    method = GroupDRO(eta=0.5, adjustment=1.0, sampling="group-balanced")
    method.setup(ctx)
    model = ctx.new_model("main")
    batch = next(iter(ctx.data.train.batches(torch.arange(64), 64)))
    per_example, logits = method.objective(model, batch)
    ce = torch.nn.functional.cross_entropy(logits.double(), batch.y, reduction="none")
    n_g = torch.bincount(ctx.data.train.groups, minlength=8).double()
    q = torch.full((8,), 1 / 8, dtype=torch.float64)
    hand = []
    for g in range(8):
        members = ce[batch.group == g]
        hand.append(members.mean().item() if len(members) else 0.0)
    hand = torch.tensor(hand, dtype=torch.float64)
    q = q * torch.exp(0.5 * (hand + 1.0 / n_g.sqrt()))
    q = q / q.sum()
    assert method.q.tolist() == pytest.approx(q.tolist())
    assert per_example.double().mean().item() == pytest.approx((q * hand).sum().item(), rel=1e-5)


def test_group_balanced_sampling_draws_every_group_equally_often():
    # The official --reweight_groups sampler: with replacement, weight 1 / n_group, N draws an epoch.
    ctx = build_context(load_protocol(GROUPS), 0, log=quiet, method="group-dro")
    groups = ctx.data.train.groups
    sizes = torch.bincount(groups, minlength=8)
    assert sizes.min() * 4 < sizes.max()  # the data is far from balanced (90% agreement)
    method = GroupDRO(eta=0.01, adjustment=0.0, sampling="group-balanced")
    method.ctx = ctx
    epochs = 20
    plans = [method.plan_epoch(epoch).indices for epoch in range(epochs)]
    assert all(len(p) == len(groups) for p in plans)  # an epoch is N examples long
    assert torch.equal(method.plan_epoch(3).indices, plans[3]) and not torch.equal(plans[3], plans[4])  # seeded
    drawn = torch.cat(plans)
    shares = torch.bincount(groups[drawn], minlength=8).double() / len(drawn)
    sigma = math.sqrt((1 / 8) * (7 / 8) / len(drawn))  # binomial standard error of a share
    assert (shares - 1 / 8).abs().max() < 4 * sigma, shares
    # ... and the test can tell: uniform sampling (the option) visits each example once, groups as they are.
    uniform = GroupDRO(eta=0.01, adjustment=0.0, sampling="uniform")
    uniform.ctx = ctx
    assert uniform.plan_epoch(0) is None
    assert (sizes.double() / len(groups) - 1 / 8).abs().max() > 20 * sigma
    # Within a group every example is equally likely: a 90/10 split drawn 40,000 times.
    small = torch.tensor([0] * 90 + [1] * 10)
    draws = group_balanced_indices(small, 40_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=100).double()
    assert abs(counts[90:].sum() / 40_000 - 0.5) < 4 * math.sqrt(0.25 / 40_000)
    for members, p in ((counts[:90], 0.5 / 90), (counts[90:], 0.5 / 10)):
        assert ((members / 40_000 - p).abs() < 4 * math.sqrt(p * (1 - p) / 40_000)).all()


def test_group_dro_weights_resume_with_the_checkpoint(three_runs):
    _, records = three_runs
    stats = records["group-dro"]["method_stats"]
    assert len(stats["group_weights"]) == 8 and sum(stats["group_weights"]) == pytest.approx(1.0)
    method = GroupDRO(eta=0.01, adjustment=0.0, sampling="group-balanced")
    method.load_state_dict({"q": torch.tensor(stats["group_weights"], dtype=torch.float64)})
    assert method.state_dict()["q"].tolist() == stats["group_weights"]


# -- spurious-fashion -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion():
    from benchmarks.data import _fashion_mnist_arrays

    arrays = _fashion_mnist_arrays(search_roots(None))
    if arrays is None:
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return arrays


@pytest.mark.parametrize("kwargs", [
    {"n_train": 3000, "n_val": 500},  # the protocol's defaults otherwise
    {"classes": [[5, 7], [9, 1, 8]], "correlation": 0.8, "eval_correlation": 0.3, "n_train": 2001, "n_val": 333,
     "colours": [[0, 255, 0], [255, 0, 255]], "seed": 7},
])
def test_spurious_fashion_realises_its_correlation_exactly(fashion, kwargs):
    made = make_spurious_fashion(fashion, kwargs)
    params = made["params"]
    superclass = {c: label for label, members in enumerate(params["classes"]) for c in members}
    for name, correlation in (("train", params["correlation"]), ("val", params["eval_correlation"]),
                              ("test", params["eval_correlation"])):
        images, labels, groups = made["splits"][name]
        places = groups % 2
        assert torch.equal(groups // 2, labels)  # group = 2 * label + place
        for c in (0, 1):
            n_c = int((labels == c).sum())
            assert int((places[labels == c] == c).sum()) == round(correlation * n_c)
        # The background carries the place's colour (a corner pixel is background in nearly every image).
        colours = torch.tensor(params["colours"], dtype=torch.uint8)
        assert (images[:, :, 0, 0] == colours[places]).all(dim=1).float().mean() > 0.95
    assert len(made["splits"]["train"][1]) == kwargs["n_train"] and len(made["splits"]["val"][1]) == kwargs["n_val"]
    test_fashion = fashion["test_y"][torch.isin(fashion["test_y"], torch.tensor(sorted(superclass)))]
    assert len(made["splits"]["test"][1]) == len(test_fashion)
    again = make_spurious_fashion(fashion, kwargs)  # deterministic from its seed
    assert all(torch.equal(a, b) for name in ("train", "val", "test")
               for a, b in zip(made["splits"][name], again["splits"][name]))


def test_spurious_fashion_changes_with_its_seed_and_rejects_bad_parameters(fashion):
    a = make_spurious_fashion(fashion, {"n_train": 500, "n_val": 100, "seed": 0})
    b = make_spurious_fashion(fashion, {"n_train": 500, "n_val": 100, "seed": 1})
    assert not torch.equal(a["splits"]["train"][0], b["splits"]["train"][0])
    for bad, message in (({"classes": [[0, 3], [3, 4]]}, "must not share"), ({"correlation": 1.5}, "correlation"),
                         ({"colours": [[1, 2, 3], [1, 2, 3]]}, "colours"), ({"classes": [[0], []]}, "classes"),
                         ({"shade": 1}, "unknown data_kwargs key 'shade'")):
        with pytest.raises(BenchError, match=message):
            make_spurious_fashion(fashion, bad)


def test_colouring_composites_the_grey_garment_over_the_background():
    gray = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    out = colour_backgrounds(gray, torch.tensor([[200, 100, 0]], dtype=torch.uint8))
    # out = g * g / 255 + colour * (1 - g / 255): background -> colour, full intensity -> grey 255
    g = torch.tensor([0.0, 255.0, 51.0, 102.0])
    for channel, colour in enumerate((200, 100, 0)):
        expected = (g * g / 255 + colour * (1 - g / 255)).round()
        assert out[0, channel].flatten().tolist() == expected.tolist()


def test_assign_places_is_exact_per_label():
    labels = torch.tensor([0] * 7 + [1] * 13)
    places = assign_places(labels, 0.7, torch.Generator().manual_seed(0))
    assert int((places[:7] == 0).sum()) == round(0.7 * 7) and int((places[7:] == 1).sum()) == round(0.7 * 13)


# -- Waterbirds: both on-disk layouts, streamed from disk ------------------------------------------

WATERBIRDS_ROWS = {0: [3, 1, 1, 2], 1: [1, 1, 1, 1], 2: [2, 2, 1, 1]}  # split -> images per group 0..3
COLOUR = {0: (200, 40, 40), 1: (40, 200, 40), 2: (40, 40, 200), 3: (120, 120, 120)}  # one flat colour per group


def write_waterbirds(folder):
    """A tiny tree in the real format: metadata.csv (img_id,img_filename,y,split,place,place_filename)
    and JPEGs under <species folder>/<name>.jpg."""
    from PIL import Image

    folder.mkdir(parents=True)
    rows, img_id = [], 1
    for split, counts in WATERBIRDS_ROWS.items():
        for group, count in enumerate(counts):
            y, place = group // 2, group % 2
            for _ in range(count):
                species = "001.Black_footed_Albatross" if y else "010.Red_winged_Blackbird"
                name = f"{species}/img_{img_id:04d}.jpg"
                (folder / species).mkdir(exist_ok=True)
                Image.new("RGB", (37, 29), COLOUR[group]).save(folder / name, quality=95)
                rows.append([img_id, name, y, split, place, f"/{'o/ocean' if place else 'b/bamboo_forest'}/0.jpg"])
                img_id += 1
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        writer.writerows(rows)


@pytest.mark.parametrize("layout", ["waterbird_complete95_forest2water2", "waterbirds_v1.0"])
def test_waterbirds_reads_both_layouts_with_groups_and_the_papers_transform(tmp_path, layout):
    write_waterbirds(tmp_path / layout)
    data = load_data("waterbirds", str(tmp_path), {"image_size": 16, "num_workers": 2 if layout.endswith("1.0") else 0})
    assert data.num_classes == 2 and data.num_groups == 4 and data.input_shape == (3, 16, 16)
    for name, split_code in (("train", 0), ("val", 1), ("test", 2)):
        split = getattr(data, name)
        assert torch.bincount(split.groups, minlength=4).tolist() == WATERBIRDS_ROWS[split_code]
        assert torch.equal(split.labels, split.groups // 2)  # group = 2 * y + place
    batches = list(data.test.batches(torch.tensor([5, 0, 3]), 2))
    assert [b.index.tolist() for b in batches] == [[5, 0], [3]] and batches[0].x.shape == (2, 3, 16, 16)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for batch in batches:
        for x, g in zip(batch.x, batch.group):
            expected = (torch.tensor(COLOUR[int(g)]) / 255 - mean) / std  # a flat image stays flat after resize/crop
            assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=0.05)


def test_waterbirds_runs_end_to_end_streamed_with_its_selection_rule(tmp_path):
    write_waterbirds(tmp_path / "data" / "waterbird_complete95_forest2water2")
    spec = RunSpec("waterbirds", "jtt", {"lambda_up": 2}, 0,
                   {"model": "tiny-cnn", "pretrained": False, "epochs": 2, "batch_size": 4,
                    "data_kwargs": {"image_size": 8, "num_workers": 0}})
    record = execute(spec, tmp_path / "out", data_root=str(tmp_path / "data"), log=quiet)
    assert record["status"] == "complete" and record["metrics"]["selected_epoch"] in (1, 2)
    assert len(record["metrics"]["test_group_acc"]) == 4 and "val_adjusted_avg_acc" in record["metrics"]


def test_missing_waterbirds_says_where_to_get_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError) as info:
        load_data("waterbirds", str(tmp_path / "empty"))
    message = str(info.value)
    assert "waterbird_complete95_forest2water2.tar.gz" in message and "waterbirds_v1.0" in message
    assert str(tmp_path / "empty") in message


# -- pretrained weights from a local file ---------------------------------------------------------


def test_a_timm_model_loads_a_local_weights_file_except_a_classifier_of_another_size(tmp_path):
    torch.manual_seed(0)
    source = create_model("timm:resnet10t", in_chans=3, num_classes=1000)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = create_model("timm:resnet10t", in_chans=3, num_classes=2, pretrained_file=str(path))
    loaded, original = model.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in loaded if not k.startswith("fc."))
    assert loaded["fc.weight"].shape == (2, 512)
    wrong = tmp_path / "other.pth"
    torch.save(create_model("small-cnn", in_chans=3, num_classes=2).state_dict(), wrong)
    with pytest.raises(BenchError, match="pretrained_file"):
        create_model("timm:resnet10t", in_chans=3, num_classes=2, pretrained_file=str(wrong))


def test_a_protocol_names_a_local_weights_file_and_never_falls_back_to_random(tmp_path):
    torch.manual_seed(1)
    source = create_model("tiny-cnn", in_chans=1, num_classes=10)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    ctx = build_context(apply_overrides(load_protocol("smoke"), {"pretrained_file": str(path)}), 0, log=quiet)
    a, b = ctx.new_model("main").state_dict(), ctx.new_model("other").state_dict()
    assert all(torch.equal(a[k].cpu(), source.state_dict()[k]) for k in a if not k.startswith("head."))
    assert not torch.equal(a["head.weight"], b["head.weight"])  # a fresh 4-class head per model
    with pytest.raises(BenchError, match="no published pretrained weights.*pretrained_file"):
        build_context(apply_overrides(load_protocol("smoke"), {"pretrained": True}), 0, log=quiet).new_model("main")
    with pytest.raises(BenchError, match="does not exist"):
        create_model("tiny-cnn", in_chans=1, num_classes=4, pretrained_file=str(tmp_path / "nope.pt"))


def test_spurious_fashion_protocol_fits_its_rules():
    protocol = load_protocol("spurious-fashion")
    assert protocol.selection_rule == "best-val-worst-group" and protocol.data_kwargs["correlation"] == 0.95
    waterbirds = load_protocol("waterbirds")
    assert waterbirds.pretrained and waterbirds.lr == 1e-5 and waterbirds.weight_decay == 1.0
    assert np.isclose(waterbirds.data_kwargs["resize_scale"] * 224, 256)
