"""Tests against a real one-node Slurm cluster (no mocks).

The module fixture runs ``slurm/cluster-up.sh`` (needs root and the Debian
packages ``slurm-wlm munge``); a cluster the tests started is stopped when the
test session ends (tests/conftest.py), pass or fail.  The tests are skipped only when the
Slurm binaries are not installed at all; a cluster that fails to come up is a
test failure.

Accounting is off on this cluster (no sacct), so job completion is detected
by polling ``squeue -h -j JOBID`` until the job disappears and then checking
the files the jobs wrote.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

from benchmarks.jobs.sweep import SBATCH_TEMPLATE
from slurm_support import (
    SLURM_DIR,
    _diagnostics,
    _run,
    _sbatch,
    _wait_gone,
    _wait_until,
)


@pytest.fixture(scope="module")
def cluster():
    from slurm_support import start_cluster

    return start_cluster()


# ----------------------------------------------------------------- tests ----
def test_array_sbatch_template_parses():
    proc = _run(["bash", "-n", str(SBATCH_TEMPLATE)], check=False)
    assert proc.returncode == 0, proc.stderr
    text = SBATCH_TEMPLATE.read_text()
    for opt in (
        "--job-name=bench",
        "--cpus-per-task=1",
        "--requeue",
        "--open-mode=append",
        "--signal=B:USR1@120",
    ):
        assert f"#SBATCH {opt}" in text


def test_array_job_all_tasks_complete(cluster, tmp_path):
    """4 one-CPU array tasks all run (several at once) and report their task ids."""
    job = _sbatch(
        "--array=0-3",
        "--job-name=t-array",
        "--cpus-per-task=1",
        f"--output={tmp_path}/slurm-%A_%a.out",
        "--wrap",
        'echo "$SLURM_ARRAY_TASK_ID $(date +%s.%N)" > "task_${SLURM_ARRAY_TASK_ID}.start"; '
        "sleep 2; "
        'echo "$SLURM_ARRAY_TASK_ID $(date +%s.%N)" > "task_${SLURM_ARRAY_TASK_ID}.end"',
        cwd=tmp_path,
    )
    _wait_gone(job, timeout=50)

    spans = {}
    for i in range(4):
        start, end = tmp_path / f"task_{i}.start", tmp_path / f"task_{i}.end"
        assert start.exists() and end.exists(), f"task {i} did not finish\n{_diagnostics(job)}"
        tid_s, t0 = start.read_text().split()
        tid_e, t1 = end.read_text().split()
        assert tid_s == tid_e == str(i)
        spans[i] = (float(t0), float(t1))
        assert (tmp_path / f"slurm-{job}_{i}.out").exists()

    # cons_tres + CR_Core: with >= 2 CPUs, at least two tasks overlap in time.
    cpus = int(_run(["sinfo", "-h", "-o", "%c"]).stdout.split()[0])
    if cpus >= 2:
        overlap = any(
            spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1] for a in spans for b in spans if a < b
        )
        assert overlap, f"no two array tasks ran concurrently: {spans}"


REQUEUE_SCRIPT = r"""#!/bin/bash
#SBATCH --job-name=t-requeue
#SBATCH --requeue
#SBATCH --open-mode=append
# Counts its runs.  Run 1 waits for SIGUSR1 (sent to this batch shell only),
# then requeues itself and exits; run 2 (same array task id) just finishes.
d="$SLURM_SUBMIT_DIR"
n=$(( $(cat "$d/runs" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$d/runs"
echo "run=$n task=$SLURM_ARRAY_TASK_ID restart=${SLURM_RESTART_COUNT:-0}" >> "$d/log"
if [ "$n" -eq 1 ]; then
    got=0
    trap 'got=1' USR1
    # Slurm SIGTERMs the job as soon as it is requeued: note it and carry on.
    trap 'echo "got_term" >> "$d/log"' TERM
    touch "$d/ready"
    for _ in $(seq 1 200); do          # <= ~40 s
        sleep 0.2 & wait $!            # background+wait so the trap runs promptly
        [ "$got" = 1 ] && break
    done
    echo "signal=$got" >> "$d/log"
    [ "$got" = 1 ] || exit 3
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    echo "requeue_rc=$?" >> "$d/log"
    exit 0
fi
echo "task=$SLURM_ARRAY_TASK_ID restart=${SLURM_RESTART_COUNT:-0}" > "$d/done"
"""


def test_usr1_trap_and_self_requeue(cluster, tmp_path):
    """scancel --signal=USR1 --batch reaches the batch shell's trap; the task
    requeues itself with scontrol, runs again with the same array task id and
    finishes."""
    script = tmp_path / "requeue.sh"
    script.write_text(REQUEUE_SCRIPT)
    job = _sbatch("--array=3", f"--output={tmp_path}/slurm-%A_%a.out", str(script), cwd=tmp_path)
    task = f"{job}_3"

    _wait_until(lambda: (tmp_path / "ready").exists(), 30, "first run to install its trap", job)
    _run(["scancel", "--signal=USR1", "--batch", task])

    released = []

    def finished() -> bool:
        proc = _run(["squeue", "-h", "-j", job, "-o", "%T %r"], check=False)
        state = proc.stdout.strip()
        if not state:
            return True
        # Some Slurm versions hold requeued jobs (RequeueHold / JobHeld*): release them.
        if ("REQUEUE_HOLD" in state or "Held" in state) and len(released) < 3:
            released.append(state)
            _run(["scontrol", "release", task], check=False)
        return False

    # Requeued jobs wait AuthInfo cred_expire (20 s in cluster-up.sh) + up to one
    # scheduler pass (sched_interval=10) before they start again.
    _wait_until(finished, 55, "requeued task to run again and finish", job)

    log = (tmp_path / "log").read_text()
    assert (tmp_path / "runs").read_text().strip() == "2", log
    assert "signal=1" in log, log
    assert "requeue_rc=0" in log, log
    assert "run=2 task=3 restart=1" in log, log
    assert (tmp_path / "done").read_text().strip() == "task=3 restart=1"
    if released:
        warnings.warn(f"requeued job was held and had to be released: {released}", stacklevel=1)


FAKE_BENCHMARKS_MAIN = r'''
"""Stand-in for `python -m benchmarks task MANIFEST I` used to test array.sbatch."""
import signal
import sys
import time
import warnings
from pathlib import Path

_, cmd, manifest, idx = sys.argv
assert cmd == "task"
line = Path(manifest).read_text().splitlines()[int(idx)]
print(f"fake task {idx}: {line}", flush=True)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
if line == "wait":
    Path(f"ready_{idx}").touch()
    deadline = time.time() + 40
    while not got and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # "checkpointing": the batch shell must keep waiting for us
    print(f"fake task {idx}: checkpointed after {got}", flush=True)
    line = f"wait:{','.join(got)}"
Path(f"done_{idx}").write_text(line)
'''


def test_array_template_runs_tasks_and_forwards_usr1(cluster, tmp_path):
    """The array template (benchmarks/resources/array.sbatch) runs one manifest line per task with $BENCH_PYTHON,
    and forwards a SIGUSR1 sent to the batch shell to python, then waits for it."""
    pkg = tmp_path / "benchmarks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_BENCHMARKS_MAIN)
    (tmp_path / "manifest.txt").write_text("a\nwait\nc\n")
    (tmp_path / "logs").mkdir()
    env = {**os.environ, "BENCH_PYTHON": sys.executable}

    job = _sbatch(
        "--array=0-2%2",
        "--time=10",
        "--output=logs/%x_%A_%a.out",
        str(SBATCH_TEMPLATE),
        "manifest.txt",
        cwd=tmp_path,
        env=env,
    )
    _wait_until(lambda: (tmp_path / "ready_1").exists(), 30, "task 1 to start", job)
    _run(["scancel", "--signal=USR1", "--batch", f"{job}_1"])
    _wait_gone(job, timeout=40)

    assert (tmp_path / "done_0").read_text() == "a"
    assert (tmp_path / "done_1").read_text() == "wait:USR1"
    assert (tmp_path / "done_2").read_text() == "c"
    log1 = (tmp_path / "logs" / f"bench_{job}_1.out").read_text()
    assert f"python={sys.executable}" in log1, log1
    assert "received SIGUSR1; forwarding to python" in log1, log1
    # The shell waited for python to finish checkpointing before ending.
    assert log1.index("checkpointed after ['USR1']") < log1.index(f"end job={job}_1"), log1
    assert "exit=0" in log1, log1


def test_cluster_up_is_idempotent(cluster):
    proc = _run(["bash", str(SLURM_DIR / "cluster-up.sh")], timeout=120)
    assert "already up" in proc.stdout, proc.stdout
