"""Paper numbers against our runs: matching, differences, "not run", and readable TOML errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_report import UNIFORM, write

from benchmarks.core.record import load_records
from benchmarks.errors import BenchError
from benchmarks.reporting.replicate import load_papers, markdown_table, parse_setting, replicate

ROOT = Path(__file__).resolve().parents[1]

PAPER = '''
[[entry]]
paper = "P"
protocol = "toy"
method = "uniform"
setting = "fraction=0.5 (the default)"
metric = "test_acc"
value = 0.87
source = "Table 1"
tolerance = 0.02

[[entry]]
paper = "P"
protocol = "toy"
method = "uniform"
setting = "fraction=0.5"
metric = "delta_vs_full"
value = -0.02
source = "Fig. 2 (approx.)"
tolerance = 0.005

[[entry]]
paper = "P"
protocol = "toy"
method = "uniform"
setting = "fraction=0.5"
metric = "saved"
value = 0.5
source = "text"
tolerance = 0.0

[[entry]]
paper = "P"
protocol = "toy"
method = "uniform"
setting = "fraction=0.3"
metric = "test_acc"
value = 0.8
source = "Table 1"
tolerance = 0.02

[[entry]]
paper = "P"
protocol = "toy"
method = "full"
setting = "-"
overrides = { epochs = 1 }
metric = "test_acc"
value = 0.5
source = "Table 2"
tolerance = 0.01

[[entry]]
paper = "P"
protocol = "toy"
method = "full"
setting = "-"
metric = "worst_group_acc"
value = 0.5
source = "Table 2"
tolerance = 0.01

[[entry]]
paper = "Q"
protocol = "toy"
method = "uniform"
setting = "fraction=0.5"
metric = "test_acc"
value = 0.9
bound = "upper"
source = "Fig. 3 (approx.): below 90%"
tolerance = 0.0

[[entry]]
paper = "Q"
protocol = "toy"
method = "full"
setting = "-"
metric = "unforgettable_share"
value = 0.3
source = "text"
tolerance = 0.02
'''


@pytest.fixture
def runs(tmp_path):
    write(tmp_path, "f0", "full", {}, 0, 0.90, 1.0, 10, [(1, 1000, 0.90)], stats={"unforgettable_share": 0.3})
    write(tmp_path, "f1", "full", {}, 1, 0.92, 1.0, 12, [(1, 1000, 0.92)], stats={"unforgettable_share": 0.34})
    for seed, acc in enumerate((0.85, 0.88, 0.91)):
        write(tmp_path, f"u{seed}", "uniform", UNIFORM, seed, acc, 0.5, 5, [(1, 500, acc)])
    write(tmp_path, "u9", "uniform", UNIFORM, 9, 0.20, 0.5, 5, [(1, 500, 0.2)], overrides={"epochs": 1})
    write(tmp_path, "o0", "full", {}, 0, 0.505, 1.0, 1, [(1, 1000, 0.505)], overrides={"epochs": 1})
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "p.toml").write_text(PAPER)
    return tmp_path


def test_replicate_matches_runs_and_computes_differences(runs):
    records, _ = load_records(runs / "runs")
    rows = replicate(load_papers(runs / "papers"), records)
    acc, delta, saved, not_run, override, no_metric, upper, stat = rows
    # setting "fraction=0.5" matches runs made with the method's defaults filled in (class_balanced=False)
    assert acc["n_runs"] == 3 and acc["mean"] == pytest.approx(0.88) and acc["std"] == pytest.approx(0.03)
    assert acc["difference"] == pytest.approx(0.01) and acc["verdict"] == "yes"
    assert delta["mean"] == pytest.approx(0.88 - 0.91) and delta["difference"] == pytest.approx(-0.01)
    assert delta["verdict"] == "no"
    assert saved["mean"] == 0.5 and saved["verdict"] == "yes"
    assert not_run["n_runs"] == 0 and not_run["verdict"] == "not run"
    assert override["n_runs"] == 1 and override["mean"] == pytest.approx(0.505) and override["verdict"] == "yes"
    assert no_metric["n_runs"] == 2 and no_metric["verdict"] == "'worst_group_acc' not recorded"
    assert upper["mean"] == pytest.approx(0.88) and upper["verdict"] == "yes"  # below 90%, though 2 pp off
    assert stat["mean"] == pytest.approx(0.32) and stat["verdict"] == "yes"  # from method_stats
    table = markdown_table(rows)
    assert "| test_acc | < 0.9 |" in table
    assert "| P | toy | uniform | fraction=0.5 (the default) | test_acc | 0.87 | Table 1 | 0.8800 ± 0.0300 (n=3) | +0.0100 | 0.02 | yes |" in table
    assert "| P | toy | uniform | fraction=0.3 | test_acc | 0.8 | Table 1 |  |  | 0.02 | not run |" in table
    assert "| Fig. 2 (approx.) |" in table


def test_setting_parsing():
    assert parse_setting("-") == ({}, {})
    assert parse_setting("prune_ratio=0.5 (assumed: the default), --set model=resnet50-cifar") == (
        {"prune_ratio": 0.5}, {"model": "resnet50-cifar"})
    assert parse_setting("a=1, b=true") == ({"a": 1, "b": True}, {})


@pytest.mark.parametrize("entry, message", [
    ('paper = "P"\nprotocol = "toy"\nmethod = "full"\nsetting = "-"\nmetric = "test_acc"\nvalue = 0.9\nsource = "T1"',
     "p.toml, entry 2 (toy / full / -): missing key 'tolerance'"),
    ('paper = "P"\nprotocol = "toy"\nmethod = "full"\nsetting = "-"\nmetric = "test_acc"\nvalue = "high"\n'
     'source = "T1"\ntolerance = 0.01', "entry 2 (toy / full / -): 'value' must be a number"),
    ('paper = "P"\nprotocol = "toy"\nmethod = "full"\nsetting = "-"\nmetric = "test_acc"\nvalue = 0.9\n'
     'source = "T1"\ntolerance = 0.01\ntolerence = 0.1', "unknown key 'tolerence'"),
])
def test_bad_paper_entries_are_one_readable_error(tmp_path, entry, message):
    good = PAPER.split("[[entry]]")[1]
    (tmp_path / "p.toml").write_text(f"[[entry]]{good}\n[[entry]]\n{entry}\n")
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_papers(tmp_path)


def test_the_repository_paper_files_are_valid():
    entries = load_papers(ROOT / "results" / "paper")
    assert {e.paper.split(" (")[0] for e in entries} >= {"InfoBatch", "JTT"}
    jtt = [e for e in entries if e.paper.startswith("JTT")]
    assert {(e.protocol, e.method, e.metric, e.value) for e in jtt} == {
        ("waterbirds", "full", "test_adjusted_avg_acc", 0.973), ("waterbirds", "full", "worst_group_acc", 0.726),
        ("waterbirds", "jtt", "test_adjusted_avg_acc", 0.933), ("waterbirds", "jtt", "worst_group_acc", 0.867),
        ("waterbirds", "group-dro", "test_adjusted_avg_acc", 0.935),
        ("waterbirds", "group-dro", "worst_group_acc", 0.914),
        ("celeba", "full", "worst_group_acc", 0.472), ("celeba", "jtt", "worst_group_acc", 0.811),
        ("celeba", "group-dro", "worst_group_acc", 0.889)}


def test_cli_replicate_prints_and_writes(runs):
    out = runs / "replication.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "replicate", "--runs", str(runs), "--papers",
                             str(runs / "papers"), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| not run |" in result.stdout and out.read_text() in result.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "replicate", "--runs", str(runs), "--papers",
                          str(runs / "nowhere")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no paper files" in bad.stderr and "Traceback" not in bad.stderr
