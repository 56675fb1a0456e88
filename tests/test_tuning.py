"""Declared tuning (benchmarks/jobs/tuning.py): seeded draws inside the declared spaces, the same number
of trials for every method, selection on a validation metric only, phase 2 at every seed, resumable."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli
from benchmarks.api import Method, Param, Space, register
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import SCHEMA, load_record, write_record
from benchmarks.core.registry import list_methods
from benchmarks.core.run import execute
from benchmarks.errors import BenchError
from benchmarks.jobs import sweep as sweep_module
from benchmarks.jobs.sweep import line_spec, load_sweep, read_manifest, sweep_status
from benchmarks.jobs.tuning import add_selected_runs, choose, draw_trials, search_space, space_size
from benchmarks.reporting.tables import build_sections, markdown_tables
from conftest import quiet
from slurm_support import REPO

SPEC = """
name = "tuned"
protocol = "smoke-groups"
seeds = [0, 1, 2]
overrides = { epochs = 1 }
[tuning]
trials = 3
metric = "val_worst_group_acc"
seed = 1000
[[methods]]
name = "full"
[[methods]]
name = "jtt"
grid = { error_set = "eval-pass" }
[[methods]]
name = "group-dro"
[[methods]]
name = "uniform"
tune = false
grid = { fraction = [0.5] }
"""


def write_spec(tmp_path: Path, text: str = SPEC) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return str(path)


# -- the sampler --------------------------------------------------------------------------------------

def test_draws_are_seeded_and_stay_inside_every_declared_space():
    spaces = [Space(choices=(20, 50, 100)), Space.range(0.2, 0.7), Space.range(1e-4, 1e-1, log=True),
              Space.range(1, 9), Space.range(1, 1000, log=True)]
    for space in spaces:
        draws = [space.sample(random.Random(7)) for _ in range(3)]
        assert draws[0] == draws[1] == draws[2]  # a seed gives one draw
        rng = random.Random(0)
        values = [space.sample(rng) for _ in range(4000)]
        assert all(space.contains(v) for v in values), space
        if space.choices:
            assert set(values) == set(space.choices)  # every choice is reached
        if space.integer:
            assert all(isinstance(v, int) for v in values) and {space.low, space.high} <= set(values)
    # Log-uniform: each decade of [1e-4, 1e-1] gets about a third of the draws (uniform would give the
    # last decade 90%); uniform: each half of the range about half.
    rng = random.Random(1)
    logs = [Space.range(1e-4, 1e-1, log=True).sample(rng) for _ in range(6000)]
    for low in (1e-4, 1e-3, 1e-2):
        share = sum(low <= v < 10 * low for v in logs) / len(logs)
        assert abs(share - 1 / 3) < 0.03, (low, share)
    flat = [Space.range(0.2, 0.7).sample(rng) for _ in range(6000)]
    assert abs(sum(v < 0.45 for v in flat) / len(flat) - 0.5) < 0.03
    # Integers drawn log-uniformly: 1 gets log(2)/log(1001) of the mass, far more than 1/1000.
    ints = [Space.range(1, 1000, log=True).sample(rng) for _ in range(6000)]
    assert abs(sum(v == 1 for v in ints) / len(ints) - math.log(2) / math.log(1001)) < 0.03


def test_every_registered_method_draws_valid_settings_reproducibly():
    tuned = 0
    for name, cls in list_methods().items():
        params, settings = search_space(name, set(), set())
        if not params and not settings:
            continue
        tuned += 1
        n = min(8, space_size({**params, **settings}) or 8)
        trials = draw_trials(name, params, settings, n, seed=1000)
        assert trials == draw_trials(name, params, settings, n, seed=1000)  # reproducible
        assert trials[:2] == draw_trials(name, params, settings, 2, seed=1000)  # more trials keep the first
        assert len({repr(t) for t in trials}) == n  # distinct
        if n == 8:
            assert trials != draw_trials(name, params, settings, 8, seed=1001)
        else:  # a finite space smaller than the trials asked for: one clear line
            with pytest.raises(BenchError, match=f"only {n} distinct settings"):
                draw_trials(name, params, settings, n + 1, seed=1000)
        for drawn_params, drawn_settings in trials:
            for key, value in drawn_params.items():
                assert cls.params[key].check(name, key, value) == value and params[key].contains(value)
            for key, value in drawn_settings.items():
                assert settings[key].contains(value)
    assert tuned >= 4  # full, jtt, group-dro, greats declare spaces


def test_space_declarations_are_checked_when_a_method_is_registered():
    with pytest.raises(ValueError, match="leaves the parameter's own bounds"):
        @register("tuning-test-out-of-bounds")
        class OutOfBounds(Method):
            params = {"x": Param(0.5, low=0.0, high=1.0, space=Space.range(0.1, 2.0))}
    with pytest.raises(ValueError, match="leaves the parameter's own bounds"):
        @register("tuning-test-bad-choice")
        class BadChoice(Method):
            params = {"x": Param("a", choices=("a", "b"), space=("a", "c"))}
    with pytest.raises(ValueError, match="int bounds"):
        Param(3, low=1, space=Space.range(1.0, 5.0))
    with pytest.raises(ValueError, match="low > 0"):
        Space.range(0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="not a numeric protocol setting"):
        @register("tuning-test-unknown-setting")
        class UnknownSetting(Method):
            protocol_space = {"learning_rate": Space.range(1e-3, 1e-1, log=True)}
    assert Param(0.5, space=Space.range(0, 1)).space == Space(low=0.0, high=1.0)  # a float param draws floats


# -- specs --------------------------------------------------------------------------------------------

def test_every_tuned_method_gets_the_same_number_of_trials_at_the_tuning_seed(tmp_path):
    sweep = load_sweep(write_spec(tmp_path))
    assert [s.method for s in sweep.tuned] == ["full", "jtt", "group-dro"]
    assert all(len(s.trials) == 3 for s in sweep.tuned)
    trials = [t for s in sweep.tuned for t in s.trials]
    assert all(t.seed == 1000 and t.tuning["role"] == "trial" for t in trials)
    assert [t.tuning["trial"] for t in trials] == [0, 1, 2] * 3
    assert len({t.run_id for t in trials}) == 9
    # The grid fixes what it names; the spec's overrides stay under the drawn settings.
    jtt = sweep.tuned[1]
    assert all(t.params["error_set"] == "eval-pass" and t.overrides["epochs"] == 1 for t in jtt.trials)
    assert {"lr", "weight_decay"} == set(jtt.trials[0].tuning["tuned_overrides"])
    # The untuned block runs its grid at the spec's seeds; no selected run exists before the trials.
    assert sorted((r.method, r.seed) for r in sweep.runs if r.tuning is None) == [("uniform", s) for s in (0, 1, 2)]
    assert len(sweep.runs) == 9 + 3
    quick = load_sweep(write_spec(tmp_path), quick=True)
    assert all(len(s.trials) == 1 for s in quick.tuned)


def fake_trial_records(out: Path, setting, val: list[float], test: list[float]) -> None:
    """Complete records for a setting's trials with the given validation and test worst-group accuracies."""
    for spec, v, t in zip(setting.trials, val, test):
        run = spec.resolve()
        write_record(ResultsLayout(out).record(run.run_id), {
            **run.identity(), "schema": SCHEMA, "status": "complete",
            "metrics": {"val_worst_group_acc": v, "val_acc": 0.5, "test_worst_group_acc": t, "test_acc": t},
            "compute": {"fraction": 1.0, "selection_share": 0.0, "full_flops": 10}})


def test_selection_reads_the_validation_metric_and_never_a_test_one(tmp_path):
    out = tmp_path / "out"
    sweep = load_sweep(write_spec(tmp_path))
    full = sweep.tuned[0]
    fake_trial_records(out, full, val=[0.30, 0.60, 0.45], test=[0.10, 0.20, 0.90])
    add_selected_runs(sweep, out)
    assert full.selected[0].tuning["trial"] == 1
    # Poison: rewrite every trial's test metrics to favour each other trial in turn; the choice stands.
    for favoured in (0, 2):
        for i, spec in enumerate(full.trials):
            path = ResultsLayout(out).record(spec.run_id)
            record = load_record(path)
            record["metrics"].update(test_acc=1.0 if i == favoured else 0.0,
                                     test_worst_group_acc=1.0 if i == favoured else 0.0)
            write_record(path, record)
        again = load_sweep(write_spec(tmp_path))
        add_selected_runs(again, out)
        assert again.tuned[0].selected[0].tuning["trial"] == 1
        assert [r.run_id for r in again.tuned[0].selected] == [r.run_id for r in full.selected]
    assert choose([0.5, 0.7, 0.7]) == 1 and choose([0.5, 0.7, 0.7], "min") == 0  # ties: the lowest trial
    assert choose([float("nan"), 0.1]) == 1 and choose([None, None]) == 0


def test_the_selected_setting_runs_at_every_seed_once_all_its_trials_are_complete(tmp_path):
    out = tmp_path / "out"
    sweep = load_sweep(write_spec(tmp_path))
    full, jtt, dro = sweep.tuned
    fake_trial_records(out, full, val=[0.2, 0.1, 0.4], test=[0.0] * 3)
    fake_trial_records(out, jtt, val=[0.2, 0.1], test=[0.0] * 2)  # one trial missing: jtt waits
    lines = add_selected_runs(sweep, out)
    assert "waiting for 1 of 3 trials" in lines[1] and not jtt.selected and not dro.selected
    chosen = full.trials[2]
    assert [(r.seed, r.params, r.overrides) for r in full.selected] == [(s, chosen.params, chosen.overrides)
                                                                         for s in (0, 1, 2)]
    descriptor = full.selected[0].tuning
    assert descriptor["role"] == "selected" and descriptor["trial"] == 2 and descriptor["of"] == 3
    assert descriptor["trial_runs"] == [t.run_id for t in full.trials]
    assert descriptor["metric"] == "val_worst_group_acc"
    assert sweep.runs[-3:] == full.selected  # phase 2 joins the sweep after phase 1
    # A trial's record without the metric is one line saying so.
    fake_trial_records(out, dro, val=[0.1, 0.2, 0.3], test=[0.0] * 3)
    path = ResultsLayout(out).record(dro.trials[0].run_id)
    record = load_record(path)
    del record["metrics"]["val_worst_group_acc"]
    write_record(path, record)
    with pytest.raises(BenchError, match="no metric 'val_worst_group_acc'"):
        add_selected_runs(sweep, out)


@pytest.mark.parametrize("change, message", [
    (("seed = 1000", "seed = 1"), "seed 1 is also one of the spec's seeds"),
    (("trials = 3", "trials = 0"), "'trials' must be a whole number >= 1"),
    (('metric = "val_worst_group_acc"', 'metric = "train_loss"'), "not a validation metric"),
    (('[[methods]]\nname = "full"', '[[methods]]\nname = "infobatch"'), "has nothing to tune"),
    (("[tuning]\ntrials = 3\nmetric = \"val_worst_group_acc\"\nseed = 1000\n", ""), "needs the spec's [tuning]"),
])
def test_bad_tuning_specs_are_refused(tmp_path, change, message):
    text = SPEC.replace(*change)
    if "needs the spec" in message:
        text = text.replace('name = "full"', 'name = "full"\ntune = true')
    with pytest.raises(BenchError, match=re.escape(message)):
        load_sweep(write_spec(tmp_path, text))


def test_a_test_metric_is_refused_in_one_line(tmp_path):
    spec = write_spec(tmp_path, SPEC.replace('metric = "val_worst_group_acc"', 'metric = "test_worst_group_acc"'))
    result = subprocess.run([sys.executable, "-m", "benchmarks", "sweep", spec, "--out", str(tmp_path / "out"),
                             "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'test_worst_group_acc' is a test metric" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- end to end, and resuming ---------------------------------------------------------------------------

E2E = """
name = "tuned-smoke"
protocol = "smoke-groups"
seeds = [0, 1]
overrides = { epochs = 1 }
[tuning]
trials = 2
metric = "val_worst_group_acc"
seed = 1000
[[methods]]
name = "full"
[[methods]]
name = "group-dro"
"""


class InProcessExecutor:
    """Stands in for the local executor: runs manifest lines in this process (no interpreter start per
    run) and counts what it executes; `limit` stops it after that many runs, as a killed sweep."""

    def __init__(self):
        self.executed: list[str] = []
        self.limit: int | None = None

    def __call__(self, manifest, indices, jobs=1, log=print):
        lines = read_manifest(manifest)
        for i in indices:
            if self.limit is not None and self.limit <= 0:
                break
            line = lines[i]
            execute(line_spec(line), line["out"], log=quiet, progress=False, group=line["group"])
            self.executed.append(line["run_id"])
            if self.limit is not None:
                self.limit -= 1
        final: dict[str, list[int]] = {}
        for i, _, state, _ in sweep_status(manifest):
            if i in indices:
                final.setdefault(state, []).append(i)
        return final


def test_a_tuned_smoke_sweep_runs_both_phases_tables_them_and_resumes_without_redoing(tmp_path, monkeypatch, capsys):
    executor = InProcessExecutor()
    monkeypatch.setattr(sweep_module, "run_local", executor)
    spec, out = write_spec(tmp_path, E2E), tmp_path / "out"
    args = ["sweep", spec, "--out", str(out), "--wandb", "off"]
    # Killed after 3 runs: full's two trials and group-dro's first; full's phase 2 was reached but not run.
    executor.limit = 3
    assert cli.main(args) == 1
    first = list(executor.executed)
    assert len(first) == 3
    # Run again: only what is missing (group-dro's last trial, then both selected settings at both seeds).
    executor.limit = None
    assert cli.main(args) == 0
    second = executor.executed[3:]
    assert len(second) == 1 + 4 and not set(first) & set(second)
    lines = read_manifest(out / "sweeps" / "tuned-smoke" / "manifest.jsonl")
    roles = [(line["method"], (line.get("tuning") or {}).get("role"), line["seed"]) for line in lines]
    assert sorted(roles) == sorted([(m, "trial", 1000) for m in ("full", "group-dro") for _ in range(2)]
                                   + [(m, "selected", s) for m in ("full", "group-dro") for s in (0, 1)])
    assert {line["run_id"] for line in lines} == set(executor.executed)  # every run once, none twice
    for line in lines:  # the descriptor travels into the record unchanged
        assert load_record(ResultsLayout(out).record(line["run_id"])).get("tuning") == line.get("tuning")
    selected = {line["run_id"] for line in lines if (line.get("tuning") or {}).get("role") == "selected"}
    # A third call does nothing; the selection recomputed from the records names the same runs.
    capsys.readouterr()
    assert cli.main(args) == 0 and len(executor.executed) == 8
    assert "0 to run, 8 already complete" in capsys.readouterr().out
    # Lose one trial's record and one selected run's record: exactly those two run again.
    trial = next(line["run_id"] for line in lines if line["tuning"]["role"] == "trial")
    lost = sorted(selected)[0]
    ResultsLayout(out).record(trial).unlink()
    ResultsLayout(out).record(lost).unlink()
    assert cli.main(args) == 0
    assert executor.executed[8:] == [trial, lost]
    again = read_manifest(out / "sweeps" / "tuned-smoke" / "manifest.jsonl")
    assert {line["run_id"] for line in again if line["tuning"]["role"] == "selected"} == selected
    # The job's table: the tuned rows with their tuning, the trials apart, never as compared rows.
    table = (out / "sweeps" / "tuned-smoke" / "tables" / "smoke-groups.md").read_text()
    rows = [row for row in table.split("#### ")[0].splitlines() if row.startswith("| full") or
            row.startswith("| group-dro")]
    assert len(rows) == 2 and all("tuned: 2 trials on val_worst_group_acc" in row and "| 2 |" in row for row in rows)
    assert "| tuning compute |" in table and "tuning trials" in table
    assert table.count("| full | 0 |") == 1 and table.count("| group-dro | 1 |") == 1


# -- tables ---------------------------------------------------------------------------------------------

def record(rid: str, method: str, seed: int, acc: float, fraction: float, *, params=None, overrides=None,
           tuning=None, val=None) -> dict:
    rec = {"schema": SCHEMA, "run_id": rid, "status": "complete", "protocol": "toy", "method": method,
           "params": params or {}, "seed": seed, "overrides": overrides or {}, "budget": "epochs",
           "resolved_protocol": {"name": "toy", "budget": "epochs"}, "protocol_fingerprint": "f" * 16,
           "metrics": {"test_acc": acc, **({"val_acc": val} if val is not None else {})},
           "compute": {"fraction": fraction, "selection_share": 0.0, "full_flops": 100},
           "wall_clock_s": 1.0, "curve": [{"epoch": 0, "flops": 100 * fraction, "test_acc": acc}]}
    if tuning is not None:
        rec["tuning"] = tuning
    return rec


def test_tables_keep_trials_apart_and_show_the_tuning_compute():
    base = {"tuned_params": [], "tuned_overrides": ["lr"], "base_overrides": {"epochs": 2},
            "base_fingerprint": "b" * 16}
    trials = [record(f"t{i}", "full", 1000, 0.99, f, overrides={"epochs": 2, "lr": lr},
                     tuning={"role": "trial", "trial": i, **base}, val=v)
              for i, (f, lr, v) in enumerate([(1.0, 0.1, 0.5), (1.25, 0.01, 0.7), (0.5, 0.03, 0.6)])]
    chosen = {"role": "selected", "trial": 1, "of": 3, "metric": "val_acc", "direction": "max", "seed": 1000,
              "trial_runs": ["t0", "t1", "t2"], **base}
    selected = [record(f"s{s}", "full", s, 0.80 + s / 100, 1.0, overrides={"epochs": 2, "lr": 0.01}, tuning=chosen)
                for s in (0, 1)]
    plain = [record(f"u{s}", "uniform", s, 0.7, 0.5, params={"fraction": 0.5}, overrides={"epochs": 2})
             for s in (0, 1)]
    for r in plain:
        r["protocol_fingerprint"] = "b" * 16  # the base protocol of the tuned runs: one section
    [section] = build_sections(trials + selected + plain)
    assert set(section.runs["run_id"]) == {"s0", "s1", "u0", "u1"}  # trials are not rows
    full = section.summary[section.summary["method"] == "full"].iloc[0]
    assert full.n == 2 and full.label == "lr=0.01" and full.tuning == "tuned: 3 trials on val_acc"
    assert full.tuning_compute == pytest.approx(2.75)
    assert section.full_mean == pytest.approx(0.805)  # the tuned reference gives the full-data mean
    text = markdown_tables([section])["toy"]
    assert "| full | lr=0.01 | tuned: 3 trials on val_acc | 2 |" in text and "| 2.750 |" in text
    assert "| uniform | fraction=0.5 | not tuned | 2 |" in text
    assert "| full | 1 | lr=0.01 | val_acc | 70.00 | 1.250 | yes |" in text
    assert "Not every row is tuned the same way" in text
    # Without tuned records nothing of it appears (the published tables regenerate byte for byte).
    plain_text = markdown_tables(build_sections(plain))["toy"]
    assert "tuning" not in plain_text and "tuned" not in plain_text


def test_manifest_lines_carry_the_descriptor_and_the_run_id_depends_on_it(tmp_path):
    sweep = load_sweep(write_spec(tmp_path))
    trial = sweep.tuned[0].trials[0]
    untuned = type(trial)(trial.protocol, trial.method, trial.params, trial.seed, trial.overrides)
    assert untuned.run_id != trial.run_id  # a trial is a run of its own; an untuned run keeps its id
    _, lines = sweep_module.write_manifest(sweep, tmp_path / "out")
    assert json.loads(json.dumps(lines[0]["tuning"])) == trial.tuning
    assert line_spec(lines[0]).run_id == trial.run_id
