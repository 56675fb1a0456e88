"""The fault test: a 6-run sweep on the one-node Slurm cluster, its tasks hit by SIGUSR1, SIGTERM and
SIGKILL at random moments (a seeded schedule), resubmitted until done.

What happens to each kind:
  - SIGUSR1 (Slurm's time-limit warning) and SIGTERM (preemption) go to the batch shell, as Slurm
    sends them (`scancel --signal=... --batch`); the shell forwards them to python, which
    checkpoints at the next step and requeues itself. Before python has installed its handler (it is
    still importing torch) the signal ends it: the task fails, the run stays "missing", and the next
    submission runs it. After python has finished, it changes nothing (exit 0, the flaky case).
  - SIGKILL goes to python itself, as the OOM killer or a dead node would: no checkpoint at that
    moment, the marker is left behind, the run is "interrupted" (resumed from its last epoch
    checkpoint by the next submission) or "missing".
Done means: every run complete, each record identical in metrics and compute (and curve, seconds
aside) to an undisturbed run, each record written once, no submission of a run that was complete,
running or queued, no temporary, marker, requeue or checkpoint file left, and every record readable.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import load_record, load_records
from benchmarks.core.run import execute
from benchmarks.jobs.sweep import load_sweep, read_manifest, sweep_status
from conftest import quiet
from slurm_support import _job_gone, _run, start_cluster
from test_sweep import _env, _logs, cli, same_results, write_spec

SEED = 16
SPEC = """
name = "faults"
protocol = "smoke"
seeds = [0, 1]
overrides = { epochs = 3 }
[slurm]
parallel = 6
time = "00:30:00"   # a time limit far away: every stop here is a preemption
[[methods]]
name = "full"
[[methods]]
name = "uniform-epoch"
[[methods]]
name = "infobatch"
"""
KINDS = ("USR1", "TERM", "KILL")
LATEST = 4.0  # seconds after a run starts (its marker appears) by which its signal is sent
MAX_SUBMISSIONS = 5


def schedule(rng: random.Random, indices: list[int], submission: int) -> dict[int, tuple[str, float]]:
    """Which task gets which signal, when: in the first submission every task is hit, each kind twice,
    at a random moment; the resubmissions run undisturbed (each costs the cluster's requeue delay, and
    the test must stay under 3 minutes)."""
    if submission > 0:
        return {}
    kinds = [kind for kind in KINDS for _ in range(2)]
    rng.shuffle(kinds)
    return {i: (kind, rng.uniform(0.0, LATEST)) for i, kind in zip(indices, kinds)}


@pytest.fixture(scope="module")
def cluster():
    return start_cluster()


def hit(kind: str, job: str, index: int, marker: Path) -> bool:
    """Send one signal to task `index` of the array if it is running; True if sent."""
    if kind == "KILL":  # to python itself, whose pid its running marker holds
        try:
            os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
            return True
        except (OSError, ValueError, KeyError):
            return False  # the run ended a moment ago
    task = f"{job}_{index}"
    if _run(["squeue", "-h", "-j", task, "-o", "%T"], check=False).stdout.strip() != "RUNNING":
        return False  # pending again after a requeue, or finished
    # In the background: the controller may take seconds to answer, and other tasks' moments go on.
    subprocess.Popen(["scancel", f"--signal={kind}", "--batch", task], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    return True


def submit(spec: str, out: Path) -> tuple[str | None, list[int], str]:
    result = cli("sweep", spec, "--executor", "slurm", "--out", str(out), env=_env())
    assert result.returncode == 0, result.stdout + result.stderr
    if "submitted job array " not in result.stdout:
        return None, [], result.stdout
    job = result.stdout.split("submitted job array ")[1].split()[0]
    submissions = (out / "sweeps" / "faults" / "submissions.jsonl").read_text().splitlines()
    return job, json.loads(submissions[-1])["indices"], result.stdout


def test_random_signals_and_resubmission_end_with_every_record_identical(cluster, tmp_path):
    started = time.monotonic()
    rng = random.Random(SEED)
    out = tmp_path / "results"
    spec = write_spec(tmp_path, SPEC)
    manifest = out / "sweeps" / "faults" / "manifest.jsonl"
    # The undisturbed runs, computed meanwhile (mostly while Slurm holds requeued tasks back).
    references: dict[tuple, dict] = {}
    sweep = load_sweep(spec)

    def undisturbed() -> None:
        for run in sweep.runs:
            references[(run.method, run.seed)] = execute(run, tmp_path / "ref", log=quiet)

    worker = threading.Thread(target=undisturbed)
    worker.start()
    sent = {kind: 0 for kind in KINDS}
    submissions = []
    for attempt in range(MAX_SUBMISSIONS):
        before = {i: state for i, _, state, _ in sweep_status(manifest)} if manifest.exists() else {}
        job, indices, said = submit(spec, out)
        if job is None:
            assert "0 to run, 6 already complete" in said, said
            break
        # Only what was not complete, running or queued was submitted.
        assert not [i for i in indices if before.get(i) in ("complete", "running", "queued")], (before, indices)
        submissions.append(indices)
        lines = read_manifest(manifest)
        plan = schedule(rng, indices, attempt)
        first_seen: dict[int, float] = {}
        deadline = time.monotonic() + 150
        while not _job_gone(job):
            assert time.monotonic() < deadline, _logs(str(out))
            now = time.monotonic()
            for index, (kind, delay) in list(plan.items()):
                marker = out / "running" / lines[index]["run_id"]
                if index not in first_seen and marker.exists():  # python is past its imports: the run started
                    first_seen[index] = now
                if index in first_seen and now - first_seen[index] >= delay:
                    if hit(kind, job, index, marker):
                        sent[kind] += 1
                    del plan[index]
            time.sleep(0.05)
    else:
        status = cli("status", "faults", "--out", str(out)).stdout
        pytest.fail(f"not done after {MAX_SUBMISSIONS} submissions:\n{status}")
    slurm_seconds = time.monotonic() - started

    assert [state for _, _, state, _ in sweep_status(manifest)] == ["complete"] * 6
    worker.join()
    text = _logs(str(out))
    identical = 0
    for line in read_manifest(manifest):
        assert text.count(f"wrote record {ResultsLayout(line['out']).record(line['run_id'])}") == 1  # written once
        same_results(load_record(ResultsLayout(out).record(line["run_id"])), references[(line["method"], line["seed"])])
        identical += 1
    records, problems = load_records(out / "runs")
    assert problems == [] and len(records) == 6
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or "running" in p.parts
                                                                or "checkpoints" in p.parts)]
    assert leftovers == [], leftovers
    assert "already running" not in text  # never two tasks of one run
    stopped = len(re.findall(r"^received SIG(USR1|TERM): stopping", text, re.MULTILINE))  # python's handler
    killed = text.count(" exit=137 ")
    requeues = len(re.findall(r"^requeued \d+_\d+", text, re.MULTILINE))
    print(f"\nfault test: signals sent {sent} ({sum(sent.values())} in all; {stopped} runs stopped by one to "
          f"checkpoint, {killed} killed), {requeues} requeues, {len(submissions)} submissions "
          f"{submissions}, records identical {identical}/6, {time.monotonic() - started:.0f} s "
          f"({slurm_seconds:.0f} s until done on Slurm)")
    assert sum(sent.values()) >= 3  # the schedule really hit running tasks
