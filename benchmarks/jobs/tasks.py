"""What a sweep task does around its run: prove it is alive, and stop or requeue it honestly.

Running markers. A task writes `OUT/running/<run_id>` (JSON: host, pid, the process's start time,
the Slurm task id) and touches it every HEARTBEAT_S seconds. A run counts as running only while
something proves it alive (`marker_alive`):
  - under Slurm (the marker names a job): squeue still lists that array task (pending, requeued or
    running). sacct is not asked: a job squeue has forgotten is not pending or running;
  - on this host without a job: the pid is alive AND is the same process (its start time matches,
    so a recycled pid does not count);
  - anywhere else (another host, squeue unreachable): the heartbeat is younger than
    HEARTBEAT_TIMEOUT_S.
A task killed with SIGKILL (a dead node, the OOM killer) leaves its marker behind; it proves
nothing, so the run is "interrupted" (or "missing") and the next `sweep` runs it again, from its
checkpoint.

Requeues are bounded (submitit's rules, `requeue_decision`): a stop is a TIMEOUT when Slurm's time
limit is near (the warning signal `--signal=B:USR1@120`), else a PREEMPTION. A timeout that made no
progress since the previous requeue (the FLOPs spent did not grow) can never finish under that
limit; a preemption is the cluster's doing, so it gets NO_PROGRESS_PREEMPTIONS tries; and every task
has a cap on requeues (MAX_REQUEUES, `--slurm max_requeues=N`). Past a bound, the run ends with a
failed record that says why, and keeps its checkpoint: a later `sweep` resumes it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.core.record import atomic_write_bytes

HEARTBEAT_S = float(os.environ.get("BENCH_HEARTBEAT_S", 30))
HEARTBEAT_TIMEOUT_S = float(os.environ.get("BENCH_HEARTBEAT_TIMEOUT_S", 300))
MAX_REQUEUES = 20
NO_PROGRESS_PREEMPTIONS = 3  # consecutive preemptions without progress before the task gives up
TIMEOUT_WINDOW_S = 300  # a stop with less time than this left is the time limit's warning (USR1@120, +60 s early)
# squeue states of a job that will still run or is running (anything else is over or about to be).
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
                     "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


# -- markers -------------------------------------------------------------------------------------

@dataclass
class Marker:
    host: str
    pid: int
    pid_start: str | None  # the process's start time (/proc/<pid>/stat field 22): tells a recycled pid
    job: str | None  # Slurm array task id "JOB_TASK", or None outside Slurm
    started: float

    def describe(self) -> str:
        where = f"slurm task {self.job}" if self.job else f"pid {self.pid}"
        return f"{where} on {self.host}"


def process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # after "pid (comm) ", field 22 is the 20th


def this_marker(job: str | None) -> Marker:
    return Marker(socket.gethostname(), os.getpid(), process_start(os.getpid()), job, time.time())


def write_marker(path: Path, marker: Marker) -> None:
    atomic_write_bytes(path, (json.dumps(asdict(marker)) + "\n").encode())


def read_marker(path: Path) -> Marker | None:
    """The marker at path; None if there is none. A damaged one reads as a marker that proves nothing."""
    try:
        data = json.loads(path.read_text())
        return Marker(str(data["host"]), int(data["pid"]), data.get("pid_start"), data.get("job"),
                      float(data["started"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Marker("?", -1, None, None, 0.0)


def slurm_states(jobs: set[str]) -> dict[str, str] | None:
    """squeue's state of each listed array task ("JOB_TASK") it still knows; None when squeue cannot answer
    (not a Slurm host, controller down): then the caller falls back on heartbeats."""
    base = sorted({job.split("_")[0] for job in jobs if job})
    if not base:
        return {}
    try:
        result = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(base)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return {} if "Invalid job id" in result.stderr else None  # every listed job is long gone
    states = {}
    for line in result.stdout.splitlines():
        task, _, state = line.strip().partition("|")
        states[task] = state
    return states


def marker_alive(marker: Marker, path: Path, slurm: dict[str, str] | None) -> tuple[bool, str]:
    """(alive, why): what proves the marked task alive, or what shows it is not (module docstring)."""
    if marker.job and slurm is not None:
        state = slurm.get(marker.job)
        if state in LIVE_SLURM_STATES:
            return True, f"slurm task {marker.job} {state.lower()}"
        return False, f"slurm task {marker.job} is no longer queued or running"
    if not marker.job and marker.host == socket.gethostname():
        alive = _pid_alive(marker.pid) and (marker.pid_start is None or process_start(marker.pid) == marker.pid_start)
        return (True, f"pid {marker.pid} alive") if alive else (False, f"pid {marker.pid} on {marker.host} is gone")
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False, "marker vanished"
    if age <= HEARTBEAT_TIMEOUT_S:
        return True, f"{marker.describe()}, heartbeat {age:.0f} s ago"
    return False, f"{marker.describe()}: no heartbeat for {age:.0f} s"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """Touches the marker every HEARTBEAT_S seconds while the task lives (a daemon thread)."""

    def __init__(self, path: Path, every: float = HEARTBEAT_S):
        self.path, self.every = path, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="bench-heartbeat")

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()

    def _beat(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the marker is gone (the run ended): nothing to keep alive


# -- timeouts, preemptions, bounded requeues -----------------------------------------------------

def parse_slurm_time(text: str) -> float | None:
    """squeue's %L (time left): [D-]HH:MM:SS, MM:SS or SS; None for UNLIMITED, NOT_SET, INVALID."""
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(?:(\d+):)?(\d+)", text.strip())
    if not match:
        return None
    days, a, b, c = match.groups()
    parts = [int(x) for x in (a, b) if x is not None] + [int(c)]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def stop_kind(job: str | None) -> str:
    """"timeout" when the job's time limit is near, "preemption" otherwise; "stop" outside Slurm."""
    if not job:
        return "stop"
    try:
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
        left = parse_slurm_time(result.stdout.strip().splitlines()[0]) if result.returncode == 0 and result.stdout.strip() \
            else None
    except (OSError, subprocess.SubprocessError, IndexError):
        left = None
    return "timeout" if left is not None and left <= TIMEOUT_WINDOW_S else "preemption"


@dataclass
class RequeueState:
    job: str
    requeues: int = 0  # requeues of this submission so far
    progress: float = -1.0  # FLOPs spent when it last stopped
    no_progress: int = 0  # consecutive stops without progress


def load_requeue_state(path: Path, job: str) -> RequeueState:
    """This submission's count; a new submission (another job id) starts again from zero."""
    try:
        data = json.loads(path.read_text())
        if data.get("job") == job:
            return RequeueState(**data)
    except (OSError, ValueError, TypeError):
        pass
    return RequeueState(job)


def requeue_decision(state: RequeueState, kind: str, progress: float, cap: int) -> tuple[bool, str]:
    """(requeue?, why), and `state` updated. Bounds in the module docstring."""
    moved = progress > state.progress
    state.no_progress = 0 if moved else state.no_progress + 1
    state.progress = max(progress, state.progress)
    if state.requeues >= cap:
        return False, (f"{kind}: the task was requeued {state.requeues} times, the cap (max_requeues={cap}); "
                       "the checkpoint is kept, resubmit the sweep to go on")
    if not moved and kind == "timeout":
        return False, ("timeout without progress since the previous requeue: the time limit is too short for "
                       "the run to reach its next checkpoint; raise it (--slurm time=...) and resubmit")
    if not moved and state.no_progress >= NO_PROGRESS_PREEMPTIONS:
        return False, (f"{kind}: {state.no_progress} stops in a row without progress; the checkpoint is kept, "
                       "resubmit the sweep to go on")
    state.requeues += 1
    return True, f"{kind} (requeue {state.requeues} of at most {cap})"


def save_requeue_state(path: Path, state: RequeueState) -> None:
    atomic_write_bytes(path, (json.dumps(asdict(state)) + "\n").encode())
