"""One run: protocol + method + seed -> trainer -> run record (JSON), resumable from checkpoints."""

from __future__ import annotations

import functools
import hashlib
import platform
import socket
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.core import distributed
from benchmarks.core.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint, set_aside
from benchmarks.core.compute import ComputeMeter, compute_summary, count_flops, unmetered
from benchmarks.core.distributed import Dist
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.protocol import Protocol
from benchmarks.core.provenance import code_fingerprint
from benchmarks.core.record import (
    SCHEMA,
    check_writable,
    is_complete,
    load_record,
    new_record,
    write_record,
)
from benchmarks.core.registry import create_method, method_class
from benchmarks.core.saved_models import save_model
from benchmarks.core.spec import RunSpec
from benchmarks.core.train import Preempted, RunContext, Trainer, set_up
from benchmarks.data import (
    carve_holdout,
    count_train_groups,
    hide_train_groups,
    load_data,
    restrict_train,
)
from benchmarks.data.splits import unhidden_groups
from benchmarks.errors import BenchError


def pick_device(requested: str | None, dist: Dist | None = None) -> torch.device:
    """The device a run trains on: `auto` (CUDA when available) or one that exists here (BenchError);
    data parallel, this rank's GPU when no index is given."""
    device = _requested_device(requested)
    if dist is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device


def _requested_device(requested: str | None) -> torch.device:
    if not requested or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "auto, cpu, cuda, cuda:N"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise BenchError(f"--device '{requested}' is not a device (allowed: {allowed})") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise BenchError(f"--device '{requested}': only CPU and CUDA devices are supported (allowed: {allowed})")
    if not torch.cuda.is_available():
        raise BenchError(f"--device '{requested}': CUDA is not available on this machine (torch "
                         f"{torch.__version__}, no GPU found); use --device cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise BenchError(f"--device '{requested}': this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def environment(device: torch.device) -> dict:
    """Where a run ran. `threads` (torch's intra-op threads) and the CPU's model are here because both can
    change a CPU run's rounding, so two records of one run id can differ by them (`reproduce` shows them)."""
    return {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "host": socket.gethostname(), "git": _git_commit(), "threads": torch.get_num_threads()}


def cpu_name() -> str:
    """The CPU's model ("AMD EPYC 7B13"): Linux's /proc/cpuinfo, else what platform knows (often "" on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str | None:
    """env.git, kept for readers of older records: the short commit (+ "-dirty") of the checkout that tracks
    this code (code["git"] in full); None for an installed copy, even one inside another repository."""
    code = code_fingerprint()
    return f"{code['git'][:7]}{'-dirty' if code['dirty'] else ''}" if code["git"] else None


def build_context(protocol: Protocol, seed: int, *, data_root: str | None = None, device: str | None = None,
                  cache_dir: str | Path | None = None, results_dir: str | Path | None = None, log=print,
                  progress: bool = False, method: str | None = None) -> RunContext:
    """The data on its device, the seeded context and the meter of a run.

    The training split's group labels are counted (for the adjusted average) and then hidden unless
    `method` names a method that declares reads_train_groups (benchmarks/data/splits.py).
    """
    dev = pick_device(device)
    if dev.type == "cpu":
        # Subnormal floats (|x| < 1.2e-38) are 10-100x slower on x86 CPUs. Strong weight decay drives the
        # weights and BatchNorm running variances of dead channels through that range: tuning trials of
        # spurious-fashion at weight decay 0.04 slowed from 19 s an epoch to 157 s within three epochs.
        # Flushed to zero they cost nothing; where they are used they meet numbers of normal size
        # (BatchNorm adds eps = 1e-5 to the variance), so a run without them ends the same to float precision.
        torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    data = restrict_train(load_data(protocol.dataset, data_root, protocol.data_kwargs), protocol.train_subset)
    data = carve_holdout(data, protocol.holdout_size(len(data.train)),
                         RunContext(protocol, data, dev, ComputeMeter(), seed).generator("holdout"))
    data = count_train_groups(data)
    if method is None or not method_class(method).traits.reads_train_groups:
        data = hide_train_groups(data, method or "(none named)")
    for name in ("train", "test", "val", "holdout"):
        if getattr(data, name) is not None:
            setattr(data, name, getattr(data, name).to(dev))
    return RunContext(protocol=protocol, data=data, device=dev, meter=ComputeMeter(), seed=seed, log=log,
                      progress=progress, cache_dir=Path(cache_dir) if cache_dir else None,
                      results_dir=Path(results_dir) if results_dir else None)


def reference_flops(ctx: RunContext) -> int:
    """What the protocol's reference method costs on the full data: computed, not run.

    Its training step (its own model and objective, as `build_model` and `objective` define them) is
    measured with flop_counter on a throwaway model for a full batch and for the epoch's last partial
    batch, and multiplied by the steps of the protocol's epochs over all N training examples. The
    probe is bookkeeping, no method's work: it runs outside every counter and leaves the run's
    random state as it was. The throwaway method gets `setup` (what its objective may read), never
    `prepare`.
    """
    protocol = ctx.protocol
    reference = create_method(protocol.reference)
    n, size = ctx.num_train, min(protocol.batch_size, ctx.num_train)
    steps = {size: n // size}
    if n % size:
        steps[n % size] = 1
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    per_epoch = 0
    with unmetered(), torch.random.fork_rng(devices=devices):
        model = reference.build_model(ctx) or ctx.new_model("reference-probe")
        set_up(reference, ctx)
        trainer = Trainer(ctx, model.train(), reference, evaluate=False, tag="reference-probe")
        for batch_size, count in steps.items():
            batch = next(iter(trainer.batches(torch.arange(batch_size), batch_size, torch.Generator().manual_seed(0))))
            flops, _ = count_flops(trainer.forward_backward, batch)
            per_epoch += flops * count
    return per_epoch * protocol.epochs


def final_metrics(curve: list[dict], rule: str) -> dict:
    """The reported metrics: the last evaluated epoch, or the protocol's validation-based rule.

    "best-val-worst-group": the evaluated epoch with the highest validation worst-group accuracy
    (the latest of equals). Every evaluation split is evaluated at every evaluated epoch, so the
    reported test numbers are those of the checkpoint the rule selects, chosen without the test set.
    """
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


def example_sets_by_group(method, ctx: RunContext) -> dict:
    """method_stats entries: each of the method's example sets counted per training group.

    Computed by the harness after training from the training split's group labels, which the method
    itself never sees (a summary for the reader; nothing feeds back into the run).
    """
    groups = unhidden_groups(ctx.data.train)
    if groups is None or not ctx.data.num_groups:
        return {}
    totals = torch.bincount(groups, minlength=ctx.data.num_groups)
    stats = {}
    for name, members in method.example_sets().items():
        members = torch.as_tensor(members, dtype=torch.long).cpu().unique()
        counts = torch.bincount(groups[members], minlength=ctx.data.num_groups)
        stats[f"{name}_group_counts"] = counts.tolist()
        stats[f"{name}_share_of_group"] = [round(c / t, 6) if t else None
                                           for c, t in zip(counts.tolist(), totals.tolist())]
    return stats


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


def _prepare_once(method, ctx: RunContext, dist: Dist) -> None:
    """Data parallel: `prepare` on rank 0 alone; every rank then holds its result (what a checkpoint
    holds). A failure on rank 0 (a stop request during a proxy included) reaches every rank, which
    would otherwise wait in the broadcast until the collective timeout."""
    failure = None
    if dist.is_main:
        try:
            method.prepare(ctx)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are told
            failure = exc
    outcome = dist.broadcast((None, type(failure).__name__, str(failure)) if failure is not None
                             else (_on_cpu(method.state_dict()) if dist.is_main else None, None, None))
    state, error, message = outcome
    if failure is not None:
        raise failure
    if error == Preempted.__name__:
        raise Preempted(message)
    if error is not None:
        raise RuntimeError(f"prepare failed on rank 0: {error}: {message}")
    if not dist.is_main:
        method.load_state_dict(state)


def execute(spec: RunSpec, out: str | Path = "results", *, data_root: str | None = None,
            device: str | None = None, progress: bool | None = None, force: bool = False,
            log=print, loggers: list[RunLogger] = (), group: str | None = None, save: bool = False) -> dict:
    """Run (or skip, if its complete record exists) one run and return its record.

    Bad input raises BenchError before anything is written. Once training starts, any error ends
    in a record with status "failed" and the error, then re-raises. `group` names the sweep.
    `save` keeps the final model (as do the protocol's save_model and a method's traits.save_model).
    """
    run = spec.resolve()
    protocol, params, rid = run.protocol, run.params, run.run_id
    layout = ResultsLayout(out)
    path = layout.record(rid)
    dev = pick_device(device)  # a device that does not exist is an error even where the run would be skipped
    save = save or protocol.save_model or method_class(spec.method).traits.save_model
    if not force and is_complete(path) and not (save and not layout.model(rid).exists()):
        log(f"skip {rid}: a complete record exists at {path}")
        return load_record(path)
    dist = distributed.setup(dev.type)  # None for one process
    dev = pick_device(device, dist)
    main = dist is None or dist.is_main  # rank 0 alone writes records, checkpoints, models and W&B
    if not main:
        log, loggers = _quiet, ()
    progress = (sys.stderr.isatty() and main) if progress is None else progress
    started = time.perf_counter()  # wall-clock includes loading the data
    # What the run needs is checked before anything is written: the data (missing or damaged files are
    # bad input, not a failed run) and a results folder that can take records and checkpoints.
    ctx = build_context(protocol, spec.seed, data_root=data_root, device=str(dev), cache_dir=layout.cache,
                        results_dir=out, log=log, progress=progress, method=spec.method)
    check_writable(out)
    identity = dict(run.identity(), group=group, env=environment(dev), code=code_fingerprint(),
                    distributed={"world_size": dist.world_size if dist else 1,
                                 "backend": dist.backend if dist else None,
                                 "sync_batchnorm": bool(dist and protocol.sync_batchnorm)})
    earlier_seconds = 0.0  # wall-clock of the attempts before a resume (preempted, killed)
    logging_seconds = 0.0  # W&B's own time is not the method's
    ckpt_path = layout.checkpoint(rid)
    # Checked before anything is written: a checkpoint that cannot be used stops the run (see _read_checkpoint).
    saved_state = _read_checkpoint(ckpt_path, rid, ctx, force=force, main=main, log=log)
    write_checkpoint = functools.partial(save_checkpoint, owner=rid) if main else _no_checkpoint
    trainer = None

    def wall_clock() -> float:
        return earlier_seconds + time.perf_counter() - started - logging_seconds

    try:
        method = create_method(spec.method, **params)
        full_flops = reference_flops(ctx)
        trainer = Trainer(ctx, method.build_model(ctx) or ctx.new_model("main"), method, purpose="train",
                          evaluate=True, dist=dist)
        resumed = _resume(saved_state, ckpt_path, ctx, trainer)
        if resumed:
            earlier_seconds = resumed["elapsed_s"]
        else:
            prepare_started = time.perf_counter()
            if dist is None:
                method.prepare(ctx)
            else:
                _prepare_once(method, ctx, dist)
            ctx.meter.sync(dist)
            trainer.state.seconds += time.perf_counter() - prepare_started
        # Every process start, once the method's state is complete (prepared, or loaded from the
        # checkpoint or from rank 0): the method restores what the checkpoint does not hold. Uncharged.
        set_up(method, ctx)
        if not resumed:
            write_checkpoint(ckpt_path, _checkpoint(ctx, trainer, wall_clock()))
        log(f"run {rid}: {protocol.name} / {spec.method} {params} seed {spec.seed} on {dev}"
            + (f" (resumed at epoch {trainer.state.epoch})" if resumed else ""))

        n_train = ctx.num_train
        identity.update(n_train=n_train, holdout=_holdout_info(ctx))
        logging_seconds += _call_loggers(loggers, "start", dict(identity, schema=SCHEMA, fresh=force,
                                                                resumed_at_epoch=trainer.state.epoch), log=log)

        def end_of_epoch(t: Trainer) -> None:
            write_checkpoint(ckpt_path, _checkpoint(ctx, t, wall_clock()))
            nonlocal logging_seconds
            logging_seconds += _call_loggers(loggers, "log_epoch", t.state.curve[-1], full_flops, log=log)

        trainer.fit(on_epoch_end=end_of_epoch)
        if dist is not None:  # every rank should have made the same decisions: say whether they did
            digests = dist.gather_objects(_digest(method.state_dict()))
            identity["distributed"].update(method_state_sha256=digests, ranks_agree=len(set(digests)) == 1)
        wall = wall_clock()
        record = new_record(identity, "complete",
                            metrics=final_metrics(trainer.state.curve, protocol.selection_rule),
                            compute=compute_summary(ctx.meter, full_flops, protocol.reference),
                            wall_clock_s=round(wall, 3), train_seconds=round(trainer.state.seconds, 3),
                            cached_seconds=round(ctx.cached_seconds, 3),
                            charged_seconds=round(wall + ctx.cached_seconds, 3), curve=trainer.state.curve,
                            method_stats={**method.summary(), **example_sets_by_group(method, ctx)})
        if save:
            saved = layout.model(rid)
            if main:
                save_model(saved, trainer.model, method.backbone(trainer.model),
                           {k: record[k] for k in ("run_id", "protocol", "method", "params", "seed", "overrides",
                                                   "resolved_protocol", "metrics")}, ctx)
            record["model_path"] = str(saved)
        if main:
            write_record(path, record)
            ckpt_path.unlink(missing_ok=True)
            log(f"wrote record {path} ({record['status']})")
        _call_loggers(loggers, "finish", record, log=log)
        return record
    except Preempted as stop:
        stop.progress = ctx.meter.total  # FLOPs spent so far: a requeue that adds none made no progress
        # Not a failure: save where training stopped (mid-epoch included) and let the caller requeue.
        # Stopped inside `prepare`, there is nothing consistent to save: prepare starts over.
        if ckpt_path.exists():
            write_checkpoint(ckpt_path, _checkpoint(ctx, trainer, wall_clock()))
            log(f"preempted: {rid} checkpointed at epoch {trainer.state.epoch}"
                + (f", step {trainer.partial.steps_done} of the next" if trainer.partial else "")
                + f" ({ckpt_path})")
        else:
            log(f"preempted in prepare: {rid} will redo prepare from its cached artefacts and partial proxies")
        raise
    except Exception as exc:
        record = new_record(identity, "failed", wall_clock_s=round(wall_clock(), 3),
                            curve=trainer.state.curve if trainer else [], error=f"{type(exc).__name__}: {exc}",
                            traceback=None if isinstance(exc, BenchError) else traceback.format_exc())
        if main:
            write_record(path, record)
        _call_loggers(loggers, "finish", record, log=log)
        raise


def write_failed_record(spec: RunSpec, out: str | Path, error: str, *, group: str | None = None,
                        device: str | None = None) -> dict:
    """A failed record for a run stopped from outside its training (a refused requeue, data the task could
    not load): status "failed" with the reason. Its checkpoint is kept, so running it again resumes."""
    run = spec.resolve()
    dist = distributed.current()  # a data-parallel task's rank 0 writes it for every rank
    identity = dict(run.identity(), group=group, env=environment(pick_device(device, dist)),
                    code=code_fingerprint(),
                    distributed={"world_size": dist.world_size if dist else 1,
                                 "backend": dist.backend if dist else None,
                                 "sync_batchnorm": bool(dist and run.protocol.sync_batchnorm)})
    record = new_record(identity, "failed", error=error)
    write_record(ResultsLayout(out).record(run.run_id), record)
    return record


CHECKPOINT_KEYS = ("meter", "cached_seconds", "trainer", "elapsed_s")  # what _checkpoint writes


def _read_checkpoint(path: Path, rid: str, ctx: RunContext, *, force: bool, main: bool, log) -> dict | None:
    """The run's checkpoint (read safely, checked to be this run's: benchmarks/core/checkpoint.py), or None to
    start fresh: when there is none, or when --force is given and the one there cannot be used.

    A checkpoint that cannot be used (refused by the safe loader, damaged, of another run, incomplete) stops
    the run with one line (exit status 2) and is left as it is: it may hold days of training that a fix of
    the code would resume. --force moves it aside to `<run_id>.pt.refused` (kept, for a look) and starts over.
    """
    try:
        return load_checkpoint(path, rid, CHECKPOINT_KEYS, map_location=ctx.device,
                               advice="nothing was changed: pass --force to set it aside and start this run "
                                      "fresh, or move it away yourself")
    except CheckpointRefused as refusal:
        if not force:
            raise
        if main:  # data parallel: rank 0 moves it; another rank reads either the refused file or none
            try:
                aside = set_aside(path)
            except FileNotFoundError:
                return None
            log(f"--force: checkpoint {path} set aside as {aside} ({refusal.reason}); starting fresh")
        return None


def _resume(payload: dict | None, path: Path, ctx: RunContext, trainer: Trainer) -> dict | None:
    """The checkpoint's bookkeeping (elapsed wall-clock) after loading it into ctx and trainer; None if none."""
    if payload is None:
        return None
    try:
        trainer.load_state_dict(payload["trainer"])
        ctx.meter = ComputeMeter.from_state(payload["meter"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        # The file is this run's, but its state does not fit the trainer or the method: the code changed.
        raise CheckpointRefused(path, f"its state does not fit this run ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}); "
                                "written by another version of the code?", "remove it to start this run over") from None
    ctx.cached_seconds = payload["cached_seconds"]
    return {"elapsed_s": payload["elapsed_s"]}


def _quiet(*_args, **_kwargs) -> None:
    pass


def _no_checkpoint(path: Path, payload: dict) -> None:
    """A rank other than 0 writes nothing."""


def _on_cpu(value):
    """A state (nested dicts, lists, tensors) with its tensors on the CPU, to send to other ranks."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _digest(value) -> str:
    """A fingerprint of a method state (tensor contents and plain values), to compare ranks."""
    digest = hashlib.sha256()

    def feed(item) -> None:
        if isinstance(item, torch.Tensor):
            digest.update(item.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(item, dict):
            for key in sorted(item, key=repr):
                digest.update(repr(key).encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            for element in item:
                feed(element)
        else:
            digest.update(repr(item).encode())

    feed(value)
    return digest.hexdigest()[:16]


def _checkpoint(ctx: RunContext, trainer: Trainer, elapsed_s: float) -> dict:
    """What a resume needs; elapsed_s keeps the wall-clock of every attempt in the record, not the last one's."""
    return {"meter": ctx.meter.state_dict(), "cached_seconds": ctx.cached_seconds, "trainer": trainer.state_dict(),
            "elapsed_s": elapsed_s}


def _holdout_info(ctx: RunContext) -> dict | None:
    """The held-out split's size and a fingerprint of its examples (their full-split indices)."""
    origin = ctx.data.holdout_origin
    if origin is None:
        return None
    digest = hashlib.sha256(origin.numpy().astype("int64").tobytes()).hexdigest()[:16]
    return {"size": len(origin), "indices_sha256": digest}

