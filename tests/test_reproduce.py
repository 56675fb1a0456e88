"""`reproduce`: a record re-run from its identity on the same machine is bit-identical and the report says so; a
published number that differs is shown with its difference; a record whose identity no longer resolves to its
run id is refused with the reason; a set is sampled the same way for the same seed."""

from __future__ import annotations

import copy
import json
import random

import pytest

from benchmarks.cli import main
from benchmarks.core.record import write_record
from benchmarks.errors import BenchError
from benchmarks.tools.reproduce import (
    changed_since,
    choose,
    compare,
    curve_difference,
    find_records,
    spec_of,
    verdict,
)


@pytest.fixture(scope="module")
def smoke_record(tmp_path_factory):
    """One smoke run (a "published" record), made once for the module."""
    from benchmarks.core.run import RunSpec, execute
    from conftest import quiet

    out = tmp_path_factory.mktemp("published")
    record = execute(RunSpec("smoke", "full", {}, 0, {"epochs": 2}), out, log=quiet, progress=False)
    return dict(record, _path=str(out / "runs" / f"{record['run_id']}.json"))


def test_a_rerun_on_this_machine_is_identical(smoke_record, tmp_path, capsys):
    code = main(["reproduce", smoke_record["_path"], "--out", str(tmp_path / "scratch")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict: identical" in out
    assert "| test_acc | " in out and "| code | " in out and "| host | " in out
    rerun = json.loads((tmp_path / "scratch" / "runs" / f"{smoke_record['run_id']}.json").read_text())
    assert rerun["metrics"] == smoke_record["metrics"]  # the claim, checked apart from the report
    assert rerun["code"] == smoke_record["code"] and rerun["code"]["sources_sha256"]
    assert (tmp_path / "scratch" / "reproduce.md").read_text().count("verdict: identical") == 1
    # The scratch folder now holds the run: a second reproduce into it is refused, not a silent skip.
    assert main(["reproduce", smoke_record["_path"], "--out", str(tmp_path / "scratch")]) == 2
    assert "exists" in capsys.readouterr().err


def test_a_published_number_that_differs_is_shown_with_its_difference(smoke_record, tmp_path, capsys):
    published = copy.deepcopy(smoke_record)
    published["metrics"]["test_acc"] += 0.0125  # as if the published run had scored 1.25 pp more
    published["env"]["host"] = "elsewhere"
    published.pop("code")  # an older record: no fingerprint
    path = tmp_path / "records" / "set" / f"{published['run_id']}.json"
    write_record(path, {k: v for k, v in published.items() if k != "_path"})

    # Found by its run id under --records; without --tolerance anything but identical is exit status 1.
    assert main(["reproduce", published["run_id"], "--records", str(tmp_path / "records"),
                 "--out", str(tmp_path / "a")]) == 1
    out = capsys.readouterr().out
    assert "verdict: reproduced within 1.25 pp (largest difference: test_acc)" in out
    assert "| test_acc | " in out and "| -0.0125" in out
    assert "| host | elsewhere | " in out and "differs" in out
    assert "no code fingerprint (older record)" in out
    assert main(["reproduce", str(path), "--out", str(tmp_path / "b"), "--tolerance", "0.02"]) == 0
    assert "within --tolerance 2 pp" in capsys.readouterr().out


def test_compare_reads_every_metric_and_the_curve():
    old = {"run_id": "r", "metrics": {"test_acc": 0.5, "test_group_acc": [0.25, 0.75], "selected_epoch": 3},
           "compute": {"total_flops": 10}, "curve": [{"epoch": 1, "seconds": 1.0, "test_acc": 0.4},
                                                      {"epoch": 2, "seconds": 2.0, "test_acc": 0.5}]}
    new = copy.deepcopy(old)
    new["curve"][0]["seconds"] = 9.0  # timings never count
    assert compare(old, new).identical
    new["metrics"]["test_group_acc"][1] = 0.5
    new["curve"][1]["test_acc"] = 0.45
    c = compare(old, new)
    assert not c.identical
    assert ("test_group_acc[1]", 0.75, 0.5, -0.25) in c.rows
    assert c.largest == ("test_group_acc[1]", 0.25)
    assert curve_difference(old["curve"], new["curve"]) == "first differs at epoch 2 (test_acc)"
    assert c.compute_equal
    new["compute"]["total_flops"] = 11
    assert not compare(old, new).compute_equal


def test_metrics_only_the_rerun_records_are_listed_not_compared():
    """A record made before the code kept per-class accuracy re-runs into one that keeps it: the metrics
    both have decide the verdict; the new ones are listed apart. A metric the re-run lost is not comparable."""
    old = {"run_id": "r", "metrics": {"test_acc": 0.5}, "compute": {"total_flops": 10},
           "curve": [{"epoch": 1, "seconds": 1.0, "test_acc": 0.5}]}
    new = copy.deepcopy(old)
    new["metrics"]["test_class_acc"] = [0.4, 0.6]
    new["curve"][0]["test_class_acc"] = [0.4, 0.6]
    c = compare(old, new)
    assert c.identical and c.added == ["test_class_acc[0]", "test_class_acc[1]"]
    assert [row[0] for row in c.rows] == ["test_acc"] and curve_difference(old["curve"], new["curve"]) == ""
    assert verdict(c).startswith("identical")
    assert verdict(compare(new, old)).startswith("NOT comparable")


def test_a_changed_protocol_is_refused_with_what_changed(smoke_record):
    older = copy.deepcopy(smoke_record)
    older["resolved_protocol"]["lr"] = 0.5  # the protocol file said another learning rate then
    older["protocol_fingerprint"] = "0" * 16
    older["run_id"] = "1" * 16
    with pytest.raises(BenchError, match=r"resolves its identity to run [0-9a-f]{16}: protocol 'smoke' changed since "
                                         r"\(lr: 0\.5 -> "):
        spec_of(older)
    gone = dict(copy.deepcopy(smoke_record), method="uniform", params={"fraction": 0.5, "no_such": 1})
    with pytest.raises(BenchError, match="cannot be re-run with this code: method 'uniform' has no parameter 'no_such'"):
        spec_of(gone)


def test_changed_parameters_are_named():
    from benchmarks.core.spec import RunSpec

    resolved = RunSpec("smoke", "uniform", {"fraction": 0.5}, 0, {}).resolve()
    record = {"protocol": "smoke", "method": "uniform", "protocol_fingerprint": resolved.fingerprint,
              "resolved_protocol": resolved.protocol.as_dict(), "params": {"fraction": 0.5}}
    assert changed_since(record, resolved).startswith("method 'uniform' parameters changed since (")


def test_a_set_is_sampled_the_same_way_for_the_same_seed(tmp_path):
    records = [{"run_id": f"{i:016x}", "status": "complete", "method": "full" if i % 2 else "uniform",
                "overrides": {"epochs": 2} if i < 6 else {}} for i in range(10)]
    records.append({"run_id": "f" * 16, "status": "failed", "method": "full", "overrides": {}})
    complete = sorted((r for r in records if r["status"] == "complete"), key=lambda r: r["run_id"])
    assert choose(records) == complete
    expected = sorted(random.Random(7).sample(complete, 3), key=lambda r: r["run_id"])
    assert choose(records, sample=3, seed=7) == expected == choose(list(reversed(records)), sample=3, seed=7)
    assert [r["run_id"] for r in choose(records, method="full", overrides={"epochs": 2})] == [
        f"{i:016x}" for i in (1, 3, 5)]
    with pytest.raises(BenchError, match="no complete record matches"):
        choose(records, method="nope")

    for r in records:
        write_record(tmp_path / "set" / f"{r['run_id']}.json",
                     dict(r, schema=2, protocol="smoke", params={}, seed=0))
    assert len(find_records("set", tmp_path)) == 11  # a set's name under --records
    assert find_records(f"{1:016x}", tmp_path)[0]["method"] == "full"  # a run id
    with pytest.raises(BenchError, match="no record of run"):
        find_records("e" * 16, tmp_path)
    with pytest.raises(BenchError, match="not a record file, a folder, a run id"):
        find_records("nothing-like-this", tmp_path)
