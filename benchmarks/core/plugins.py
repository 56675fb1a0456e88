"""Plugins: other installed packages add methods and datasets through entry points.

A distribution declares, in its pyproject.toml,

    [project.entry-points."data_efficiency_bench.methods"]
    my-methods = "my_package.methods"

and importing the module named (`my_package.methods`) registers what it defines (`@register`,
`register_dataset`). The registries load their group the first time they are consulted, once per
process, so every process that runs a method (the CLI, local sweep workers, Slurm tasks) sees the
same methods without any option on the command line.

A plugin that fails to import does not stop the process: a method or dataset of a broken package
that is never used should not break `list`, `tables` or a run of a built-in method. Each failure is
said once, as one line on stderr naming the distribution, the entry point and the error (no
traceback), and is repeated in the "unknown method/dataset" error of whoever asks for a name the
plugin would have registered.
"""

from __future__ import annotations

import sys
from importlib.metadata import EntryPoint, entry_points

METHODS_GROUP = "data_efficiency_bench.methods"
DATASETS_GROUP = "data_efficiency_bench.datasets"

_loaded: set[str] = set()
_failures: dict[str, list[str]] = {}


def _distribution(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def load_plugins(group: str) -> None:
    """Import every entry point of `group` (once per process); failures become one warning line each."""
    if group in _loaded:
        return
    _loaded.add(group)  # first, so that a plugin consulting the registry while it loads does not recurse
    failures = _failures.setdefault(group, [])
    seen = set()
    for entry in entry_points(group=group):
        if (entry.name, entry.value) in seen:  # one distribution found twice on sys.path
            continue
        seen.add((entry.name, entry.value))
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - any error in someone else's package is reported the same way
            detail = " ".join(str(exc).split()) or "no message"
            line = (f"plugin '{entry.name} = {entry.value}' of {_distribution(entry)} ({group}) failed to load: "
                    f"{type(exc).__name__}: {detail}")
            failures.append(line)
            print(f"warning: {line}; what it registers is unavailable", file=sys.stderr)


def plugin_failures(group: str) -> list[str]:
    """The one-line reports of the plugins of `group` that failed to load in this process."""
    return list(_failures.get(group, []))


def failures_note(group: str) -> str:
    """A clause for an 'unknown name' error: which plugins did not load (empty when all did)."""
    failed = plugin_failures(group)
    return f"; {'; '.join(failed)}" if failed else ""
