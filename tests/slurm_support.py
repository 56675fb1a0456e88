"""Helpers for tests against the real one-node Slurm cluster started by slurm/cluster-up.sh."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
POLL = 0.5  # seconds between squeue polls


# --------------------------------------------------------------- helpers ----
def start_until(command: list[str], marker: str, timeout: float, **popen) -> subprocess.Popen:
    """Start `command` and return once its output shows `marker` (then it is mid-run); the rest of its
    output is drained in the background so the pipe never blocks it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        raise AssertionError("ended before " + marker + ":\n" + "".join(seen))
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc


def _run(cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed (rc={proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def _diagnostics(job_id: str | None = None) -> str:
    parts = []
    if job_id:
        parts.append(_run(["scontrol", "show", "job", job_id], check=False).stdout)
    parts.append(_run(["squeue", "-a", "-o", "%i %T %r %S %N"], check=False).stdout)
    parts.append(_run(["sinfo", "-N", "-l"], check=False).stdout)
    for log in ("/var/log/slurm/slurmctld.log", "/var/log/slurm/slurmd.log"):
        try:
            lines = Path(log).read_text(errors="replace").splitlines()[-15:]
        except OSError as exc:
            lines = [f"<{exc}>"]
        parts.append(f"--- tail {log} ---\n" + "\n".join(lines))
    return "\n".join(parts)


def _sbatch(*args: str, cwd: Path, env: dict | None = None) -> str:
    out = _run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
    return out.split(";")[0]  # "jobid[;cluster]"


def _wait_until(pred, timeout: float, what: str, job_id: str | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            if job_id:
                _run(["scancel", job_id], check=False)
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{_diagnostics(job_id)}")
        time.sleep(POLL)


def _job_gone(job_id: str) -> bool:
    # A finished job disappears from squeue (it lists only pending/running/
    # completing jobs); rc != 0 with "Invalid job id" once it is purged.
    proc = _run(["squeue", "-h", "-j", job_id], check=False)
    return proc.stdout.strip() == ""


def _wait_gone(job_id: str, timeout: float) -> None:
    _wait_until(lambda: _job_gone(job_id), timeout, f"job {job_id} to leave the queue", job_id)


# --------------------------------------------------------------- fixture ----
DAEMONS = ("slurmctld", "slurmd")
# Whether this test session started the cluster: it then stops it when the session ends (conftest.py),
# pass or fail, so no daemon outlives the tests. A cluster that was up before the tests is left up.
STARTED_BY_TESTS = False


def running_daemons() -> list[str]:
    """The Slurm daemons alive on this machine (zombies, which a container's PID 1 may leave, excluded)."""
    alive = []
    for name in DAEMONS:
        proc = subprocess.run(["ps", "-C", name, "-o", "stat="], capture_output=True, text=True)
        if any(not stat.startswith("Z") for stat in proc.stdout.split()):
            alive.append(name)
    return alive


def start_cluster() -> str:
    """Start the cluster (idempotent); skip when Slurm is not installed at all, fail when it will not start."""
    global STARTED_BY_TESTS
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (no 'sbatch' on PATH); apt-get install -y slurm-wlm munge")
    if not running_daemons():
        STARTED_BY_TESTS = True
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "cluster-up.sh")], capture_output=True, text=True, timeout=180
    )
    if proc.returncode != 0:
        pytest.fail(
            f"slurm/cluster-up.sh failed (rc={proc.returncode})\n{proc.stdout}\n{proc.stderr}", pytrace=False
        )
    return proc.stdout.strip()


def stop_cluster() -> list[str]:
    """Stop what start_cluster started (jobs cancelled, daemons and munged stopped); the daemons still alive."""
    subprocess.run(["bash", str(SLURM_DIR / "cluster-down.sh"), "--cancel", "--munge"], capture_output=True,
                   text=True, timeout=180)
    return running_daemons()
