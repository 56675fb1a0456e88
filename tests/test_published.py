"""Published tables regenerate: the committed records rebuild the committed tables byte for byte, and
no job (bench, sweep) writes into them.

A change to the report's format, the plots, or the paper files (benchmarks/resources/paper/) changes the generated files: then run
`nox -s tables` (the repository's tables) and, for the fixture,
`python -m benchmarks tables --published --records tests/fixtures/published/records
 --out tests/fixtures/published/tables --papers tests/fixtures/published/paper`, and commit the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cli import main
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import SCHEMA, write_record
from benchmarks.jobs.publish import GENERATED, rebuild
from conftest import quiet
from slurm_support import REPO

FIXTURE = REPO / "tests" / "fixtures" / "published"


def generated(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for pattern in GENERATED for p in sorted(folder.glob(pattern))} | (
        {"replication.md": (folder / "replication.md").read_bytes()} if (folder / "replication.md").exists() else {})


@pytest.mark.parametrize("records, tables, papers", [
    (FIXTURE / "records", FIXTURE / "tables", FIXTURE / "paper"),
    (REPO / "results" / "records", REPO / "results" / "tables", None),  # None: the paper files the package ships
], ids=["fixture", "repository"])
def test_published_tables_rebuild_byte_for_byte(records, tables, papers, tmp_path):
    rebuild(records, tmp_path, papers, log=quiet)
    committed, rebuilt = generated(tables), generated(tmp_path)
    assert sorted(rebuilt) == sorted(committed), "run `nox -s tables` and commit results/tables (module docstring)"
    for name, data in committed.items():
        assert rebuilt[name] == data, f"{name} differs from what its records give; run `nox -s tables`"


def test_the_fixture_has_tables_to_compare():
    assert {"smoke.md", "smoke.tex", "replication.md"} <= set(generated(FIXTURE / "tables"))
    assert len(list((FIXTURE / "records").rglob("*.json"))) == 10


def test_rebuild_removes_tables_no_record_makes_and_refuses_a_bad_record(tmp_path):
    (tmp_path / "tables" / "plots").mkdir(parents=True)
    (tmp_path / "tables" / "gone.md").write_text("a protocol no longer published")
    (tmp_path / "tables" / "plots" / "gone-curves.png").write_bytes(b"x")
    (tmp_path / "records" / "s").mkdir(parents=True)
    assert rebuild(tmp_path / "records", tmp_path / "tables", FIXTURE / "paper", log=quiet) == 0
    assert generated(tmp_path / "tables") == {}
    (tmp_path / "records" / "s" / "bad.json").write_text('{"schema": 2, "run_')
    with pytest.raises(Exception, match="published record unreadable"):
        rebuild(tmp_path / "records", tmp_path / "tables", FIXTURE / "paper", log=quiet)


def record(rid: str, method: str, status: str = "complete") -> dict:
    return {"schema": SCHEMA, "run_id": rid, "status": status, "protocol": "toy", "method": method, "params": {},
            "seed": 0, "overrides": {}, "metrics": {"test_acc": 0.5} if status == "complete" else {},
            "compute": {"fraction": 1.0, "saved": 0.0, "selection_share": 0.0, "full_flops": 10}, "curve": []}


def job(out: Path, name: str, runs: list[dict]) -> None:
    lines = []
    for r in runs:
        write_record(ResultsLayout(out).record(r["run_id"]), r)
        lines.append({"run_id": r["run_id"], "protocol": "toy", "method": r["method"], "params": {}, "seed": 0,
                      "overrides": {}, "group": name, "out": str(out)})
    manifest = out / "sweeps" / name / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_publish_copies_complete_records_once_across_sets(tmp_path, capsys):
    out, to = tmp_path / "results", tmp_path / "published"
    job(out, "grid", [record("a", "full"), record("b", "uniform")])
    job(out, "bench-toy", [record("a", "full"), record("c", "el2n", status="failed")])
    assert main(["publish", "grid", "--out", str(out), "--to", str(to)]) == 0
    assert sorted(p.name for p in (to / "grid").iterdir()) == ["a.json", "b.json"]
    assert (to / "grid" / "a.json").read_bytes() == ResultsLayout(out).record("a").read_bytes()  # unchanged copies
    assert main(["publish", "bench-toy", "--out", str(out), "--to", str(to)]) == 2  # a failed run: refused
    assert "1 of 2 runs of 'bench-toy' are not complete" in capsys.readouterr().err
    assert not (to / "bench-toy").exists()
    assert main(["publish", "bench-toy", "--out", str(out), "--to", str(to), "--partial"]) == 0
    assert "1 already published in another set" in capsys.readouterr().out
    assert not (to / "bench-toy").exists()  # its one complete run is grid's: no table counts it twice


def test_bench_writes_its_table_beside_its_records_and_never_into_the_published_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    published = tmp_path / "results" / "tables"
    published.mkdir(parents=True)
    (published / "smoke.md").write_text("the published table\n")
    assert main(["bench", "--protocol", "smoke", "--methods", "full,uniform", "--set", "epochs=1", "--wandb", "off"]) == 0
    assert (published / "smoke.md").read_text() == "the published table\n" and len(list(published.iterdir())) == 1
    table = tmp_path / "results" / "sweeps" / "bench-smoke" / "tables" / "smoke.md"
    assert "| uniform |" in table.read_text() and "| full |" in table.read_text()
    assert main(["status", "bench-smoke"]) == 0 and "total: 2 complete" in capsys.readouterr().out
