"""One manifest line run as a task: a Slurm array task or a local sweep worker.

The lifecycle around `execute`: refuse a second live copy of a run, prove this one alive (marker and
heartbeat), stop at the next step on Slurm's warning signal or SIGTERM with a checkpoint, then requeue
within the bounds of benchmarks/jobs/tasks.py, or end with a failed record that says why. Every setting
a task needs travels in its manifest line (`wandb`, `max_requeues`, `data_root`, `save_model`), never in
environment variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from benchmarks.core.launch import is_rank_zero
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.run import execute, write_failed_record
from benchmarks.core.train import STOP, Preempted
from benchmarks.errors import BenchError
from benchmarks.jobs.sweep import line_spec, read_manifest_line
from benchmarks.jobs.tasks import (
    MAX_REQUEUES,
    Heartbeat,
    load_requeue_state,
    marker_alive,
    read_marker,
    requeue_decision,
    save_requeue_state,
    slurm_states,
    stop_kind,
    this_marker,
    write_marker,
)
from benchmarks.jobs.wandb_logger import make_loggers

# Exit status of a task that stopped on request and was checkpointed (requeued, or to be run again).
STOPPED = 3


def run_task(manifest: str, index: int, *, data_root: str | None = None, device: str | None = None,
             wandb: str | None = None) -> int:
    """Run manifest line `index`; returns the task's exit status (0 done or already running elsewhere,
    1 ended with a failed record, STOPPED checkpointed). `data_root` and `wandb` given here win over the line's."""
    line = read_manifest_line(manifest, index)
    spec = line_spec(line)
    if spec.run_id != line["run_id"]:  # the protocol file was edited after the sweep was written
        raise BenchError(f"manifest {manifest}, line {index}: run {line['run_id']} is now {spec.run_id} "
                         f"(protocol '{spec.protocol}' or a method's defaults changed since the sweep was written); "
                         "run `sweep` again to write the manifest for the current protocol")
    out, rid = line["out"], line["run_id"]
    data_root = data_root or line.get("data_root")
    wandb = wandb or line.get("wandb", "auto")
    device = device or line.get("device")
    request_stop_on_signals()
    if not is_rank_zero():  # data parallel: rank 0 keeps the marker and requeues
        try:
            execute(spec, out, data_root=data_root, device=device, group=line.get("group"),
                    save=line.get("save_model", False))
        except Preempted:
            return STOPPED
        return 0
    layout = ResultsLayout(out)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    task_id = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else None
    marker_path = layout.marker(rid)
    existing = read_marker(marker_path)
    if existing is not None and not (task_id and existing.job == task_id):  # (a requeued task is itself)
        alive, why = marker_alive(existing, marker_path, slurm_states({existing.job}) if existing.job else {})
        if alive:
            print(f"run {rid} is already running ({why}); not starting a second copy", flush=True)
            return 0

    write_marker(marker_path, this_marker(task_id))
    keep_marker = False
    try:
        with Heartbeat(marker_path):
            execute(spec, out, data_root=data_root, device=device, group=line.get("group"),
                    loggers=make_loggers(wandb, out), save=line.get("save_model", False))
        layout.requeue_state(rid).unlink(missing_ok=True)
    except Preempted as stop:
        if not task_id:
            print("stopped; run the same command again to resume from the checkpoint", flush=True)
            return STOPPED
        state = load_requeue_state(layout.requeue_state(rid), task_id)
        requeue, why = requeue_decision(state, stop_kind(task_id), getattr(stop, "progress", 0.0),
                                        int(line.get("max_requeues", MAX_REQUEUES)))
        save_requeue_state(layout.requeue_state(rid), state)
        if not requeue:
            write_failed_record(spec, out, f"RequeueRefused: {why}", group=line.get("group"), device=device)
            print(f"not requeued: {why}", flush=True)
            return 1
        # The requeued task keeps its id and its marker: squeue lists it as pending, so the run stays
        # "running" and a resubmitted sweep does not start a second copy.
        keep_marker = subprocess.run(["scontrol", "requeue", task_id], check=False).returncode == 0
        print(f"requeued {task_id}: {why}" if keep_marker else f"scontrol requeue {task_id} failed: {why}",
              flush=True)
        return STOPPED
    except BenchError as exc:  # found only here (data that the submitting host could not check): say it in a record
        write_failed_record(spec, out, f"{type(exc).__name__}: {exc}", group=line.get("group"), device=device)
        raise
    finally:
        if not keep_marker:
            marker_path.unlink(missing_ok=True)
    return 0


def say_from_handler(text: str) -> None:
    """A line from a signal handler, written straight to stdout's file descriptor: print() there can land
    while the main thread is inside a print to the same buffered stream, and Python then raises
    "reentrant call inside BufferedWriter" in the middle of training."""
    try:
        os.write(sys.stdout.fileno(), (text + "\n").encode())
    except (OSError, ValueError):  # no file descriptor (a captured stream): the stop happens all the same
        pass


def request_stop_on_signals(interrupt: bool = False) -> dict:
    """SIGUSR1 (Slurm's warning) and SIGTERM stop training at the next step boundary, with a checkpoint.

    `interrupt` (an interactive `run`): a first Ctrl-C does the same; a second one interrupts at once
    (the checkpoint of the last finished epoch stays). Returns the handlers it replaced (signal.signal
    restores them)."""

    def request_stop(signum, _frame):
        if signum == signal.SIGINT and STOP.is_set():
            raise KeyboardInterrupt
        if not STOP.is_set():
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            say_from_handler(f"received {signal.Signals(signum).name}: stopping at the next step to checkpoint{again}")
        STOP.set()

    signals = (signal.SIGUSR1, signal.SIGTERM) + ((signal.SIGINT,) if interrupt else ())
    return {signum: signal.signal(signum, request_stop) for signum in signals}
