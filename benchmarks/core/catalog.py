"""What the registries hold, readable without importing torch: the catalog.

`list`, `tables`, `plots` and `replicate` need the registered methods' parameters (defaults, headline
parameters, the words a value reads as), the model names and the dataset names, but never run a
method. The registries can only be read by importing every method module, and those import torch:
1.5-2 s of CPU before a reporting command does anything. So the first reader builds the catalog
from the registries (importing torch, once) and keeps it as JSON in the user's cache folder; later
readers load the JSON, without torch.

The JSON is valid while the code that registers is unchanged: it is named by a key over the
modification time and size of every Python file of the built-in packages (benchmarks/, methods/,
baselines/) and of each installed plugin's top-level package, the plugins' entry points and
their distributions' versions. Any edit, install or uninstall gives a new key, hence a rebuild.
A plugin that fails to load is never cached (its warning is said again, and the next reader
retries). Where the cache folder cannot be written, the catalog is built in memory each time.

The folder: $BENCH_CATALOG_DIR, else $XDG_CACHE_HOME/data-efficiency-bench, else
~/.cache/data-efficiency-bench.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from benchmarks.core.plugins import DATASETS_GROUP, METHODS_GROUP, plugin_failures
from benchmarks.errors import BenchError

VERSION = 1  # of the JSON's shape: a change here gives every reader a new key
BUILT_IN_PACKAGES = ("benchmarks", "methods", "baselines")

_CATALOG: dict | None = None


def folder() -> Path:
    if os.environ.get("BENCH_CATALOG_DIR"):
        return Path(os.environ["BENCH_CATALOG_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "data-efficiency-bench"


def _package_files(name: str) -> list[Path]:
    """The .py files of a top-level module or package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    locations = list(spec.submodule_search_locations or [])
    if not locations:
        return [Path(spec.origin)] if spec.origin and spec.origin.endswith(".py") else []
    files = []
    for location in locations:
        for dirpath, dirnames, filenames in os.walk(location):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def key() -> str:
    """The catalog's key: changes whenever the code that registers methods, models or datasets may have."""
    digest = hashlib.sha256(f"{VERSION} {sys.prefix} {sys.version_info[:2]}".encode())
    packages = list(BUILT_IN_PACKAGES)
    for group in (METHODS_GROUP, DATASETS_GROUP):
        for entry in sorted(entry_points(group=group), key=lambda e: (e.name, e.value)):
            dist = getattr(entry, "dist", None)
            digest.update(f"{group} {entry.name} {entry.value} {dist.name if dist else ''} "
                          f"{dist.version if dist else ''}\n".encode())
            packages.append(entry.value.split(":")[0].split(".")[0])
    for package in dict.fromkeys(packages):
        for path in _package_files(package):
            try:
                stat = path.stat()
            except OSError:
                continue
            digest.update(f"{path} {stat.st_mtime_ns} {stat.st_size}\n".encode())
    return digest.hexdigest()[:20]


def build() -> dict:
    """The catalog from the registries themselves (imports every method module, hence torch)."""
    from benchmarks.core.models import list_models
    from benchmarks.core.registry import list_methods
    from benchmarks.data.registry import list_datasets

    methods = {}
    for name, cls in list_methods().items():
        params = {}
        for pname, param in cls.params.items():
            params[pname] = {"default": param.default, "type": type(param.default).__name__,
                             "describe": param.describe(), "help": param.help,
                             "labels": [[value, words] for value, words in (param.labels or {}).items()]}
        methods[name] = {
            "kind": cls.traits.kind, "needs_holdout": bool(cls.traits.needs_holdout),
            "reads_train_groups": bool(cls.traits.reads_train_groups),
            "doc": " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()),  # the first paragraph
            "headline_params": list(cls.traits.headline_params), "params": params}
    return {"methods": methods, "models": list(list_models()), "datasets": list(list_datasets())}


def _read(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # missing or half-written by a process that died: rebuild


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # readers see the whole file or none
    except OSError:
        pass  # a read-only home: the catalog is rebuilt in memory next time


def catalog() -> dict:
    """{"methods": {name: {...}}, "models": [...], "datasets": [...]}, from the cache when it is current."""
    global _CATALOG
    if _CATALOG is not None:
        return _CATALOG
    path = folder() / f"catalog-{key()}.json"
    data = _read(path)
    if data is None:
        data = build()
        # JSON keeps scalars as they are; a default it would change (a tuple) must not be cached changed.
        if (not plugin_failures(METHODS_GROUP) and not plugin_failures(DATASETS_GROUP)
                and json.loads(json.dumps(data)) == data):
            _write(path, data)
    _CATALOG = data
    return data


def method(name: str) -> dict | None:
    """One method's entry; None for a method this installation does not register."""
    return catalog()["methods"].get(name)


def defaults(name: str) -> tuple[dict, tuple[str, ...]] | None:
    """(the method's defaults, its headline parameters); None for a method this installation lacks."""
    entry = method(name)
    if entry is None:
        return None
    return {p: spec["default"] for p, spec in entry["params"].items()}, tuple(entry["headline_params"])


def filled_params(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method's defaults overlaid with `given` (ints read as floats where the parameter is a float,
    as the registry does): the parameters a run with `given` records. BenchError for an unknown method
    or parameter. Values are not range-checked: this reads records and paper files, it runs nothing."""
    entry = method(name)
    if entry is None:
        raise BenchError(f"unknown method '{name}' (available: {', '.join(catalog()['methods'])})")
    unknown = sorted(set(given) - set(entry["params"]))
    if unknown:
        raise BenchError(f"method '{name}' has no parameter '{unknown[0]}' "
                         f"(its parameters: {', '.join(entry['params']) or 'none'})")
    filled = {p: spec["default"] for p, spec in entry["params"].items()}
    for p, value in given.items():
        if entry["params"][p]["type"] == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        filled[p] = value
    return filled


def words(method_name: str, param: str, value) -> str | None:
    """The words a parameter's value reads as (ccs_beta -1 -> "paper beta"); None where it has none."""
    entry = method(method_name)
    spec = entry["params"].get(param) if entry is not None else None
    for known, said in (spec or {}).get("labels", []):
        if known == value:  # as a dict lookup of the registry's labels would match
            return said
    return None
