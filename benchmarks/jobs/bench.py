"""`bench`: every method that fits a protocol, at its defaults, as a sweep of its own.

A bench job is a Sweep like any other (a manifest, the local executor, `status`, `publish`); only the
way its runs are chosen differs: the registered methods that fit the protocol by the one rule that
`run` applies too (benchmarks.core.spec.unfit_reason), those for groups only on data with groups.
"""

from __future__ import annotations

import re

from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import list_methods, method_class
from benchmarks.core.spec import RunSpec, unfit_reason
from benchmarks.data import dataset_has_groups
from benchmarks.errors import BenchError
from benchmarks.jobs.sweep import Sweep


def job_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BenchError(f"job name '{name}' must be letters, digits, '.', '_' or '-' (it names a folder)")
    return name


def bench_sweep(protocol_name: str, *, methods: list[str] | None = None, seeds: list[int] | None = None,
                params: dict | None = None, overrides: dict | None = None,
                name: str | None = None, save_model: bool = False) -> tuple[Sweep, dict[str, str]]:
    """The bench job's sweep, and the registered methods left out with the reason (only when `methods`
    is not given: a method named explicitly that does not fit is an error when its run is resolved)."""
    protocol = load_protocol(protocol_name)
    overrides = overrides or {}
    resolved = apply_overrides(protocol, overrides)
    skipped: dict[str, str] = {}
    if methods is None:
        groups = dataset_has_groups(resolved.dataset, resolved.data_kwargs)
        methods = []
        for method, cls in list_methods().items():
            if cls.traits.kind != resolved.task or (cls.traits.for_groups and not groups):
                continue  # another task's methods, or group methods without groups: they never apply here
            reason = unfit_reason(resolved, method)
            if reason is None:
                methods.append(method)
            else:
                skipped[method] = reason
    for method in methods:
        method_class(method)  # unknown names fail before anything runs
    shared = params or {}
    for key in shared:  # a typo would otherwise be dropped silently (a --param goes to the methods having it)
        if not any(key in cls.params for cls in list_methods().values()):
            raise BenchError(f"--param '{key}' is a parameter of no method; `python -m benchmarks list` shows each "
                             "method's parameters")
    seeds = seeds if seeds is not None else protocol.seeds[:1]
    specs = [RunSpec(protocol_name, m, {k: v for k, v in shared.items() if k in method_class(m).params}, s,
                     overrides) for s in seeds for m in methods]
    return Sweep(job_name(name or f"bench-{protocol.name}"), protocol_name, specs, source="bench",
                 save_model=save_model), skipped
