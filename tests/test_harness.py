"""The trainer, the meter, the run record and the baselines, end to end on the smoke protocol."""

import math
import subprocess
import sys

import pytest
import torch

from benchmarks.api import Method, Selection, Traits
from benchmarks.core.compute import ComputeMeter, flop_counter
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.optim import lr_at
from benchmarks.core.protocol import load_protocol
from benchmarks.core.record import load_record
from benchmarks.core.registry import Param, create_method, register, resolve_params
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.errors import BenchError, NonFiniteLoss
from conftest import quiet


@register("test-nan")
class NanLoss(Method):
    """Test-only: a loss that becomes NaN in the second epoch."""

    def objective(self, model, batch):
        logits = model(batch.x)
        loss = torch.nn.functional.cross_entropy(logits, batch.y, reduction="none")
        return (loss * float("nan") if self.epoch_seen >= 1 else loss), logits

    def plan_epoch(self, epoch):
        self.epoch_seen = epoch
        return None


@register("test-first-half")
class FirstHalf(Method):
    """Test-only: online selection keeping the first half of each candidate batch of 2B."""

    traits = Traits(candidate_factor=2)
    params = {"crash_at_epoch": Param(-1, "")}

    def __init__(self, **params):
        super().__init__(**params)
        self.seen = []

    def select(self, batch, model, step):
        return Selection(keep=torch.arange((len(batch.y) + 1) // 2))

    def observe(self, step):
        self.seen.append(step.index.cpu())


def test_meter_measures_what_runs_once_per_key_and_reuses_it():
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(4, 12)  # no input gradient: the backward computes the weight's gradient only
    meter = ComputeMeter()
    for _ in range(3):
        with meter.measure("train", ("step", 4), examples=4):
            layer(x).sum().backward()
    # forward addmm 2*4*12*5 = 480, backward weight mm 480: 960 per step, not "3 x forward" = 1440
    assert meter.figures[("step", 4)] == 960 and meter.flops["train"] == 3 * 960
    with meter.measure("eval", ("eval", 4)), torch.no_grad():
        layer(x)
    assert meter.flops["eval"] == 480 and meter.examples == {"train": 12, "selection": 0, "eval": 0}
    assert meter.total == 3 * 960  # evaluation is not compared compute


def test_nested_blocks_are_charged_once():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    meter = ComputeMeter()
    with flop_counter() as outside:
        for _ in range(2):  # the second time both keys are known: nothing is counted, the same is charged
            with meter.measure("train", "outer"), torch.no_grad():
                layer(x)
                with meter.measure("selection", "inner"):
                    layer(layer(x))
    assert meter.flops == {"train": 2 * 256, "selection": 2 * 512, "eval": 0}
    assert meter.flops["train"] + meter.flops["selection"] == outside.get_total_flops()


def test_full_run_charges_exactly_the_computed_full_flops(run_smoke):
    record = run_smoke("full")
    compute = record["compute"]
    # An independent count of one training step and one evaluation pass of the smoke model.
    from benchmarks.core.models import create_model

    model = create_model("tiny-cnn", in_chans=1, num_classes=4)
    with flop_counter() as step:
        torch.nn.functional.cross_entropy(model(torch.randn(64, 1, 8, 8)), torch.zeros(64, dtype=torch.long)).backward()
    with flop_counter() as forward, torch.no_grad():
        model(torch.randn(512, 1, 8, 8))
    epochs, steps_per_epoch = 3, 1024 // 64
    assert compute["full_flops"] == epochs * steps_per_epoch * step.get_total_flops()
    assert compute["train_flops"] == compute["full_flops"] and compute["fraction"] == 1.0
    assert compute["selection_flops"] == 0 and compute["reference"] == "full"
    assert compute["eval_flops"] == epochs * forward.get_total_flops()  # one pass over the 512 test examples
    assert "flop_counter" in compute["measurement"]


@pytest.mark.parametrize("budget, expected_fraction", [("epochs", 0.5), ("iterations", 1.0)])
def test_uniform_half_charges_half_or_the_same(run_smoke, budget, expected_fraction):
    full = run_smoke("full", budget=budget)
    half = run_smoke("uniform", {"fraction": 0.5}, budget=budget)
    assert half["compute"]["train_flops"] == expected_fraction * full["compute"]["train_flops"]
    assert half["compute"]["fraction"] == expected_fraction
    steps_full, steps_half = full["curve"][-1]["step"], half["curve"][-1]["step"]
    assert steps_half == (steps_full / 2 if budget == "epochs" else steps_full)


def test_uniform_subset_sizes_balance_and_seeds():
    from benchmarks.core.train import RunContext
    from benchmarks.data import load_data

    data = load_data("synthetic")
    ctx = RunContext(load_protocol("smoke"), data, torch.device("cpu"), ComputeMeter(), seed=0)
    labels = data.train.labels
    for fraction in (0.1, 0.37, 1.0):
        method = create_method("uniform", fraction=fraction, class_balanced=True)
        method.ctx = ctx
        method.prepare(ctx)
        subset = method.plan_epoch(0).indices
        assert len(subset) == round(fraction * len(labels)) and len(subset.unique()) == len(subset)
        for c in labels.unique():  # each class within one example of its proportional share
            share = (labels == c).sum().item() * fraction
            assert abs((labels[subset] == c).sum().item() - share) < 1
    a, b = create_method("uniform-epoch", fraction=0.3), create_method("uniform-epoch", fraction=0.3)
    a.ctx = b.ctx = ctx
    assert torch.equal(a.plan_epoch(1).indices, b.plan_epoch(1).indices)  # same seed, same subset
    assert not torch.equal(a.plan_epoch(1).indices, a.plan_epoch(2).indices)  # fresh each epoch


def test_select_and_observe_hooks(tmp_path):
    record = execute(RunSpec("smoke", "test-first-half", {}, 0, {"epochs": 1}), tmp_path, log=quiet)
    # candidate batches of 128 from 1024 examples: 8 steps training 64 each = half the data
    assert record["compute"]["train_examples"] == 512 and record["compute"]["fraction"] == 0.5


def test_observe_sees_original_indices_of_the_plan(tmp_path):
    from benchmarks.core.train import RunContext, Trainer
    from benchmarks.data import load_data

    protocol = load_protocol("smoke").replace(epochs=1)
    ctx = RunContext(protocol, load_data("synthetic"), torch.device("cpu"), ComputeMeter(), seed=0, log=quiet)
    uniform = create_method("uniform", fraction=0.25)
    uniform.ctx = ctx
    uniform.prepare(ctx)
    seen = []
    uniform.observe = lambda step: seen.append(step.index)
    type(uniform).observe = FirstHalf.observe  # mark the hook as implemented for the trainer
    try:
        Trainer(ctx, ctx.new_model("m"), uniform, evaluate=False).fit()
    finally:
        del type(uniform).observe
    assert torch.equal(torch.cat(seen).sort().values, uniform.subset)


def test_finished_run_is_skipped(tmp_path):
    spec = RunSpec("smoke", "full", {}, 0, {"epochs": 1})
    first = execute(spec, tmp_path, log=quiet)
    path = ResultsLayout(tmp_path).record(first["run_id"])
    mtime = path.stat().st_mtime_ns
    messages = []
    second = execute(spec, tmp_path, log=messages.append)
    assert second["run_id"] == first["run_id"] and path.stat().st_mtime_ns == mtime
    assert any(m.startswith("skip") for m in messages)


def test_nan_loss_writes_a_failed_record(tmp_path):
    spec = RunSpec("smoke", "test-nan", {}, 0, {})
    with pytest.raises(NonFiniteLoss, match="epoch 2"):
        execute(spec, tmp_path, log=quiet)
    record = load_record(ResultsLayout(tmp_path).record(spec.run_id))
    assert record["status"] == "failed" and "NonFiniteLoss" in record["error"]
    assert len(record["curve"]) == 1  # the first epoch's curve is kept


def test_same_seed_same_result_different_seed_differs(run_smoke, tmp_path):
    a = run_smoke("uniform-epoch", seed=4, out=tmp_path / "a")
    b = run_smoke("uniform-epoch", seed=4, out=tmp_path / "b")
    c = run_smoke("uniform-epoch", seed=5, out=tmp_path / "c")
    assert a["curve"][-1]["train_loss"] == b["curve"][-1]["train_loss"]
    assert a["metrics"] == b["metrics"]
    assert a["curve"][-1]["train_loss"] != c["curve"][-1]["train_loss"]


def test_interrupted_run_resumes_from_checkpoint_with_identical_results(tmp_path, monkeypatch):
    spec = RunSpec("smoke", "uniform-epoch", {}, 2, {"epochs": 4})
    reference = execute(spec, tmp_path / "ref", log=quiet)
    from benchmarks.core import train

    original = train.Trainer.run_epoch

    def crash_in_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # like a kill: no failed record, the checkpoint stays
        return original(self, epoch)

    monkeypatch.setattr(train.Trainer, "run_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, tmp_path / "cut", log=quiet)
    monkeypatch.setattr(train.Trainer, "run_epoch", original)
    messages = []
    resumed = execute(spec, tmp_path / "cut", log=messages.append)
    assert any("resumed at epoch 2" in m for m in messages)
    assert resumed["metrics"] == reference["metrics"]
    assert resumed["compute"] == reference["compute"]
    assert [r["train_loss"] for r in resumed["curve"]] == [r["train_loss"] for r in reference["curve"]]


def test_parameter_checks():
    assert resolve_params("uniform", {}) == {"fraction": 0.5, "class_balanced": False}
    with pytest.raises(BenchError, match="out of range"):
        resolve_params("uniform", {"fraction": 1.5})
    with pytest.raises(BenchError, match="out of range"):
        resolve_params("uniform", {"fraction": 0.0})
    with pytest.raises(BenchError, match="no parameter 'frac'"):
        resolve_params("uniform", {"frac": 0.5})
    with pytest.raises(BenchError, match="must be float"):
        resolve_params("uniform", {"fraction": "half"})
    with pytest.raises(BenchError, match="unknown method 'infobach'"):
        create_method("infobach")


def test_lr_schedules():
    p = load_protocol("cifar10")
    assert lr_at(p, 0) == 0.1 and math.isclose(lr_at(p, 60), 0.02) and math.isclose(lr_at(p, 170), 0.1 * 0.2**3)
    one = p.replace(schedule="onecycle", lr=5.2, onecycle_pct_start=0.25)
    assert math.isclose(lr_at(one, 50), 5.2) and math.isclose(lr_at(one, 0), 5.2 / 25)
    assert lr_at(one, 200) < 1e-4
    lin = p.replace(schedule="linear", warmup_epochs=2.0)
    assert lr_at(lin, 0) == 0 and math.isclose(lr_at(lin, 1), 0.5 * 0.1 * (1 - 1 / 200))


@pytest.mark.parametrize("argv, message", [
    (["run", "--protocol", "smoke", "--method", "nope"], "unknown method 'nope'"),
    (["run", "--protocol", "nope", "--method", "full"], "unknown protocol 'nope'"),
    (["run", "--protocol", "smoke", "--method", "uniform", "--param", "fraction=2"], "out of range"),
    (["run", "--protocol", "smoke", "--method", "uniform", "--param", "size=2"], "no parameter 'size'"),
    (["run", "--protocol", "smoke", "--method", "full", "--set", "epochs=0"], "'epochs' must be >= 1"),
])
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, argv, message):
    result = subprocess.run([sys.executable, "-m", "benchmarks", *argv, "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing written for bad input


def test_cli_run_list_and_tables(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True,
                              check=True).stdout

    listing = cli("list")
    assert "uniform-epoch" in listing and "fraction" in listing and "default 0.5" in listing
    assert "fashion-mnist" in listing
    cli("run", "--protocol", "smoke", "--method", "full", "--set", "epochs=1", "--out", str(tmp_path))
    cli("run", "--protocol", "smoke", "--method", "uniform", "--set", "epochs=1", "--out", str(tmp_path))
    table = cli("tables", "--runs", str(tmp_path), "--out", str(tmp_path / "tables"))
    assert "| full | - | 1 |" in table and "| uniform | fraction=0.5 | 1 |" in table
    assert (tmp_path / "tables" / "smoke.md").exists()


def test_a_cpu_run_flushes_subnormal_floats():
    """Subnormals slow x86 CPUs 10-100x (strong weight decay drives dead channels through them): a CPU
    run's context flushes them to zero."""
    torch.set_flush_denormal(False)  # an earlier test's run may have set it: made under it, tiny would be 0
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    try:
        assert (tiny * 1.0).item() != 0.0  # the control: without the flag the subnormal survives
        build_context(load_protocol("smoke"), 0, device="cpu")
        assert (tiny * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
