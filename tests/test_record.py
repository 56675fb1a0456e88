import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.core.record import RecordError, load_record, load_records, write_record
from benchmarks.core.spec import run_id

FP = "0123456789abcdef"  # a protocol fingerprint (benchmarks.core.protocol.fingerprint)


def test_run_id_is_stable_and_sensitive():
    a = run_id("smoke", "uniform", {"fraction": 0.5, "class_balanced": False}, 0, {}, FP)
    b = run_id("smoke", "uniform", {"class_balanced": False, "fraction": 0.5}, 0, {}, FP)
    assert a == b  # key order does not matter
    assert a == "6e2145ea80aa9cb8"  # pinned: a change of the hashing would orphan every stored record
    assert run_id("smoke", "uniform", {"fraction": 0.5, "class_balanced": False}, 1, {}, FP) != a
    assert run_id("smoke", "uniform", {"fraction": 0.4, "class_balanced": False}, 0, {}, FP) != a
    assert run_id("smoke", "uniform", {"fraction": 0.5, "class_balanced": False}, 0, {"epochs": 2}, FP) != a
    assert run_id("smoke", "uniform", {"fraction": 0.5, "class_balanced": False}, 0, {}, "f" * 16) != a
    assert run_id("smoke", "full", {}, 0, {}, FP) != run_id("fashion-mnist", "full", {}, 0, {}, FP)


def test_run_id_is_pinned_across_processes():
    code = f"from benchmarks.core.spec import run_id; print(run_id('smoke', 'full', {{}}, 3, {{'epochs': 2}}, '{FP}'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == run_id("smoke", "full", {}, 3, {"epochs": 2}, FP)


def test_write_then_load_round_trip(tmp_path):
    record = {"schema": 1, "run_id": "x", "status": "complete", "protocol": "p", "method": "m",
              "params": {}, "seed": 0, "overrides": {}, "metrics": {"test_acc": 0.5}}
    path = tmp_path / "runs" / "x.json"
    write_record(path, record)
    assert load_record(path)["metrics"] == {"test_acc": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary left behind


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    old = {"schema": 1, "run_id": "x", "status": "complete", "protocol": "p", "method": "m",
           "params": {}, "seed": 0, "overrides": {}}
    write_record(path, old)

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_record(path, dict(old, status="failed"))
    assert load_record(path)["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


WRITER = """
import sys
from benchmarks.core.record import write_record
path = sys.argv[1]
i = 0
while True:
    i += 1
    write_record(path, {"schema": 1, "run_id": "x", "status": "complete", "protocol": "p", "method": "m",
                        "params": {}, "seed": i, "overrides": {}, "curve": [{"epoch": j} for j in range(20000)]})
"""


def test_sigkill_mid_write_never_leaves_half_a_file(tmp_path):
    """A writer killed at arbitrary moments leaves either no file or a complete, loadable one."""
    path = tmp_path / "r.json"
    for delay in (0.05, 0.13, 0.21, 0.34):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            record = load_record(path)
            assert len(record["curve"]) == 20000


def test_corrupt_records_are_reported_not_fatal(tmp_path):
    good = {"schema": 1, "run_id": "g", "status": "complete", "protocol": "p", "method": "m",
            "params": {}, "seed": 0, "overrides": {}}
    write_record(tmp_path / "g.json", good)
    (tmp_path / "t.json").write_text(json.dumps(good)[:30])
    (tmp_path / "k.json").write_text(json.dumps({"status": "complete"}))
    records, problems = load_records(tmp_path)
    assert [r["run_id"] for r in records] == ["g"]
    assert len(problems) == 2 and any("t.json" in p for p in problems) and any("k.json" in p for p in problems)
    with pytest.raises(RecordError, match="t.json"):
        load_record(tmp_path / "t.json")
