"""W&B: offline runs hold the curve and the summary; failures never cost the run or its record;
tables rebuilt from (a fake of) W&B's API equal the tables from the local records."""

import json
import struct
import subprocess
import sys
import time

import pytest

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import load_record
from benchmarks.core.run import RunSpec, execute
from benchmarks.jobs import wandb_logger
from benchmarks.jobs.wandb_logger import WandbLogger, records_from_wandb, resolve_mode
from benchmarks.reporting.tables import build_sections, markdown_tables
from conftest import quiet


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(wandb_logger, "_offline_notice_shown", False)


def read_wandb_file(path):
    """The records of a .wandb transaction log (LevelDB log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item):
    return item.key or "/".join(item.nested_key)


def offline_run(out, run_id, wait=60.0):
    """(run record, history rows, summary) of the offline W&B runs with this id, in order.

    wandb's service writes the file asynchronously: wait until each holds its exit record."""
    deadline = time.monotonic() + wait
    while True:
        files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
        parsed = [read_wandb_file(path) for path in files]
        if files and all(any(r.WhichOneof("record_type") == "exit" for r in records) for records in parsed):
            break
        assert time.monotonic() < deadline, f"no finished offline W&B run for {run_id} under {out / 'wandb'}"
        time.sleep(0.2)
    runs = []
    for records in parsed:
        run, history, summary = None, [], {}
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
            elif kind == "summary":
                summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        runs.append((run, history, summary))
    return runs


def test_mode_resolution(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wandb_logger, "has_credentials", lambda: False)
    assert resolve_mode("auto")[0] == "offline" and "API key" in resolve_mode("auto")[1]
    assert resolve_mode("online")[0] == "offline"
    assert resolve_mode("offline") == ("offline", None)
    assert resolve_mode("off") == ("disabled", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == ("disabled", None)
    monkeypatch.setattr(wandb_logger, "has_credentials", lambda: True)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("auto") == ("online", None)
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto") == ("online", None)


def test_has_credentials_follows_the_api_key_and_netrc(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_logger.has_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_logger.has_credentials()
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert wandb_logger.has_credentials()


def test_offline_run_holds_config_curve_and_summary(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(wandb_logger, "has_credentials", lambda: False)
    monkeypatch.delenv("WANDB_MODE")  # auto + no key -> offline, said once
    messages = []
    spec = RunSpec("smoke", "uniform", {"fraction": 0.5}, 0, {"epochs": 2})
    record = execute(spec, tmp_path, log=messages.append, progress=False, group="my-sweep",
                     loggers=[WandbLogger(tmp_path, log=messages.append)])
    assert record["status"] == "complete"
    assert sum("logging offline" in m for m in messages) == 1
    ((run, history, summary),) = offline_run(tmp_path, record["run_id"])
    assert run.run_id == record["run_id"] and run.run_group == "my-sweep" and run.job_type == "uniform"
    assert list(run.tags) == ["smoke"] and run.display_name == "uniform class_balanced=False, fraction=0.5 seed 0"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["protocol"]["epochs"] == 2 and config["params"] == record["params"]
    assert config["overrides"] == {"epochs": 2} and config["seed"] == 0 and config["schema"] == record["schema"]
    assert [row["epoch"] for row in history] == [1, 2]
    full = record["compute"]["full_flops"]
    for row, entry in zip(history, record["curve"]):
        assert row["test_acc"] == entry["test_acc"] and row["flops"] == entry["flops"]
        assert row["fraction"] == pytest.approx(entry["flops"] / full)
    assert summary["final/test_acc"] == record["metrics"]["test_acc"]
    assert summary["compute/fraction"] == record["compute"]["fraction"] and summary["status"] == "complete"
    # a second run in the same process does not repeat the offline notice
    execute(RunSpec("smoke", "full", {}, 0, {"epochs": 1}), tmp_path, log=messages.append, progress=False,
            loggers=[WandbLogger(tmp_path, log=messages.append)])
    assert sum("logging offline" in m for m in messages) == 1


def test_resumed_run_continues_the_same_wandb_run(tmp_path, offline, monkeypatch):
    from benchmarks.core import train

    spec = RunSpec("smoke", "full", {}, 3, {"epochs": 2})
    original = train.Trainer.run_epoch

    def killed_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(train.Trainer, "run_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, tmp_path, log=quiet, progress=False, loggers=[WandbLogger(tmp_path, log=quiet)])
    monkeypatch.setattr(train.Trainer, "run_epoch", original)
    time.sleep(1.1)  # wandb names offline folders by the second; a real restart comes later than this
    record = execute(spec, tmp_path, log=quiet, progress=False, loggers=[WandbLogger(tmp_path, log=quiet)])
    first, second = offline_run(tmp_path, record["run_id"])
    assert first[0].run_id == second[0].run_id == record["run_id"] and second[0].resume
    assert [row["epoch"] for row in first[1]] == [1] and [row["epoch"] for row in second[1]] == [2]


def test_wandb_failing_on_init_leaves_training_and_the_record_intact(tmp_path, offline, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("W&B server error 500")

    monkeypatch.setattr(wandb, "init", broken_init)
    messages = []
    record = execute(RunSpec("smoke", "full", {}, 0, {"epochs": 1}), tmp_path, log=messages.append,
                     progress=False, loggers=[WandbLogger(tmp_path, log=messages.append)])
    assert record["status"] == "complete" and load_record(ResultsLayout(tmp_path).record(record["run_id"]))["metrics"]
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "WandbLogger.start failed" in warnings[0] and "server error 500" in warnings[0]


def test_unreachable_wandb_online_falls_back_to_offline_once(tmp_path, offline, monkeypatch):
    import wandb

    real_init, modes = wandb.init, []

    def no_network_online(*args, **kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise TimeoutError("Run initialization has timed out after 30.0 sec.")
        return real_init(*args, **kwargs)

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(wandb_logger, "has_credentials", lambda: True)
    monkeypatch.setattr(wandb_logger, "_online_failed", False)
    monkeypatch.setattr(wandb, "init", no_network_online)
    messages = []
    for seed in (0, 1):
        record = execute(RunSpec("smoke", "full", {}, seed, {"epochs": 1}), tmp_path, log=messages.append,
                         progress=False, loggers=[WandbLogger(tmp_path, log=messages.append)])
        assert record["status"] == "complete"
        ((_, history, summary),) = offline_run(tmp_path, record["run_id"])
        assert [row["epoch"] for row in history] == [1] and summary["final/test_acc"] == record["metrics"]["test_acc"]
    assert modes == ["online", "offline", "offline"]  # the second run does not wait for the network again
    assert sum("online start failed" in m for m in messages) == 1


def test_wandb_off_never_imports_wandb(tmp_path):
    code = ("import sys; from benchmarks.cli import main; "
            f"rc = main(['run', '--protocol', 'smoke', '--method', 'full', '--set', 'epochs=1', '--out', {str(tmp_path)!r}, "
            "'--wandb', 'off']); assert rc == 0; assert 'wandb' not in sys.modules, 'wandb was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1 and not (tmp_path / "wandb").exists()


class FakeRun:
    """What wandb.apis.public.Run offers that we use: id, config, summary_metrics, state, scan_history."""

    def __init__(self, record):
        self.id, self.state, self.group = record["run_id"], "finished", None
        self.config = {"_wandb": {}, "protocol": record["resolved_protocol"], "method": record["method"],
                       "params": record["params"], "overrides": record["overrides"], "seed": record["seed"],
                       "run_id": record["run_id"], "budget": record["budget"], "schema": record["schema"]}
        self.summary_metrics = {"status": "complete", "wall_clock_s": record["wall_clock_s"],
                                **{f"final/{k}": v for k, v in record["metrics"].items()},
                                **{f"compute/{k}": v for k, v in record["compute"].items()},
                                **{f"method_stats/{k}": v for k, v in record["method_stats"].items()}}
        self.history = [dict(row, _step=i) for i, row in enumerate(record["curve"])]

    def scan_history(self, keys=None):
        return [row for row in self.history if all(k in row for k in keys or [])]


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.asked = []

    def runs(self, path):
        self.asked.append(path)
        return self._runs


def test_tables_from_a_fake_wandb_api_equal_the_local_tables(tmp_path):
    from test_report import write  # the same hand-made records as the table tests

    from benchmarks.core.record import load_records

    write(tmp_path, "f0", "full", {}, 0, 0.90, 1.0, 10, [(1, 500, 0.80), (2, 1000, 0.90)])
    write(tmp_path, "f1", "full", {}, 1, 0.92, 1.0, 12, [(1, 500, 0.905), (2, 1000, 0.92)])
    write(tmp_path, "u0", "uniform", {"fraction": 0.5}, 0, 0.85, 0.5, 5, [(1, 250, 0.80), (2, 500, 0.91)])
    write(tmp_path, "s0", "toyscore", {}, 0, 0.7, 0.4, 3, [(1, 400, 0.7)], stats={"scores_cached": True})
    local, problems = load_records(tmp_path / "runs")
    assert problems == []
    not_ours = type("Run", (), {"id": "zz", "config": {"lr": 0.1}, "summary_metrics": {}, "state": "finished"})()
    api = FakeApi([FakeRun(r) for r in local] + [not_ours])
    records, problems = records_from_wandb("me/bench", api=api)
    assert api.asked == ["me/bench"]
    assert len(records) == 4 and len(problems) == 1 and "wandb:me/bench/zz" in problems[0]
    expected = markdown_tables(build_sections(local))
    assert markdown_tables(build_sections(records)) == expected
    assert "| 0.750 | 2/2 |" in expected["toy"] and "cached scores" in expected["toy"]
