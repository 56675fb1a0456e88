"""The harness's layout: every module imports on its own (no import cycles, no import-order dependence)."""

import pkgutil
import subprocess
import sys

import pytest

import baselines
import benchmarks
import methods


def _modules() -> list[str]:
    names = []
    for package in (benchmarks, methods, baselines):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def test_the_layout_is_the_documented_packages():
    packages = {info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.ispkg}
    assert packages == {"core", "data", "kit", "jobs", "reporting", "tools"}


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    # One interpreter per module would take minutes; one per module, each importing only itself,
    # is what catches a cycle that only shows when that module is imported first. A child process
    # imports them one at a time, clearing the project's modules between imports.
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {_modules()!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'methods', 'baselines')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["benchmarks.api", "benchmarks.cli"])
def test_entry_modules_import_first(name):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
