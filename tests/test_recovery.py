"""Nothing lost, nothing silently reused: stale markers, bounded requeues, preemption inside `prepare`,
protocol edits, honest wall-clock, checks before launching (no cluster needed; the Slurm ones are in
test_slurm_faults.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.cli import main
from benchmarks.core import train
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import load_record, write_record
from benchmarks.core.run import RunSpec, execute
from benchmarks.jobs import tasks
from benchmarks.jobs.sweep import load_sweep, sweep_status, write_manifest
from benchmarks.jobs.tasks import Marker, RequeueState, marker_alive, parse_slurm_time, requeue_decision
from conftest import quiet
from slurm_support import REPO
from test_sweep import LONG, _start_and_wait_for, cli, same_results, write_spec

LONG_SPEC = """
name = "k"
protocol = "smoke"
seeds = [3]
overrides = { epochs = 3, data_kwargs = { n_train = 6000, n_test = 512, num_classes = 4, size = 8 } }
[[methods]]
name = "uniform-epoch"
"""


# -- running markers: what proves a run alive -------------------------------------------------------

def marker_file(tmp_path: Path, marker: Marker, age: float = 0.0) -> Path:
    path = tmp_path / "running" / "r"
    tasks.write_marker(path, marker)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_marker_alive_on_this_host_only_for_the_same_live_process(tmp_path):
    me = tasks.this_marker(None)
    assert marker_alive(me, marker_file(tmp_path, me), {})[0]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that existed and is gone
    dead = Marker(socket.gethostname(), child.pid, None, None, time.time())
    assert marker_alive(dead, marker_file(tmp_path, dead), {}) == (False, f"pid {child.pid} on {dead.host} is gone")
    recycled = Marker(socket.gethostname(), os.getpid(), "1", None, time.time())  # our pid, another start time
    assert not marker_alive(recycled, marker_file(tmp_path, recycled), {})[0]


def test_marker_alive_under_slurm_only_while_squeue_lists_the_task(tmp_path):
    marker = Marker("node7", 1234, "99", "55_3", time.time())
    path = marker_file(tmp_path, marker)
    assert marker_alive(marker, path, {"55_3": "RUNNING"}) == (True, "slurm task 55_3 running")
    assert marker_alive(marker, path, {"55_3": "PENDING"})[0]  # requeued, waiting: still the run's task
    assert not marker_alive(marker, path, {"55_3": "COMPLETING"})[0]
    assert not marker_alive(marker, path, {})[0]  # squeue has forgotten it: finished, killed or cancelled
    # squeue cannot answer (not a Slurm host): the heartbeat decides.
    assert marker_alive(marker, path, None)[0]
    stale = marker_file(tmp_path, marker, age=tasks.HEARTBEAT_TIMEOUT_S + 60)
    assert marker_alive(marker, stale, None)[0] is False


def test_marker_of_another_host_lives_by_its_heartbeat(tmp_path):
    marker = Marker("elsewhere", 1, None, None, time.time())
    assert marker_alive(marker, marker_file(tmp_path, marker, age=10), {})[0]
    alive, why = marker_alive(marker, marker_file(tmp_path, marker, age=tasks.HEARTBEAT_TIMEOUT_S + 1), {})
    assert not alive and "no heartbeat for" in why


def test_heartbeat_touches_the_marker(tmp_path):
    path = marker_file(tmp_path, tasks.this_marker(None), age=1000)
    with tasks.Heartbeat(path, every=0.05):
        time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5


def test_sigkilled_task_is_interrupted_not_running_and_the_next_sweep_redoes_it(tmp_path):
    """The kill -9 case: a task killed by SIGKILL leaves its marker; status says interrupted (its pid
    is gone), and the resubmitted sweep runs it again from its checkpoint, with identical results."""
    reference = execute(RunSpec("smoke", "uniform-epoch", {}, 3, LONG), tmp_path / "ref", log=quiet)
    out = str(tmp_path / "cut")
    spec = write_spec(tmp_path, LONG_SPEC)
    manifest, _ = write_manifest(load_sweep(spec), out)
    proc = _start_and_wait_for(["task", str(manifest), "0"], "epoch 1/3")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ResultsLayout(out).marker(reference["run_id"]).exists()  # left behind, as a dead node leaves it
    status = cli("status", "k", "--out", out)
    assert "interrupted" in status.stdout and "stale marker" in status.stdout and "running" not in status.stdout
    again = cli("sweep", spec, "--out", out)
    assert "1 to run, 0 already complete" in again.stdout and "summary: 1 complete" in again.stdout, again.stdout
    same_results(load_record(ResultsLayout(out).record(reference["run_id"])), reference)
    assert not ResultsLayout(out).marker(reference["run_id"]).exists()


def test_a_task_whose_run_is_alive_elsewhere_does_not_start_a_second_copy(tmp_path):
    spec = write_spec(tmp_path, LONG_SPEC)
    out = tmp_path / "out"
    manifest, [line] = write_manifest(load_sweep(spec), out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tasks.write_marker(ResultsLayout(out).marker(line["run_id"]),
                           Marker(socket.gethostname(), holder.pid, tasks.process_start(holder.pid), None, time.time()))
        [(_, _, state, _)] = sweep_status(manifest)
        assert state == "running"
        result = cli("task", str(manifest), "0")
        assert result.returncode == 0 and "already running" in result.stdout
        assert not ResultsLayout(out).record(line["run_id"]).exists() and not ResultsLayout(out).checkpoint(line["run_id"]).exists()
    finally:
        holder.kill()
        holder.wait()
    [(_, _, state, detail)] = sweep_status(manifest)
    assert state == "missing" and "is gone" in detail


# -- bounded requeues ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("1:30", 90), ("45", 45), ("2:03:04", 7384), ("1-00:00:10", 86410),
                                           ("UNLIMITED", None), ("INVALID", None)])
def test_parse_slurm_time(text, seconds):
    assert parse_slurm_time(text) == seconds


def test_requeue_bounds():
    state = RequeueState("7_0")
    assert requeue_decision(state, "timeout", 100, cap=5) == (True, "timeout (requeue 1 of at most 5)")
    # A timeout that spent nothing since the last stop can never finish under that time limit.
    requeue, why = requeue_decision(state, "timeout", 100, cap=5)
    assert not requeue and "time limit is too short" in why
    # A preemption is the cluster's doing: a few stops without progress are tolerated, not forever.
    state = RequeueState("7_0")
    assert requeue_decision(state, "preemption", 50, cap=20)[0]
    assert requeue_decision(state, "preemption", 50, cap=20)[0]
    assert requeue_decision(state, "preemption", 50, cap=20)[0]
    requeue, why = requeue_decision(state, "preemption", 50, cap=20)
    assert not requeue and f"{tasks.NO_PROGRESS_PREEMPTIONS} stops in a row without progress" in why
    # Progress or not, the cap holds.
    state = RequeueState("7_0")
    decisions = [requeue_decision(state, "preemption", float(i), cap=3)[0] for i in range(1, 6)]
    assert decisions == [True, True, True, False, False] and state.requeues == 3


def fake_slurm(tmp_path: Path, time_left: str) -> dict:
    """squeue and scontrol stand-ins on PATH: squeue says how much time is left; scontrol logs its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\necho '{time_left}'\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for tool in ("squeue", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "0"}


def test_stop_kind_tells_a_timeout_from_a_preemption(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, "1:30")["PATH"])
    assert tasks.stop_kind("41_0") == "timeout"
    (tmp_path / "bin" / "squeue").write_text("#!/bin/sh\necho '3:59:00'\n")
    assert tasks.stop_kind("41_0") == "preemption"
    assert tasks.stop_kind(None) == "stop"


def test_requeue_past_the_cap_ends_in_a_failed_record_that_says_why_and_keeps_the_checkpoint(tmp_path):
    reference = execute(RunSpec("smoke", "uniform-epoch", {}, 3, LONG), tmp_path / "ref", log=quiet)
    spec = write_spec(tmp_path, LONG_SPEC)
    out = tmp_path / "cut"
    manifest, _ = write_manifest(load_sweep(spec), out, settings={"max_requeues": 1})  # the line carries the cap
    env = fake_slurm(tmp_path, "1:00")
    rid = reference["run_id"]
    for attempt in (1, 2):  # 1: a timeout, requeued (the first of at most 1); 2: past the cap
        proc = _start_and_wait_for(["task", str(manifest), "0"], "epoch 1/3" if attempt == 1 else "resumed at epoch",
                                   env=env)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == (3 if attempt == 1 else 1)
        if attempt == 1:  # requeued: the marker stays (the task keeps its Slurm id), the run is not "missing"
            assert (tmp_path / "scontrol.log").read_text().strip() == "requeue 41_0"
            assert ResultsLayout(out).marker(rid).exists()
    record = load_record(ResultsLayout(out).record(rid))
    assert record["status"] == "failed" and "cap (max_requeues=1)" in record["error"], record["error"]
    assert ResultsLayout(out).checkpoint(rid).exists() and not ResultsLayout(out).marker(rid).exists()
    again = cli("task", str(manifest), "0")  # resubmitted (outside Slurm here): resumes, completes
    assert again.returncode == 0 and "resumed at epoch" in again.stdout, again.stdout + again.stderr
    same_results(load_record(ResultsLayout(out).record(rid)), reference)


# -- preemption inside prepare ------------------------------------------------------------------------

FORGETTING = {"score_runs": 1, "fraction": 0.5}


def test_prepare_stopped_mid_epoch_by_sigusr1_resumes_where_it_stopped(tmp_path):
    """A proxy (forgetting's, with its event counter) stopped by SIGUSR1 in the middle of its second
    epoch saves a partial checkpoint there; the task run again resumes at that step and ends with the
    metrics and compute of an undisturbed run."""
    reference = execute(RunSpec("smoke", "forgetting", FORGETTING, 2, LONG), tmp_path / "ref", log=quiet)
    spec = write_spec(tmp_path, LONG_SPEC.replace('name = "uniform-epoch"', 'name = "forgetting"\ngrid = '
                                                  '{ score_runs = 1, fraction = 0.5 }').replace("seeds = [3]",
                                                                                              "seeds = [2]"))
    out = tmp_path / "cut"
    manifest, _ = write_manifest(load_sweep(spec), out)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "task", str(manifest), "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("cache/proxies/*/*.partial.pt")):  # written after the proxy's epoch 1
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3 and "preempted in prepare" in output, output
    [partial] = out.glob("cache/proxies/*/*.partial.pt")
    state = torch.load(partial, weights_only=True)["trainer"]
    assert state["partial"]["epoch"] == 1 and state["partial"]["steps_done"] > 0  # mid-epoch, not at its end
    steps = state["partial"]["steps_done"]
    again = cli("task", str(manifest), "0")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"[score-proxy-0] resumed at epoch 1, step {steps}" in again.stdout, again.stdout
    same_results(load_record(ResultsLayout(out).record(reference["run_id"])), reference)


# -- a protocol edit is a new run ---------------------------------------------------------------------

def test_editing_a_protocol_file_makes_a_new_run_and_a_separate_table(tmp_path, capsys):
    protocol = tmp_path / "p.toml"
    protocol.write_text((REPO / "benchmarks" / "protocols" / "smoke.toml").read_text())
    out = str(tmp_path / "out")
    args = ["run", "--protocol", str(protocol), "--method", "full", "--set", "epochs=1", "--out", out, "--wandb", "off"]
    assert main(args) == 0
    first = capsys.readouterr().out
    protocol.write_text(protocol.read_text().replace("lr = 0.05", "lr = 0.01"))
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "skip" not in second  # not "complete": the protocol's contents changed
    assert main(args) == 0 and "skip" in capsys.readouterr().out  # unchanged: skipped
    records = [load_record(p) for p in sorted(Path(out, "runs").glob("*.json"))]
    assert len(records) == 2 and {r["resolved_protocol"]["lr"] for r in records} == {0.05, 0.01}
    assert len({r["run_id"] for r in records}) == 2 and all(r["run_id"] in first + second for r in records)
    assert main(["tables", "--runs", out]) == 0
    tables = capsys.readouterr().out
    assert tables.count("### smoke [protocol version ") == 2  # never one table over both versions
    # Spelling a default out, or editing the description, is the same protocol.
    protocol.write_text(protocol.read_text().replace("description =", "eval_every = 1\ndescription = 'edited'\n#"))
    assert main(args) == 0 and "skip" in capsys.readouterr().out


# -- honest wall-clock, umask ---------------------------------------------------------------------------

def test_wall_clock_keeps_the_attempts_before_a_resume(tmp_path, monkeypatch):
    original = train.Trainer._step
    calls = {"n": 0}

    def slow_then_stop(self, batch, step, selection=None):
        calls["n"] += 1
        if calls["n"] == 5:
            time.sleep(1.0)  # a second of work in the first attempt
            train.STOP.set()
        return original(self, batch, step, selection)

    monkeypatch.setattr(train.Trainer, "_step", slow_then_stop)
    spec = RunSpec("smoke", "full", {}, 0, {"epochs": 2})
    try:
        with pytest.raises(train.Preempted):
            execute(spec, tmp_path, log=quiet)
    finally:
        train.STOP.clear()
    monkeypatch.setattr(train.Trainer, "_step", original)
    record = execute(spec, tmp_path, log=quiet)
    assert record["wall_clock_s"] >= 1.0 and record["charged_seconds"] == pytest.approx(
        record["wall_clock_s"] + record["cached_seconds"], abs=2e-3)


def test_records_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_record(tmp_path / "r.json", {"schema": 2})
        assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
        os.umask(0o002)
        write_record(tmp_path / "g.json", {"schema": 2})
        assert stat.S_IMODE((tmp_path / "g.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_wandb_dir_is_respected(tmp_path, monkeypatch):
    from benchmarks.jobs.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    assert WandbLogger(tmp_path / "results").out == tmp_path / "elsewhere"
    monkeypatch.delenv("WANDB_DIR")
    assert WandbLogger(tmp_path / "results").out == tmp_path / "results"


def test_a_full_results_folder_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code = main(["run", "--protocol", "smoke", "--method", "full", "--out", str(tmp_path / "out"), "--wandb", "off"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "MiB free" in err
    assert not list((tmp_path / "out").rglob("*.json")) and not list((tmp_path / "out").rglob("*.pt"))


def test_an_unknown_device_is_refused_even_when_the_run_is_complete(tmp_path, capsys):
    args = ["run", "--protocol", "smoke", "--method", "full", "--set", "epochs=1", "--out", str(tmp_path), "--wandb",
            "off"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--device", "cuda:banana"]) == 2
    assert "is not a device" in capsys.readouterr().err


# -- check before launching -----------------------------------------------------------------------------

def test_sweep_with_missing_data_submits_nothing_and_writes_no_record(tmp_path):
    """`bench-cifar -- --quick` on a machine without CIFAR: one line, no manifest, no record, no job."""
    (tmp_path / "empty").mkdir()
    for executor in ("local", "slurm"):
        result = cli("sweep", "cifar10", "--quick", "--executor", executor, "--out", str(tmp_path / "out"),
                     "--data-root", str(tmp_path / "empty"))
        assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
        assert "dataset 'cifar10' not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_skip_data_check_leaves_the_data_to_the_tasks(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("sweep", "cifar10", "--quick", "--dry-run", "--skip-data-check", "--out", str(tmp_path / "out"),
                 "--data-root", str(tmp_path / "empty"))
    assert result.returncode == 0 and "to run" in result.stdout, result.stderr
    lines = (tmp_path / "out" / "sweeps" / "cifar10" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["data_root"] == str(tmp_path / "empty")  # the tasks look there


def _prepare_heavy(name: str) -> dict:
    """Parameters that make a method's `prepare` train proxies on smoke: 2 runs of 2 epochs where it has them."""
    from benchmarks.core.registry import method_class

    params = method_class(name).params
    return {k: v for k, v in (("score_epoch", 2), ("score_runs", 2)) if k in params}


def _supervised_methods_with_prepare() -> list[str]:
    from benchmarks.core.registry import list_methods

    return [name for name, cls in list_methods().items()  # test-only methods of other test files excluded
            if cls.traits.kind == "supervised" and cls.prepare is not train.Method.prepare and not name.startswith("test-")]


@pytest.mark.parametrize("name", _supervised_methods_with_prepare())
def test_every_method_stopped_inside_prepare_resumes_to_the_same_result(name, tmp_path, monkeypatch):
    """Over the registry: a stop request late in `prepare`'s proxy training (1/8 of its steps before
    the end: with 2 proxy runs of 2 epochs of 16 steps on smoke, step 8 of the second run's second
    epoch, so the first run is finished and cached and the second has state worth keeping) ends in
    Preempted, and the run started again gives the metrics and compute of an undisturbed run. A
    method whose prepare keeps state outside the shared helpers' checkpoints fails here."""
    from benchmarks.core.registry import method_class

    cls = method_class(name)
    protocol = "smoke-groups" if cls.traits.reads_train_groups else "smoke"  # an oracle needs data with groups
    spec = RunSpec(protocol, name, _prepare_heavy(name), 0, {"holdout": 256} if cls.traits.needs_holdout else {})
    original = train.Trainer._step
    steps = {"selection": 0, "stop_at": None}

    def count_and_stop(self, batch, step, selection=None):
        if self.purpose == "selection":
            steps["selection"] += 1
            if steps["selection"] == steps["stop_at"]:
                train.STOP.set()
        return original(self, batch, step, selection)

    monkeypatch.setattr(train.Trainer, "_step", count_and_stop)
    reference = execute(spec, tmp_path / "ref", log=quiet)
    if steps["selection"] < 8:
        pytest.skip(f"{name}: prepare trains no proxy on smoke")
    steps.update(stop_at=steps["selection"] - steps["selection"] // 8, selection=0)
    logs: list[str] = []
    try:
        with pytest.raises(train.Preempted):
            execute(spec, tmp_path / "cut", log=logs.append)
    finally:
        train.STOP.clear()
    assert any("preempted in prepare" in line for line in logs), logs
    resumed = execute(spec, tmp_path / "cut", log=logs.append)
    assert any("resumed at epoch" in line for line in logs), logs
    same_results(resumed, reference)
