"""The registry catalog (benchmarks/core/catalog.py) says what the registries say, goes stale when the
code does, and lets the reporting commands start without torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.core import catalog
from benchmarks.core.models import list_models
from benchmarks.core.registry import list_methods, resolve_params
from benchmarks.data.registry import list_datasets
from benchmarks.errors import BenchError

REPO = Path(__file__).resolve().parents[1]


def test_catalog_equals_the_registries():
    """Brute force: every method's defaults, headline parameters, labels and filled parameters against
    the registry's own classes (after a JSON round trip, as readers get it from the cache)."""
    data = json.loads(json.dumps(catalog.build()))
    assert data["models"] == list_models() and data["datasets"] == list(list_datasets())
    classes = list_methods()
    assert list(data["methods"]) == list(classes)
    for name, cls in classes.items():
        entry = data["methods"][name]
        assert entry["kind"] == cls.traits.kind and entry["needs_holdout"] == bool(cls.traits.needs_holdout)
        assert {p: s["default"] for p, s in entry["params"].items()} == {p: v.default for p, v in cls.params.items()}
        assert tuple(entry["headline_params"]) == cls.traits.headline_params
        assert catalog.filled_params(name, {}) == resolve_params(name, {})
        for pname, param in cls.params.items():
            assert entry["params"][pname]["describe"] == param.describe()
            for value, words in (param.labels or {}).items():
                assert catalog.words(name, pname, value) == words
    assert catalog.words("ccs", "ccs_beta", -1.0) == "paper beta"
    assert catalog.words("ccs", "ccs_beta", 0.3) is None


def test_filled_params_reads_as_the_registry():
    assert catalog.filled_params("el2n", {"fraction": 1}) == resolve_params("el2n", {"fraction": 1})
    assert catalog.filled_params("el2n", {"fraction": 1})["fraction"] == 1.0
    with pytest.raises(BenchError, match="no parameter 'nope'"):
        catalog.filled_params("el2n", {"nope": 1})
    with pytest.raises(BenchError, match="unknown method 'nope'"):
        catalog.filled_params("nope", {})
    assert catalog.defaults("nope") is None


def test_key_changes_when_registering_code_changes(tmp_path, monkeypatch):
    package = tmp_path / "catalog_probe_pkg"
    package.mkdir()
    module = package / "__init__.py"
    module.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(catalog, "BUILT_IN_PACKAGES", (*catalog.BUILT_IN_PACKAGES, "catalog_probe_pkg"))
    before = catalog.key()
    assert catalog.key() == before  # nothing changed: the same key
    module.write_text("X = 22\n")  # another size
    assert catalog.key() != before
    after_edit = catalog.key()
    stamp = time.time_ns() + 5 * 10**9
    os.utime(module, ns=(stamp, stamp))  # the same size, another modification time
    assert catalog.key() != after_edit
    (package / "new_method.py").write_text("Y = 2\n")  # a new module
    assert catalog.key() not in (before, after_edit)


def test_catalog_is_written_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CATALOG_DIR", str(tmp_path))
    monkeypatch.setattr(catalog, "_CATALOG", None)
    built = catalog.catalog()
    files = list(tmp_path.glob("catalog-*.json"))
    assert [f.name for f in files] == [f"catalog-{catalog.key()}.json"]
    assert json.loads(files[0].read_text()) == built
    # A reader in another process takes the file as it is: a planted marker shows it was read, not rebuilt.
    planted = dict(built, models=["planted-by-the-test"])
    files[0].write_text(json.dumps(planted))
    monkeypatch.setattr(catalog, "_CATALOG", None)
    assert catalog.catalog()["models"] == ["planted-by-the-test"]


def _imports_torch(args: list[str], env: dict) -> bool:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "benchmarks", *args], capture_output=True,
                            text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return any(re.search(r"\|\s+torch$", line) for line in result.stderr.splitlines())


def test_reporting_commands_start_without_torch(tmp_path):
    """`--help`, `list`, `status`, `tables`, `plots`, `replicate` and `publish` never import torch once the
    catalog is cached (the first `list` builds it, and may)."""
    env = dict(os.environ, BENCH_CATALOG_DIR=str(tmp_path / "catalog"))
    _imports_torch(["list"], env)  # builds the catalog
    assert list((tmp_path / "catalog").glob("catalog-*.json"))
    runs = tmp_path / "results"
    (runs / "runs").mkdir(parents=True)
    for record in sorted((REPO / "results" / "records" / "spurious-fashion").glob("*.json"))[:3]:
        (runs / "runs" / record.name).write_text(record.read_text())
    commands = [["--help"], ["list"], ["status", str(runs)], ["tables", "--runs", str(runs)],
                ["plots", "--help"], ["replicate", "--help"], ["publish", "--help"], ["tables", "--help"]]
    loaded = [" ".join(c) for c in commands if _imports_torch(c, env)]
    assert not loaded, f"these commands imported torch: {loaded}"
