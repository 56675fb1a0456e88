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


def test_methods_import_only_the_contract_and_the_kit():
    """A method module imports benchmarks.api, benchmarks.kit.* and benchmarks.errors, never the harness's
    internals nor another method's module (DESIGN.md: the contract is the whole surface)."""
    import ast
    from pathlib import Path

    allowed = ("benchmarks.api", "benchmarks.kit", "benchmarks.errors")
    root = Path(methods.__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("methods/*.py"), *root.glob("baselines/*.py")]):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.split(".")[0] in ("benchmarks", "methods", "baselines") and not name.startswith(allowed):
                    offenders.append(f"{path.relative_to(root)}: {name}")
    assert not offenders, offenders
