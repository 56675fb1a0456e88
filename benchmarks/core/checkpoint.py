"""The one checkpoint mechanism: written atomically, read without running code, checked before use.

Every state the suite writes to resume or reuse later goes through here: a run's checkpoint
(`OUT/checkpoints/<run_id>.pt`), a proxy's partial checkpoint in the cache, and saved models
(`OUT/models/<run_id>.pt`). A file is a dict of the caller's entries plus two of its own:
`checkpoint_format` (this format's name and version) and `checkpoint_owner` (whose state it is: a
run id, or a proxy's cache key), so that a file of another run or another program is told apart
from this one's.

Reading: `torch.load(..., weights_only=True)` alone. Its unpickler builds tensors, numbers,
strings, bytes, lists, tuples, dicts, sets and a few torch types, and refuses every other global,
so a planted file whose unpickling would call `os.system` is refused without being executed.
Writing checks the same rule first (`check_storable`): a state holding another type (a numpy
array, a dataclass, a Path) fails when it is saved, naming the entry, instead of at the resume
that needs it. Nothing is allow-listed with torch.serialization.add_safe_globals: every state the
suite keeps converts to these types (TrainState/EpochProgress are stored as their vars(); RNG
states are tensors; saved models hold a state dict and the recipe to rebuild the module).

A file that cannot be used raises `CheckpointRefused` (a BenchError: one line, no traceback) with
its path and the reason: refused by the safe loader ("not trusted"), damaged or truncated, not
this format (an older suite's pickled checkpoint included), another owner's, or entries missing.
What then happens is the caller's decision (a run stops and waits for --force; a proxy partial in
the cache is recomputed); `set_aside` moves such a file out of the way without deleting it.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch

from benchmarks.core.record import atomic_write_bytes
from benchmarks.errors import BenchError

FORMAT = "data-efficiency-bench checkpoint 1"
FORMAT_KEY, OWNER_KEY = "checkpoint_format", "checkpoint_owner"
# What torch.load(weights_only=True) rebuilds without an allow-list (torch's _get_allowed_globals plus
# the containers and scalars pickle writes without a global).
_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.device, torch.dtype)
_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set, torch.Size)


class CheckpointRefused(BenchError):
    """A checkpoint file this suite will not use; it was not unpickled beyond what is safe."""

    def __init__(self, path: Path, reason: str, advice: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}; {advice}")


def check_storable(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of `value` that the safe loader could not read back."""
    if isinstance(value, torch.Tensor):
        # A subclass other than Parameter would need an allow-list entry to load.
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where} is a {type(value).__qualname__}; store a plain tensor")
        return
    if type(value) in _SCALARS:
        return
    if type(value) in _CONTAINERS:
        if isinstance(value, dict):
            for key, item in value.items():
                check_storable(key, f"{where} (a key)")
                check_storable(item, f"{where}[{key!r}]")
        else:
            for i, item in enumerate(value):
                check_storable(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
                    "torch.load(weights_only=True) refuses: store it as tensors, numbers, strings, lists or dicts")


def save_checkpoint(path: str | Path, entries: dict, owner: Any) -> None:
    """Write `entries` (checked by check_storable) and the owner atomically: a reader finds the old file or the
    new one, never half of one."""
    payload = {**entries, FORMAT_KEY: FORMAT, OWNER_KEY: owner}
    check_storable(payload, Path(path).name)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: str | Path, owner: Any, keys: tuple[str, ...] = (), *, map_location=None,
                    advice: str = "remove it to start over") -> dict | None:
    """The entries saved at `path` by `save_checkpoint` for `owner`; None when there is no file.

    A file that the safe loader refuses, that is damaged, of another format, of another owner, or
    without one of `keys`, raises CheckpointRefused: `advice` ends its message (what the user can do).
    """
    path = Path(path)
    if not path.exists():
        return None

    def refused(reason: str) -> CheckpointRefused:
        return CheckpointRefused(path, reason, advice)

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it has not seen: the answer is ours
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is several paragraphs; what matters is the global it refused, if it named one.
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if named:
            raise refused(f"not trusted: it asks for {named.group(1)}, which the safe loader refuses, so it was not "
                          "unpickled (a checkpoint of an older version of the suite, or a planted file)") from None
        stopped = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+", str(exc))
        raise refused("damaged, or a pickle that is not a torch file: the safe loader stopped "
                      f"({stopped.group(0) if stopped else _first_line(exc)}) and nothing was unpickled") from None
    except Exception as exc:  # noqa: BLE001 - the safe loader ran no code of the file: any failure means damage
        raise refused(f"damaged or truncated, not a readable torch file ({type(exc).__name__}: "
                      f"{_first_line(exc)})") from None
    if not isinstance(payload, dict) or payload.get(FORMAT_KEY) != FORMAT:
        found = payload.get(FORMAT_KEY) if isinstance(payload, dict) else None
        raise refused(f"not a checkpoint of this format (expected '{FORMAT}', found "
                      f"{_short(found) if found is not None else 'none: an older version of the suite, or another program'})")
    if not _equal(payload.get(OWNER_KEY), owner):
        raise refused(f"it belongs to {_short(payload.get(OWNER_KEY))}, not to {_short(owner)}")
    missing = [key for key in keys if key not in payload]
    if missing:
        raise refused(f"incomplete: it lacks {', '.join(missing)}")
    return {k: v for k, v in payload.items() if k not in (FORMAT_KEY, OWNER_KEY)}


def set_aside(path: str | Path) -> Path:
    """Move a refused file to `<path>.refused` (replacing an earlier one) and return where it went: out of the
    way of a fresh start, kept for whoever wants to look at it."""
    path = Path(path)
    aside = path.with_name(path.name + ".refused")
    path.replace(aside)
    return aside


def _equal(found: Any, owner: Any) -> bool:
    """found == owner, where `found` is whatever the file holds (tensors compare element-wise: not an owner)."""
    try:
        return bool(found == owner) and type(found) is type(owner)
    except (RuntimeError, TypeError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error message (torch's go on for a paragraph)."""
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0][:160] if text else ""


def _short(owner: Any) -> str:
    text = repr(owner)
    return text if len(text) <= 120 else text[:117] + "..."
