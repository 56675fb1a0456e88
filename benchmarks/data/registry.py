"""Datasets by name: `register_dataset(name, loader, has_groups=...)`, the one list load_data reads.

The built-ins (benchmarks/data/__init__.py) and the datasets of installed plugins (entry-point group
`data_efficiency_bench.datasets`, loaded the first time the registry is consulted: see
benchmarks/core/plugins.py) are registered the same way. A loader is called as

    loader(roots, kwargs) -> DataBundle

with `roots` the folders to look in, in order (--data-root, $BENCH_DATA, the cache folder), and
`kwargs` a copy of the protocol's `data_kwargs`; it returns the splits on the CPU. It raises
BenchError (one line: where it looked, what to do) when its data is missing.

benchmarks.api re-exports `register_dataset`: this module (and the package __init__ that loads first)
imports only modules that never import benchmarks.api at import time, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.core.plugins import DATASETS_GROUP, failures_note, load_plugins
from benchmarks.errors import BenchError

if TYPE_CHECKING:
    from benchmarks.data import DataBundle

Loader = Callable[[list[Path], dict], "DataBundle"]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Loader
    # Whether the data carries group labels (worst-group accuracy, group methods): a bool, or a
    # function of the data_kwargs when they decide it (the synthetic data's `groups`).
    has_groups: bool | Callable[[dict], bool] = False
    description: str = ""

    def groups(self, kwargs: dict | None) -> bool:
        if callable(self.has_groups):
            return bool(self.has_groups(dict(kwargs or {})))
        return bool(self.has_groups)


_DATASETS: dict[str, DatasetEntry] = {}


def _where(loader: Any) -> str:
    return f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', repr(loader))}"


def register_dataset(name: str, loader: Loader | None = None, *, has_groups: bool | Callable[[dict], bool] = False,
                     description: str = ""):
    """Register `loader` under `name`; without a loader, a decorator: `@register_dataset("name")`.

    A name registered twice by different loaders is an error (never a silent overwrite).
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"dataset name must be a non-empty string without surrounding spaces, got {name!r}")

    def add(function: Loader) -> Loader:
        if not callable(function):
            raise ValueError(f"dataset '{name}': the loader must be callable, got {function!r}")
        old = _DATASETS.get(name)
        if old is not None and old.loader is not function:
            raise ValueError(f"dataset '{name}' registered twice: by {_where(old.loader)} and by {_where(function)}")
        _DATASETS[name] = DatasetEntry(name, function, has_groups, description)
        return function

    return add if loader is None else add(loader)


def list_datasets() -> dict[str, DatasetEntry]:
    """Every registered dataset, the plugins' included (loaded on the first call in a process)."""
    load_plugins(DATASETS_GROUP)
    return dict(sorted(_DATASETS.items()))


def dataset_entry(name: str) -> DatasetEntry:
    datasets = list_datasets()
    if name not in datasets:
        raise BenchError(f"unknown dataset '{name}' (registered: {', '.join(datasets)})"
                         f"{failures_note(DATASETS_GROUP)}")
    return datasets[name]
