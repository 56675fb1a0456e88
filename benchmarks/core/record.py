"""The run record: one JSON file per run, the source of truth for every table.

Written atomically (a temporary file in the same folder, fsync, then rename), so a crash leaves
the old file or none, never half a file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.core.layout import ResultsLayout
from benchmarks.errors import BenchError

# 2: compute measured with flop_counter (train, selection, eval as executed); the reference method named.
# 1: compute estimated as "backward = 2 x forward" of the main model; never tabulated beside 2.
SCHEMA = 2
STATUSES = ("complete", "failed")
REQUIRED_KEYS = ("schema", "run_id", "status", "protocol", "method", "params", "seed", "overrides")


class RecordError(Exception):
    """A record file that cannot be read (truncated, not JSON, missing keys)."""


# Every record, complete or failed, has these fields in this order (new_record builds them all). `code` is the
# code fingerprint (benchmarks/core/provenance.py); records written before it lack it (env.git stays for them).
IDENTITY_FIELDS = ("run_id", "protocol", "method", "params", "seed", "overrides", "budget", "group", "selection_rule",
                   "reads_train_groups", "protocol_fingerprint", "resolved_protocol", "env", "code", "distributed",
                   "n_train", "holdout")
OUTCOME_FIELDS = {"metrics": dict, "compute": None, "wall_clock_s": None, "train_seconds": None,
                  "cached_seconds": None, "charged_seconds": None, "curve": list, "method_stats": dict, "error": None,
                  "traceback": None}


def new_record(identity: dict, status: str, **outcome: Any) -> dict:
    """The one constructor of run records: `identity` (ResolvedRun.identity() plus group, env, distributed,
    n_train, holdout; missing ones are None) and the outcome fields (unset ones take their empty value)."""
    if status not in STATUSES:
        raise ValueError(f"unknown record status {status!r}")
    unknown = sorted(set(outcome) - set(OUTCOME_FIELDS) - {"model_path"})
    if unknown:
        raise ValueError(f"not a record field: {unknown[0]}")
    record = {"schema": SCHEMA, **{key: identity.get(key) for key in IDENTITY_FIELDS}}
    if identity.get("tuning") is not None:  # a tuned sweep's trial or selected run: its role travels with it
        record["tuning"] = identity["tuning"]
    record["status"] = status
    for key, empty in OUTCOME_FIELDS.items():
        record[key] = outcome[key] if key in outcome else (empty() if callable(empty) else empty)
    if "model_path" in outcome:
        record["model_path"] = outcome["model_path"]
    return record


def params_label(params: dict) -> str:
    """A run's parameters as one sorted "k=v, k=v" string ("-" for none), as tables and paper files write them."""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a record is shared like any file the user writes (a team's
        # results folder on a cluster filesystem), so it gets the mode the user's umask gives.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MIN_FREE_BYTES = 64 * 2**20  # below this, the first checkpoint would likely fail: say so before training


def check_writable(out: str | Path, min_free: int = MIN_FREE_BYTES) -> None:
    """The results folder can take records and checkpoints: it exists or can be made, a file can be
    written there, and the disk has room. One BenchError line otherwise, before any training."""
    out = Path(out)
    probe_dir = ResultsLayout(out).runs
    existing = next((p for p in (probe_dir, *probe_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BenchError(f"results folder '{out}': '{existing}' is a file, not a folder")
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".write-test.")
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise BenchError(f"results folder '{out}' is not writable ({exc.strerror or exc}); "
                         "choose another with --out") from None
    free = shutil.disk_usage(probe_dir).free
    if free < min_free:
        raise BenchError(f"results folder '{out}' has {free / 2**20:.0f} MiB free; runs need at least "
                         f"{min_free / 2**20:.0f} MiB for records and checkpoints (free space or choose --out)")


def write_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), (json.dumps(record, indent=1, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def load_record(path: Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable record ({exc})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a record (top level is not an object)")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise RecordError(f"{path}: record lacks '{missing[0]}'")
    if record["status"] not in STATUSES:
        raise RecordError(f"{path}: unknown status {record['status']!r}")
    return record


def load_records(folder: str | Path) -> tuple[list[dict], list[str]]:
    """All readable records under a folder (searched recursively), and one problem line per bad file."""
    records, problems = [], []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            record = load_record(path)
        except RecordError as exc:
            problems.append(str(exc))
            continue
        record["_path"] = str(path)
        records.append(record)
    return records, problems


def is_complete(path: Path) -> bool:
    """A complete record of the current schema (an older one is run again)."""
    try:
        record = load_record(path)
    except RecordError:
        return False
    return record["status"] == "complete" and record["schema"] == SCHEMA


def reference_of(record: dict) -> str:
    """The method a record's "delta vs full" refers to: its protocol's reference (full by default)."""
    return ((record.get("compute") or {}).get("reference") or (record.get("resolved_protocol") or {}).get("reference")
            or "full")


def current_records(records: list[dict], problems: list[str]) -> list[dict]:
    """The records of the current schema; one problem line for each older one (they are not mixed)."""
    kept = []
    for record in records:
        if record.get("schema") == SCHEMA:
            kept.append(record)
        else:
            problems.append(f"{record.get('_path') or record.get('run_id')}: record schema {record.get('schema')!r} "
                            f"(compute estimated, before measured FLOPs) is not mixed with schema {SCHEMA}; "
                            "run it again (the sweep or `run` redoes it)")
    return kept
