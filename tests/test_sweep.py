"""Sweeps, kill-and-resume, preemption: on plain processes and on the real one-node Slurm cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import load_record, write_record
from benchmarks.core.run import RunSpec, execute
from benchmarks.errors import BenchError
from benchmarks.jobs.sweep import compress_indices, load_sweep, sweep_status, write_manifest
from conftest import quiet
from slurm_support import REPO, _run, _wait_gone, start_cluster, start_until

# A smoke run long enough (a few seconds) to be interrupted in the middle of an epoch.
LONG = {"epochs": 3, "data_kwargs": {"n_train": 6000, "n_test": 512, "num_classes": 4, "size": 8}}
LONG_SET = ["--set", "epochs=3", "--set", "data_kwargs={n_train=6000, n_test=512, num_classes=4, size=8}"]
FIRST_EPOCH_DONE = "epoch 1/3"  # a signal sent on this line lands in the middle of epoch 2


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True,
                          cwd=REPO, **kwargs)


def same_results(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["compute"] == b["compute"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["curve"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["curve"]]


def write_spec(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return str(path)


GOOD_SPEC = """
name = "t"
protocol = "smoke"
seeds = [0, 1]
overrides = { epochs = 1 }
[[methods]]
name = "full"
[[methods]]
name = "uniform"
grid = { fraction = [0.25, 0.5], class_balanced = [true, false] }
"""


def test_spec_expands_to_the_cartesian_product(tmp_path):
    sweep = load_sweep(write_spec(tmp_path, GOOD_SPEC))
    assert len(sweep.runs) == 2 * (1 + 4)
    assert {(r.method, r.params.get("fraction"), r.seed) for r in sweep.runs} >= {("uniform", 0.25, 1), ("full", None, 0)}
    path, lines = write_manifest(sweep, tmp_path / "out")
    assert path.read_text().count("\n") == 10 and len({line["run_id"] for line in lines}) == 10
    assert all(line["overrides"] == {"epochs": 1} and line["group"] == "t" for line in lines)
    assert compress_indices([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and compress_indices([3]) == "3"


@pytest.mark.parametrize("spec", sorted(p.stem for p in (REPO / "benchmarks" / "sweeps").glob("*.toml")))
def test_built_in_specs_load_with_valid_methods_and_parameters(spec):
    sweep = load_sweep(spec)  # checks keys, method names and every parameter against its range
    distinct = {(r.method, tuple(sorted(r.params.items())), r.seed, json.dumps(r.overrides, sort_keys=True))
                for r in sweep.runs}
    assert sweep.runs and len(distinct) == len(sweep.runs)


def test_fashion_pruning_spec_covers_the_static_pruning_grid():
    sweep = load_sweep("fashion-pruning")
    kept = {(r.method, r.params.get("fraction"), r.seed) for r in sweep.runs}
    for method in ("uniform", "el2n", "grand", "forgetting", "ccs", "kcenter", "herding"):
        for fraction in (0.9, 0.7, 0.5, 0.3):
            assert {(method, fraction, 0), (method, fraction, 1)} <= kept
    assert {("full", None, 0), ("full", None, 1)} <= kept and len(sweep.runs) == 58


@pytest.mark.parametrize("change, message", [
    (("name = \"full\"", "name = \"fulll\""), "unknown method 'fulll'"),
    (("seeds = [0, 1]", "seeds = [0, 1]\nseed = 3"), "unknown key 'seed'"),
    (("grid = { fraction = [0.25, 0.5],", "grid = { fraction = [],"), "grid 'fraction' is empty"),
    (("fraction = [0.25, 0.5]", "fraction = [0.25, 5.0]"), "out of range"),
    (("seeds = [0, 1]", "seeds = []"), "'seeds' must be a non-empty list"),
])
def test_bad_spec_is_one_readable_line(tmp_path, change, message):
    spec = write_spec(tmp_path, GOOD_SPEC.replace(*change))
    result = cli("sweep", spec, "--out", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_local_sweep_skips_complete_runs_and_reports_failures(tmp_path):
    spec = write_spec(tmp_path, GOOD_SPEC.replace("seeds = [0, 1]", "seeds = [0]"))
    out = str(tmp_path / "out")
    first = cli("sweep", spec, "--out", out, "--jobs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "5 to run, 0 already complete" in first.stdout and "summary: 5 complete" in first.stdout
    # Damage one record: status and tables name it, and the sweep reruns only that run.
    manifest = tmp_path / "out" / "sweeps" / "t" / "manifest.jsonl"
    victim = json.loads(manifest.read_text().splitlines()[2])
    ResultsLayout(out).record(victim["run_id"]).write_text('{"schema": 1, "run_')
    status = cli("status", "t", "--out", out)
    assert status.returncode == 0 and "corrupt" in status.stdout and victim["run_id"] in status.stdout
    tables = cli("tables", "--runs", out)
    assert tables.returncode == 0 and f"{victim['run_id']}.json" in tables.stderr
    again = cli("sweep", spec, "--out", out)
    assert "1 to run, 4 already complete" in again.stdout and "summary: 1 complete" in again.stdout


def _start_and_wait_for(args: list[str], marker: str, env: dict | None = None) -> subprocess.Popen:
    """Start the CLI and return once its output shows `marker` (then it is mid-run)."""
    return start_until([sys.executable, "-m", "benchmarks", *args], marker, 120, cwd=REPO,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def test_sigkill_then_rerun_resumes_with_identical_results(tmp_path):
    reference = execute(RunSpec("smoke", "uniform-epoch", {}, 3, LONG), tmp_path / "ref", log=quiet)
    out = str(tmp_path / "cut")
    args = ["run", "--protocol", "smoke", "--method", "uniform-epoch", "--seed", "3", *LONG_SET, "--out", out]
    proc = _start_and_wait_for(args, FIRST_EPOCH_DONE)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rid = reference["run_id"]
    assert ResultsLayout(out).checkpoint(rid).exists() and not ResultsLayout(out).record(rid).exists()
    resumed = cli("run", *args[1:])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed at epoch 1" in resumed.stdout
    same_results(load_record(ResultsLayout(out).record(rid)), reference)
    assert not ResultsLayout(out).checkpoint(rid).exists()  # deleted once complete


def test_sigusr1_checkpoints_mid_epoch_and_resumes_identically(tmp_path):
    reference = execute(RunSpec("smoke", "infobatch", {}, 1, LONG), tmp_path / "ref", log=quiet)
    out = tmp_path / "cut"
    sweep_spec = write_spec(tmp_path, """
name = "pre"
protocol = "smoke"
seeds = [1]
overrides = { epochs = 3, data_kwargs = { n_train = 6000, n_test = 512, num_classes = 4, size = 8 } }
[[methods]]
name = "infobatch"
""")
    manifest, _ = write_manifest(load_sweep(sweep_spec), out)
    proc = _start_and_wait_for(["task", str(manifest), "0"], FIRST_EPOCH_DONE)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 3
    partial = torch.load(ResultsLayout(out).checkpoint(reference["run_id"]), weights_only=False)["trainer"]["partial"]
    assert partial["epoch"] == 1 and partial["steps_done"] > 0  # stopped mid-epoch, not at its end
    rid = reference["run_id"]
    [(_, _, state, _)] = sweep_status(manifest)
    assert state == "interrupted"
    again = cli("task", str(manifest), "0")
    assert again.returncode == 0, again.stdout + again.stderr
    same_results(load_record(ResultsLayout(out).record(rid)), reference)


WRITER = """
import sys
from benchmarks.core.record import write_record
for i in range(300):
    write_record(sys.argv[1], {"schema": 1, "run_id": "x", "status": "complete", "protocol": "p", "method": "m",
                               "params": {}, "seed": int(sys.argv[2]), "overrides": {}, "pad": "x" * 20000})
"""


def test_two_writers_finishing_at_once_never_corrupt_a_record(tmp_path):
    path = tmp_path / "r.json"
    write_record(path, {"schema": 1, "run_id": "x", "status": "complete", "protocol": "p", "method": "m",
                        "params": {}, "seed": 0, "overrides": {}})
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(k)]) for k in (1, 2)]
    reads = 0
    while any(w.poll() is None for w in writers):
        assert load_record(path)["seed"] in (0, 1, 2)
        reads += 1
    assert reads > 10 and load_record(path)["seed"] in (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# -- the real Slurm cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    return start_cluster()


def _env() -> dict:
    return dict(os.environ, BENCH_PYTHON=sys.executable, PYTHONPATH=str(REPO))


def test_smoke_sweep_as_a_slurm_array_completes(cluster, tmp_path):
    out = str(tmp_path / "results")
    result = cli("sweep", "smoke", "--executor", "slurm", "--out", out, "--slurm", "parallel=2",
                 "--set", "epochs=1", env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split("submitted job array ")[1].split()[0]
    _wait_gone(job_id, timeout=300)
    status = cli("status", "smoke", "--out", out)
    assert "total: 10 complete" in status.stdout, status.stdout + _logs(out)
    resubmit = cli("sweep", "smoke", "--executor", "slurm", "--out", out, "--set", "epochs=1", env=_env())
    assert "0 to run, 10 already complete" in resubmit.stdout and "submitted" not in resubmit.stdout


def _logs(out: str) -> str:
    return "\n".join(p.read_text() for p in Path(out).rglob("logs/*.out"))


def test_slurm_warning_signal_checkpoints_requeues_and_completes(cluster, tmp_path):
    # 8 epochs: the signal, sent after the first, must land before training ends even on a loaded
    # machine, where scancel's delivery took seconds (with 4, a run once completed first: exit 0, no requeue).
    reference = execute(RunSpec("smoke", "uniform-epoch", {}, 5, {**LONG, "epochs": 8}), tmp_path / "ref", log=quiet)
    out = tmp_path / "results"
    spec = write_spec(tmp_path, """
name = "preempt"
protocol = "smoke"
seeds = [5]
overrides = { epochs = 8, data_kwargs = { n_train = 6000, n_test = 512, num_classes = 4, size = 8 } }
[[methods]]
name = "uniform-epoch"
""")
    result = cli("sweep", spec, "--executor", "slurm", "--out", str(out), env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split("submitted job array ")[1].split()[0]
    log = out / "sweeps" / "preempt" / "logs" / f"{job_id}_0.out"
    deadline = time.monotonic() + 120
    while "epoch 1/8" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, _logs(str(out))
        time.sleep(0.2)
    _run(["scancel", "--signal=USR1", "--batch", f"{job_id}_0"])
    _wait_gone(job_id, timeout=240)
    text = log.read_text()
    assert "received SIGUSR1" in text and f"requeued {job_id}_0" in text and "resumed at epoch" in text, text
    same_results(load_record(ResultsLayout(out).record(reference["run_id"])), reference)


def test_a_block_may_add_overrides_and_the_command_line_wins(tmp_path):
    spec = write_spec(tmp_path, GOOD_SPEC + """
[[methods]]
name = "full"
overrides = { holdout = 64, epochs = 2 }
""")
    sweep = load_sweep(spec, {"epochs": 3})
    plain = [r.overrides for r in sweep.runs if r.method == "uniform"]
    own = [r.overrides for r in sweep.runs if r.method == "full" and "holdout" in r.overrides]
    assert all(o == {"epochs": 3} for o in plain) and len(own) == 2
    assert all(o == {"epochs": 3, "holdout": 64} for o in own)  # spec < block < --set
    bad = write_spec(tmp_path, GOOD_SPEC + '\n[[methods]]\nname = "full"\noverrides = 3\n')
    with pytest.raises(BenchError, match="'overrides' must be a table"):
        load_sweep(bad)
