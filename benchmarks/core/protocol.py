"""Fixed training protocols, stored as data (one TOML file each in benchmarks/protocols/).

A protocol is flat on purpose: every key can be overridden from the command line with
`--set key=value`, and the override is recorded in the run record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchmarks.errors import BenchError

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "protocols"

BUDGETS = ("epochs", "iterations")
OPTIMIZERS = ("sgd", "adamw", "lars")
SCHEDULES = ("constant", "multistep", "onecycle", "linear", "cosine")
SELECTION_RULES = ("last-epoch", "best-val-worst-group")
EVALUATIONS = ("accuracy", "linear-probe")
TASKS = ("supervised", "self-supervised")


@dataclass(frozen=True)
class Protocol:
    name: str
    dataset: str
    model: str
    epochs: int
    batch_size: int
    budget: str  # "epochs": a subset gets fewer steps; "iterations": it keeps the full-data step count
    optimizer: str
    lr: float
    schedule: str
    description: str = ""
    model_kwargs: dict = field(default_factory=dict)
    # Start from pretrained weights: timm's (from its cache or the Hugging Face hub), or the state dict
    # in `pretrained_file` (timm's pretrained_cfg "file" overlay; a file implies pretrained). Weights
    # that cannot be had fail the run with one line saying how to supply them, never a random init.
    pretrained: bool = False
    pretrained_file: str = ""
    data_kwargs: dict = field(default_factory=dict)
    train_subset: int = 0  # 0 = the whole training split; N = a fixed random N examples (quick runs)
    eval_batch_size: int = 1024
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    milestones: list = field(default_factory=list)  # epochs at which "multistep" multiplies lr by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    onecycle_pct_start: float = 0.25
    label_smoothing: float = 0.0
    augment: list = field(default_factory=list)  # the training batches' pipeline (benchmarks/core/augment.py)
    crop_padding: int = 4  # the "crop" augmentation's padding unless a spec gives its own
    view_augment: list = field(default_factory=list)  # the pipeline of Batch.view() (two-view methods)
    amp: bool = False  # mixed precision, used only on CUDA
    task: str = "supervised"  # which methods fit: Method.kind
    reference: str = "full"  # the method whose full-data cost is the compute fraction's denominator
    holdout: float = 0.0  # examples carved from the training data (a count >= 1, or a fraction < 1)
    evaluation: str = "accuracy"  # or "linear-probe": a linear classifier on frozen backbone features
    probe_epochs: int = 100
    probe_lr: float = 3e-4
    probe_batch_size: int = 128
    probe_weight_decay: float = 0.0
    eval_every: int = 1
    selection_rule: str = "last-epoch"
    save_model: bool = False  # keep every run's final model next to its record
    sync_batchnorm: bool = False  # data parallel: BatchNorm statistics over the global batch (GPUs only)
    seeds: list = field(default_factory=lambda: [0])

    def augment_defaults(self) -> dict:
        return {"crop": {"padding": self.crop_padding}}

    def holdout_size(self, n_train: int) -> int:
        """How many training examples the held-out split takes from n_train."""
        if self.holdout >= 1:
            return int(self.holdout)
        return round(self.holdout * n_train)

    def replace(self, **changes: Any) -> Protocol:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(Protocol)}
_TYPES = get_type_hints(Protocol)
_REQUIRED = [f.name for f in dataclasses.fields(Protocol)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _check_type(key: str, value: Any, where: str) -> Any:
    expected = _TYPES[key]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise BenchError(f"{where}: key '{key}' must be {expected.__name__}, got {value!r}")
    if not _all_finite(value):  # TOML reads nan and inf as floats; no protocol setting means them
        raise BenchError(f"{where}: key '{key}' must be a finite number, got {value!r}")
    return value


def _all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a value (lists and tables included)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def _check_values(p: Protocol, where: str) -> None:
    def bad(key: str, why: str) -> BenchError:
        return BenchError(f"{where}: key '{key}' {why}, got {getattr(p, key)!r}")

    from benchmarks.data.registry import dataset_entry  # here: importing a protocol need not load the readers

    try:  # the built-ins and the installed plugins' datasets; an unknown name lists them
        dataset_entry(p.dataset)
    except BenchError as exc:
        raise BenchError(f"{where}: {exc}") from None
    if p.epochs < 1:
        raise bad("epochs", "must be >= 1")
    if p.batch_size < 1:
        raise bad("batch_size", "must be >= 1")
    if p.eval_batch_size < 1:
        raise bad("eval_batch_size", "must be >= 1")
    if p.budget not in BUDGETS:
        raise bad("budget", f"must be one of {BUDGETS}")
    if p.optimizer not in OPTIMIZERS:
        raise bad("optimizer", f"must be one of {OPTIMIZERS}")
    if p.schedule not in SCHEDULES:
        raise bad("schedule", f"must be one of {SCHEDULES}")
    if not p.lr > 0:
        raise bad("lr", "must be > 0")
    if not 0 <= p.label_smoothing < 1:
        raise bad("label_smoothing", "must be in [0, 1)")
    if p.train_subset < 0:
        raise bad("train_subset", "must be >= 0")
    if p.eval_every < 1:
        raise bad("eval_every", "must be >= 1")
    if not 0 < p.onecycle_pct_start < 1:
        raise bad("onecycle_pct_start", "must be in (0, 1)")
    # The model and augmentation registries import torch: loaded here, when a protocol is checked, so that
    # commands that only read TOML or records (status, tables, --help) start without it.
    from benchmarks.core.augment import parse_pipeline
    from benchmarks.core.models import check_model_kwargs

    try:
        check_model_kwargs(p.model, p.model_kwargs)
    except BenchError as exc:
        raise BenchError(f"{where}: {exc}") from None
    for key in ("augment", "view_augment"):
        parse_pipeline(getattr(p, key), f"{where}: key '{key}'", p.augment_defaults())
    if p.crop_padding < 0:
        raise bad("crop_padding", "must be >= 0")
    if p.evaluation not in EVALUATIONS:
        raise bad("evaluation", f"must be one of {EVALUATIONS}")
    if p.task not in TASKS:
        raise bad("task", f"must be one of {TASKS}")
    if not p.reference.strip():
        raise bad("reference", "must name a registered method")
    for key in ("probe_epochs", "probe_batch_size"):
        if getattr(p, key) < 1:
            raise bad(key, "must be >= 1")
    if not p.probe_lr > 0:
        raise bad("probe_lr", "must be > 0")
    if not p.probe_weight_decay >= 0:
        raise bad("probe_weight_decay", "must be >= 0")
    if not (p.holdout >= 0 and math.isfinite(p.holdout)) or (p.holdout >= 1 and p.holdout != int(p.holdout)):
        raise bad("holdout", "must be a count of examples (a whole number >= 1) or a fraction in [0, 1)")
    if p.selection_rule not in SELECTION_RULES:
        raise bad("selection_rule", f"must be one of {SELECTION_RULES}")
    if not p.seeds or not all(isinstance(s, int) for s in p.seeds):
        raise bad("seeds", "must be a non-empty list of integers")


def protocol_from_dict(data: dict, where: str, *, check_values: bool = True) -> Protocol:
    """The Protocol a TOML table describes: keys and types always checked; values (which consult the
    dataset, model and augmentation registries, hence torch) unless `check_values=False`, for a
    command that only shows a protocol and never runs it (`list`)."""
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise BenchError(f"{where}: unknown key '{unknown[0]}' (known keys: {', '.join(sorted(_FIELDS))})")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise BenchError(f"{where}: missing key '{missing[0]}'")
    checked = {k: _check_type(k, v, where) for k, v in data.items()}
    protocol = Protocol(**checked)
    if check_values:
        _check_values(protocol, where)
    return protocol


# The one exclusion list of the protocol's fingerprint, field by field:
# fields that cannot change what a run computes stay out of its identity (the run id) ...
NOT_IN_IDENTITY = frozenset({"description", "seeds", "save_model"})
# ... and these change a run's evaluation, accounting or reporting but never what a model TRAINED under
# the protocol computes, so they stay out of the key of cached artefacts (proxies, scores, targets) too.
EVALUATION_ONLY = frozenset({"eval_batch_size", "eval_every", "selection_rule", "budget", "evaluation",
                             "probe_epochs", "probe_lr", "probe_batch_size", "probe_weight_decay", "reference"})


def fingerprint(protocol: Protocol, *, artefacts: bool = False) -> str:
    """A hash of the protocol's resolved contents: every field that can change a run, at a value
    other than its default.

    Editing a protocol file (a learning rate, say) changes the fingerprint, so the run id, so the run
    is run again instead of being skipped as complete. Fields at their defaults stay out, so adding a
    new field with a default that keeps today's behaviour does not orphan every stored record; a
    value written out equal to the default is the same protocol as one that leaves it out.

    `artefacts=True`: the fingerprint that keys cached artefacts (benchmarks.kit.proxies), which also
    leaves out the EVALUATION_ONLY fields: runs that differ only in those share their proxies.
    """
    excluded = NOT_IN_IDENTITY | EVALUATION_ONLY if artefacts else NOT_IN_IDENTITY
    fields = {key: value for key, value in protocol.as_dict().items()
              if key not in excluded and (key in _REQUIRED or value != _default(key))}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _default(key: str) -> Any:
    spec = _FIELDS[key]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def available_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


def find_toml(name_or_path: str, folder: Path, kind: str) -> Path:
    """A .toml path as given, or `<folder>/<name>.toml` for a built-in name."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.exists():
        return candidate
    builtin = folder / f"{name_or_path}.toml"
    if builtin.exists():
        return builtin
    known = ", ".join(sorted(p.stem for p in folder.glob("*.toml")))
    raise BenchError(f"unknown {kind} '{name_or_path}' (a .toml path, or one of: {known})")


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"{path}: not valid TOML: {exc}") from None


def load_protocol(name_or_path: str, *, check_values: bool = True) -> Protocol:
    path = find_toml(name_or_path, PROTOCOL_DIR, "protocol")
    return protocol_from_dict(read_toml(path), str(path), check_values=check_values)


def parse_value(text: str) -> Any:
    """A command-line value in TOML syntax (5, 0.1, true, [60, 120]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"{what} '{item}' must look like key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(protocol: Protocol, overrides: dict[str, Any]) -> Protocol:
    if not overrides:
        return protocol
    data = protocol.as_dict()
    for key in overrides:
        if key not in _FIELDS:
            raise BenchError(f"--set: unknown protocol key '{key}' (known keys: {', '.join(sorted(_FIELDS))})")
    data.update(overrides)
    return protocol_from_dict(data, f"protocol '{protocol.name}' with --set {overrides}")
