"""One run: protocol + method + seed -> trainer -> run record (JSON), resumable from checkpoints."""

from __future__ import annotations

import io
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compute import ComputeMeter, compute_summary, forward_flops_per_example, full_data_flops
from .data import load_data, restrict_train
from .errors import BenchError
from .protocol import Protocol, apply_overrides, load_protocol
from .record import SCHEMA, atomic_write_bytes, is_complete, load_record, record_path, run_id, write_record
from .registry import create_method, resolve_params
from .train import Preempted, RunContext, Trainer


@dataclass
class RunSpec:
    """What defines a run; its id is a hash of exactly these fields (params with defaults filled in)."""

    protocol: str
    method: str
    params: dict = field(default_factory=dict)
    seed: int = 0
    overrides: dict = field(default_factory=dict)

    def resolved(self) -> tuple[Protocol, dict]:
        protocol = apply_overrides(load_protocol(self.protocol), self.overrides)
        return protocol, resolve_params(self.method, self.params)

    @property
    def run_id(self) -> str:
        _, params = self.resolved()
        return run_id(self.protocol, self.method, params, self.seed, self.overrides)


def checkpoint_path(out: str | Path, rid: str) -> Path:
    return Path(out) / "checkpoints" / f"{rid}.pt"


def pick_device(requested: str | None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def environment(device: torch.device) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "host": socket.gethostname(), "git": _git_commit()}


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def build_context(protocol: Protocol, seed: int, *, data_root: str | None = None, device: str | None = None,
                  cache_dir: str | Path | None = None, log=print, progress: bool = False) -> RunContext:
    """The data on its device, the seeded context and the meter (with the model's forward FLOPs) of a run."""
    dev = pick_device(device)
    torch.manual_seed(seed)
    data = restrict_train(load_data(protocol.dataset, data_root, protocol.data_kwargs), protocol.train_subset)
    data.train, data.test = data.train.to(dev), data.test.to(dev)
    if data.val is not None:
        data.val = data.val.to(dev)
    ctx = RunContext(protocol=protocol, data=data, device=dev, meter=ComputeMeter(0), seed=seed, log=log,
                     progress=progress, cache_dir=Path(cache_dir) if cache_dir else None)
    ctx.meter.forward_flops = forward_flops_per_example(ctx.new_model("main"), data.input_shape, dev)
    return ctx


def final_metrics(curve: list[dict], rule: str) -> dict:
    """The reported metrics: the last evaluated epoch, or the protocol's validation-based rule."""
    evaluated = [row for row in curve if "test_acc" in row]
    if not evaluated:
        return {}
    if rule == "best-val-worst-group":
        key = "val_worst_group_acc"
        if not all(key in row for row in evaluated):
            raise BenchError(f"selection rule '{rule}' needs a validation split with groups")
        chosen = max(evaluated, key=lambda row: (row[key], row["epoch"]))
    else:
        chosen = evaluated[-1]
    metrics = {k: v for k, v in chosen.items() if k.endswith("_acc") or k == "train_loss"}
    metrics["selected_epoch"] = chosen["epoch"]
    return metrics


def _save_checkpoint(path: Path, payload: dict) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class RunLogger:
    """Receives a run's progress as it happens (W&B, for one). A logger that raises only warns:
    the local record is the source of truth and is written whatever the loggers do."""

    def start(self, info: dict) -> None:
        pass

    def log_epoch(self, entry: dict, full_flops: int) -> None:
        pass

    def finish(self, record: dict) -> None:
        pass


def _call_loggers(loggers: list[RunLogger], hook: str, *args, log=print) -> float:
    """Call a hook on every logger; returns the seconds it took (kept out of the run's wall-clock)."""
    started = time.perf_counter()
    for logger in loggers:
        try:
            getattr(logger, hook)(*args)
        except Exception as exc:  # noqa: BLE001 - a logging failure must never stop training
            log(f"warning: {type(logger).__name__}.{hook} failed ({type(exc).__name__}: {exc}); "
                "training goes on, the local record is still written")
    return time.perf_counter() - started


def execute(spec: RunSpec, out: str | Path = "results", *, data_root: str | None = None,
            device: str | None = None, progress: bool | None = None, force: bool = False,
            log=print, loggers: list[RunLogger] = (), group: str | None = None) -> dict:
    """Run (or skip, if its complete record exists) one run and return its record.

    Bad input raises BenchError before anything is written. Once training starts, any error ends
    in a record with status "failed" and the error, then re-raises. `group` names the sweep.
    """
    protocol, params = spec.resolved()
    rid = run_id(spec.protocol, spec.method, params, spec.seed, spec.overrides)
    path = record_path(out, rid)
    if not force and is_complete(path):
        log(f"skip {rid}: a complete record exists at {path}")
        return load_record(path)
    dev = pick_device(device)
    progress = sys.stderr.isatty() if progress is None else progress
    base = {"schema": SCHEMA, "run_id": rid, "protocol": protocol.name, "method": spec.method,
            "params": params, "seed": spec.seed, "overrides": spec.overrides, "budget": protocol.budget,
            "group": group, "resolved_protocol": protocol.as_dict(), "env": environment(dev)}
    started = time.perf_counter()
    logging_seconds = 0.0  # W&B's own time is not the method's
    ckpt_path = checkpoint_path(out, rid)
    trainer = None
    try:
        ctx = build_context(protocol, spec.seed, data_root=data_root, device=device, cache_dir=Path(out) / "cache",
                            log=log, progress=progress)
        model = ctx.new_model("main")
        method = create_method(spec.method, **params)
        method.ctx = ctx
        trainer = Trainer(ctx, model, method, purpose="train", evaluate=True)
        resumed = _resume(ckpt_path, ctx, trainer, log)
        if not resumed:
            prepare_started = time.perf_counter()
            method.prepare(ctx)
            trainer.state.seconds += time.perf_counter() - prepare_started
            _save_checkpoint(ckpt_path, {"meter": ctx.meter.state_dict(), "trainer": trainer.state_dict()})
        log(f"run {rid}: {protocol.name} / {spec.method} {params} seed {spec.seed} on {dev}"
            + (f" (resumed at epoch {trainer.state.epoch})" if resumed else ""))

        n_train = ctx.num_train
        full_flops = full_data_flops(ctx.meter.forward_flops, n_train, protocol.epochs)
        logging_seconds += _call_loggers(loggers, "start", dict(base, n_train=n_train, fresh=force,
                                                                resumed_at_epoch=trainer.state.epoch), log=log)

        def end_of_epoch(t: Trainer) -> None:
            _save_checkpoint(ckpt_path, {"meter": ctx.meter.state_dict(), "trainer": t.state_dict()})
            nonlocal logging_seconds
            logging_seconds += _call_loggers(loggers, "log_epoch", t.state.curve[-1], full_flops, log=log)

        trainer.fit(on_epoch_end=end_of_epoch)
        record = dict(base, status="complete",
                      metrics=final_metrics(trainer.state.curve, protocol.selection_rule),
                      compute=compute_summary(ctx.meter, full_flops),
                      wall_clock_s=round(time.perf_counter() - started - logging_seconds, 3),
                      train_seconds=round(trainer.state.seconds, 3),
                      n_train=n_train, curve=trainer.state.curve, method_stats=method.summary(), error=None)
        write_record(path, record)
        ckpt_path.unlink(missing_ok=True)
        _call_loggers(loggers, "finish", record, log=log)
        return record
    except Preempted:
        # Not a failure: save where training stopped (mid-epoch included) and let the caller requeue.
        # Stopped inside `prepare`, there is nothing consistent to save: prepare starts over.
        if ckpt_path.exists():
            _save_checkpoint(ckpt_path, {"meter": ctx.meter.state_dict(), "trainer": trainer.state_dict()})
            log(f"preempted: {rid} checkpointed at epoch {trainer.state.epoch}"
                + (f", step {trainer.partial.steps_done} of the next" if trainer.partial else "")
                + f" ({ckpt_path})")
        raise
    except Exception as exc:
        record = dict(base, status="failed", metrics={}, compute=None,
                      wall_clock_s=round(time.perf_counter() - started - logging_seconds, 3),
                      curve=trainer.state.curve if trainer else [],
                      error=f"{type(exc).__name__}: {exc}",
                      traceback=None if isinstance(exc, BenchError) else traceback.format_exc())
        write_record(path, record)
        _call_loggers(loggers, "finish", record, log=log)
        raise


def _resume(ckpt_path: Path, ctx: RunContext, trainer: Trainer, log) -> bool:
    if not ckpt_path.exists():
        return False
    try:
        payload = torch.load(ckpt_path, map_location=ctx.device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint means starting over, said out loud
        log(f"warning: checkpoint {ckpt_path} unreadable ({exc}); starting from scratch")
        return False
    ctx.meter = ComputeMeter.from_state(payload["meter"])
    trainer.load_state_dict(payload["trainer"])
    return True

