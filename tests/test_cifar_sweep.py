"""The CIFAR-10 sweep covers the registry at the papers' settings, with per-method Slurm time limits, and
`sweep cifar10 --quick` runs every block end to end (on synthetic data in torchvision's CIFAR-10 format)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_data import write_cifar10

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import load_record
from benchmarks.core.registry import list_methods
from benchmarks.jobs.sweep import load_sweep, manifest_lines, sbatch_command, slurm_groups
from slurm_support import REPO


def supervised_methods() -> set[str]:
    """Every supervised method but those for data with groups (JTT, Group DRO: their protocols are
    Waterbirds and spurious-fashion) and test-only ones."""
    return {name for name, cls in list_methods().items()
            if cls.traits.kind == "supervised" and not cls.traits.for_groups and not name.startswith("test-")}


def test_every_registered_supervised_method_has_a_block():
    sweep = load_sweep("cifar10")
    missing = supervised_methods() - {run.method for run in sweep.runs}
    assert not missing, f"add a [[methods]] block to benchmarks/sweeps/cifar10.toml for: {sorted(missing)}"


def test_methods_run_at_their_papers_settings():
    sweep = load_sweep("cifar10")
    by_method: dict[str, list[dict]] = {}
    for run in sweep.runs:
        by_method.setdefault(run.method, []).append(run.params)
    assert sorted({p["prune_ratio"] for p in by_method["infobatch"]}) == [0.3, 0.5, 0.7]
    assert {p["delta"] for p in by_method["infobatch"]} == {0.875}
    for name in ("el2n", "grand", "grand-lastlayer", "forgetting"):
        assert {p["score_runs"] for p in by_method[name]} == {10}, name
    for name in ("aum", "ccs"):  # one training run's margins, as the AUM paper and the official CCS code
        assert {p["score_runs"] for p in by_method[name]} == {1}, name
    assert {p["score_epoch"] for p in by_method["el2n"]} == {-1}  # 10% of 200 = epoch 20
    assert {p["score_epoch"] for p in by_method["grand"]} == {0}  # at initialisation
    assert {p["score_epoch"] for p in by_method["forgetting"]} == {-1}  # the whole training
    ccs = by_method["ccs"]
    assert {(p["score"], p["ccs_beta"], p["mode"]) for p in ccs} == {("aum", -1.0, "ccs")}  # per-rate beta
    assert sorted({p["fraction"] for p in ccs}) == [0.1, 0.2, 0.3, 0.5, 0.7]  # 90/80/70/50/30% pruned
    assert {p["fraction"] for p in ccs} <= {p["fraction"] for p in by_method["uniform"]}
    assert sorted(r.seed for r in sweep.runs if r.method == "full" and not r.overrides) == [0, 1, 2]


def test_each_method_gets_its_time_limit_and_one_array_per_limit(tmp_path):
    sweep = load_sweep("cifar10")
    lines = manifest_lines(sweep, tmp_path)
    groups = slurm_groups(lines, list(range(len(lines))), sweep.slurm, {})
    times = {}
    for options, indices in groups:
        for i in indices:
            times.setdefault(lines[i]["method"], set()).add(options["time"])
    assert all(len(t) == 1 for t in times.values()) and set(times) == supervised_methods()
    assert times["full"] == {"03:00:00"} and times["forgetting"] == {"24:00:00"} and times["el2n"] == {"05:00:00"}
    assert len(groups) == len({t for ts in times.values() for t in ts})
    assert sorted(i for _, indices in groups for i in indices) == list(range(len(lines)))  # each line once
    for options, indices in groups:  # the time limit reaches sbatch, with the spec's GPU request
        command = sbatch_command(tmp_path / "manifest.jsonl", indices, options, "bench-cifar10")
        assert f"--time={options['time']}" in command and "--gres=gpu:1" in command
    # --slurm on the command line wins over every block
    (only, _), = slurm_groups(lines, list(range(len(lines))), sweep.slurm, {"time": "00:30:00"})
    assert only["time"] == "00:30:00"


def test_online_methods_share_one_held_out_split_step_count_and_reference():
    sweep = load_sweep("cifar10")
    online = {"uniform-online", "max-loss", "grad-norm", "rho-loss", "greats"}
    settings = {(r.method, json.dumps(r.overrides, sort_keys=True)) for r in sweep.runs if r.method in online}
    assert {o for _, o in settings} == {json.dumps({"budget": "iterations", "holdout": 0.1}, sort_keys=True)}
    assert {m for m, _ in settings} == online and all(
        r.params["candidate_factor"] == 2 for r in sweep.runs if r.method in online)
    references = [r for r in sweep.runs if r.method == "full" and r.overrides]
    assert len(references) == 3 and all(r.overrides == {"budget": "iterations", "holdout": 0.1} for r in references)


def test_quick_keeps_one_seed_and_the_first_grid_point_of_every_block():
    full, quick = load_sweep("cifar10"), load_sweep("cifar10", quick=True)
    assert {r.method for r in quick.runs} == {r.method for r in full.runs}
    assert {r.seed for r in quick.runs} == {0} and len(quick.runs) == 18  # one run per [[methods]] block


@pytest.mark.slow
def test_quick_sweep_runs_every_block_end_to_end_on_cifar_format_data(tmp_path):
    write_cifar10(tmp_path / "data" / "cifar-10-batches-py", n_per_batch=16)  # 80 train, 16 test images
    out = tmp_path / "out"
    env = dict(os.environ, BENCH_DATA=str(tmp_path / "data"), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    # --quick: every block once; the --set items shrink it further to seconds per run on a CPU (the
    # tiny CNN instead of ResNet-18, whose GraNd hooks and training tests/test_scores.py checks);
    # two runs at a time, one thread each, as CI has two cores
    result = subprocess.run([sys.executable, "-m", "benchmarks", "sweep", "cifar10", "--quick", "--out", str(out),
                             "--jobs", "2", "--set", "epochs=2", "--set", "model=tiny-cnn", "--wandb", "off"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "sweeps" / "cifar10" / "manifest.jsonl").read_text().splitlines()]
    assert {line["method"] for line in lines} == supervised_methods()
    for line in lines:
        record = load_record(ResultsLayout(out).record(line["run_id"]))
        held_out = 8 if line["overrides"].get("holdout") else 0  # the online family holds out 10% of 80
        assert record["status"] == "complete" and record["n_train"] == 80 - held_out, line["method"]
        assert record["resolved_protocol"]["dataset"] == "cifar10"
        if line["method"] not in ("full", "uniform", "uniform-epoch", "infobatch", "uniform-online"):
            assert record["compute"]["selection_flops"] > 0, line["method"]


TWO_LIMITS = """
name = "limits"
protocol = "smoke"
seeds = [0]
overrides = { epochs = 1 }
[slurm]
parallel = 2
time = "00:09:00"
[[methods]]
name = "full"
[[methods]]
name = "uniform"
grid = { fraction = [0.5] }
slurm = { time = "00:07:00" }
"""


def test_blocks_with_their_own_time_limits_run_as_separate_arrays_on_slurm(tmp_path):
    from slurm_support import _wait_gone, start_cluster

    start_cluster()
    spec = tmp_path / "limits.toml"
    spec.write_text(TWO_LIMITS)
    out = tmp_path / "results"
    env = dict(os.environ, BENCH_PYTHON=sys.executable, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, "-m", "benchmarks", "sweep", str(spec), "--executor", "slurm",
                             "--out", str(out), "--wandb", "off"], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("submitted job array") == 2
    submissions = [json.loads(line) for line in (out / "sweeps" / "limits" / "submissions.jsonl").read_text().splitlines()]
    limits = {sub["indices"][0]: next(a for a in sub["command"] if a.startswith("--time=")) for sub in submissions}
    assert limits == {0: "--time=00:09:00", 1: "--time=00:07:00"}  # full: the spec's; uniform: its block's
    for sub in submissions:
        _wait_gone(sub["job_id"], timeout=300)
    status = subprocess.run([sys.executable, "-m", "benchmarks", "status", "limits", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, env=env)
    assert "total: 2 complete" in status.stdout, status.stdout
