"""The run record: one JSON file per run, the source of truth for every table.

Written atomically (a temporary file in the same folder, fsync, then rename), so a crash leaves
the old file or none, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA = 1
STATUSES = ("complete", "failed")
REQUIRED_KEYS = ("schema", "run_id", "status", "protocol", "method", "params", "seed", "overrides")


class RecordError(Exception):
    """A record file that cannot be read (truncated, not JSON, missing keys)."""


def run_id(protocol: str, method: str, params: dict, seed: int, overrides: dict) -> str:
    """A stable hash of what defines a run; params should be resolved (defaults filled in)."""
    key = json.dumps({"protocol": protocol, "method": method, "params": params, "seed": seed,
                      "overrides": overrides}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def runs_dir(out: str | Path) -> Path:
    return Path(out) / "runs"


def record_path(out: str | Path, rid: str) -> Path:
    return runs_dir(out) / f"{rid}.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    try:
        return load_record(path)["status"] == "complete"
    except RecordError:
        return False
