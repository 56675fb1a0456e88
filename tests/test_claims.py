"""Claims checked from records: holds, fails and not run on hand-made records, the significance rule
by hand, readable errors for bad claim files, and the repository's claims against the registry."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import UNIFORM, write

from benchmarks.core.record import load_records
from benchmarks.core.registry import resolve_params
from benchmarks.errors import BenchError
from benchmarks.reporting.claims import evaluate_claims, load_claims, markdown_claims, verdict
from benchmarks.reporting.replicate import load_papers, parse_setting

ROOT = Path(__file__).resolve().parents[1]


def claim(name, relation, threshold, left, right, *, scale="cpu", protocol="toy", overrides=""):
    return f'''
[[claim]]
name = "{name}"
paper = "P"
statement = "{name}"
source = "Fig. 1"
metric = "test_acc"
relation = "{relation}"
threshold = {threshold}
  [[claim.form]]
  scale = "{scale}"
  protocol = "{protocol}"
  {overrides}
  left = {left}
  right = {right}
'''


FULL = '{ method = "full", setting = "-" }'
HALF = '{ method = "uniform", setting = "fraction=0.5" }'  # the default class_balanced=false filled in
TOY = '{ method = "toyscore", setting = "fraction=0.3" }'  # not in the registry: matched as written
CLAIMS = "".join([
    claim("beats", ">", 0.0, HALF, TOY),                       # holds
    claim("beaten", ">", 0.0, TOY, HALF),                      # fails
    claim("at-least", ">=", 0.0, TOY, HALF),                   # fails: significantly below
    claim("noisy-at-least", ">=", 0.0, '{ method = "noisy", setting = "-" }', FULL),  # holds: not refuted
    claim("noisy-beats", ">", -0.1, '{ method = "noisy", setting = "-" }', FULL),     # fails: -0.21 < -0.1
    claim("close", "within", 0.03, HALF, FULL),                # fails: interval too wide
    claim("close-enough", "within", 0.2, HALF, FULL),          # holds
    claim("not-better", "<=", 0.0, TOY, HALF),                 # holds
    claim("one-seed", ">", 0.0, '{ method = "single", setting = "-" }', FULL),       # undecided: 1 run
    claim("absent", ">", 0.0, '{ method = "uniform", setting = "fraction=0.9" }', FULL),  # not run: none
    claim("overridden", ">", 0.0, FULL, HALF, overrides="overrides = { epochs = 1 }"),  # not run: no such runs
    claim("paper-only", ">", 0.0, HALF, TOY, scale="paper"),   # not run at cpu scale
])


@pytest.fixture
def results(tmp_path):
    # full: 0.90, 0.92 (mean 0.91, sd 0.01414); uniform 0.5: 0.85, 0.88, 0.91 (mean 0.88, sd 0.03);
    # toyscore: 0.70, 0.72 (mean 0.71, sd 0.01414); noisy: 0.80, 1.00 (mean 0.90, sd 0.1414); single: 1 run.
    for seed, acc in enumerate((0.90, 0.92)):
        write(tmp_path, f"f{seed}", "full", {}, seed, acc, 1.0, 1, [])
    for seed, acc in enumerate((0.85, 0.88, 0.91)):
        write(tmp_path, f"u{seed}", "uniform", UNIFORM, seed, acc, 0.5, 1, [])
    for seed, acc in enumerate((0.70, 0.72)):
        write(tmp_path, f"t{seed}", "toyscore", {"fraction": 0.3}, seed, acc, 0.3, 1, [])
    for seed, acc in enumerate((0.80, 1.00)):
        write(tmp_path, f"n{seed}", "noisy", {}, seed, acc, 1.0, 1, [])
    write(tmp_path, "s0", "single", {}, 0, 0.99, 1.0, 1, [])
    write(tmp_path, "x0", "uniform", UNIFORM, 7, 0.10, 0.5, 1, [], overrides={"epochs": 2})  # another override
    write(tmp_path, "y0", "uniform", UNIFORM, 8, 0.10, 0.5, 1, [], status="failed")  # never counted
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "claims.toml").write_text(CLAIMS)
    return tmp_path


def rows_by_name(results, scale="cpu", **rule):
    records, _ = load_records(results / "runs")
    return {row["claim"].name: row for row in evaluate_claims(load_claims(results / "papers"), records, scale, **rule)}


# The hand computations below use 2-seed sides, so they are checked under a 2-run minimum; the project's
# rule (a verdict needs 3 seeds per side, MIN_RUNS) is checked by test_a_verdict_needs_three_seeds_per_side.
TWO = {"min_runs": 2}


def test_holds_fails_and_not_run_on_hand_made_records(results):
    rows = rows_by_name(results, **TWO)
    verdicts = {name: row["verdict"] for name, row in rows.items()}
    # one-seed: a run on both sides but under the minimum on one: undecided (before: "not run")
    assert verdicts == {"beats": "holds", "beaten": "fails", "at-least": "fails", "noisy-at-least": "holds",
                        "noisy-beats": "fails", "close": "fails", "close-enough": "holds", "not-better": "holds",
                        "one-seed": "undecided (n < 2)", "absent": "not run", "overridden": "not run",
                        "paper-only": "not run"}
    beats = rows["beats"]
    # by hand: d = 0.88 - 0.71 = 0.17; SE = sqrt(0.03^2 / 3 + 0.0141421^2 / 2) = sqrt(0.0003 + 0.0001) = 0.02
    assert beats["difference"] == pytest.approx(0.17) and beats["se"] == pytest.approx(0.02)
    assert beats["left"]["n"] == 3 and beats["left"]["seeds"] == [0, 1, 2] and beats["right"]["seeds"] == [0, 1]
    assert beats["left"]["std"] == pytest.approx(0.03)
    # noisy vs full: d = -0.01, SE = sqrt(0.02 / 2 + 0.0002 / 2) = 0.1005: [-0.211, 0.191] straddles 0
    noisy = rows["noisy-at-least"]
    assert noisy["difference"] == pytest.approx(-0.01) and noisy["se"] == pytest.approx(math.sqrt(0.0101))
    # uniform vs full: d = -0.03, SE = sqrt(0.0003 + 0.0001) = 0.02: |d| + 2 SE = 0.07
    assert rows["close"]["difference"] == pytest.approx(-0.03) and rows["close"]["se"] == pytest.approx(0.02)
    assert rows["one-seed"]["reason"] == "single: 1 run (needs 2)"
    assert rows["absent"]["reason"] == "uniform (fraction=0.9): 0 runs (needs 2)"
    assert rows["paper-only"]["reason"] == "no cpu-scale form"
    assert rows_by_name(results, "paper", **TWO)["paper-only"]["verdict"] == "holds"


def test_markdown_names_numbers_seeds_and_the_rule(results):
    records, _ = load_records(results / "runs")
    text = markdown_claims(evaluate_claims(load_claims(results / "papers"), records, **TWO), **TWO)  # see TWO
    assert ("| **beats**: beats | toy | uniform (fraction=0.5): 88.00 ± 3.00 (n=3, seeds 0,1,2) | "
            "toyscore (fraction=0.3): 71.00 ± 1.41 (n=2, seeds 0,1) | +17.00 ± 4.00 pp | d - 2SE > 0 pp (test_acc) | "
            "**holds** |") in text
    # one-seed: 1 run against 2, so d is shown without SE and the verdict is undecided (before: "not run")
    assert "| +8.00 pp | d - 2SE > 0 pp (test_acc) | **undecided (n < 2)**: single: 1 run (needs 2) |" in text
    assert "- **beats**: P: Fig. 1" in text
    assert "12 claims: 4 hold, 4 fail, 1 undecided (fewer than 2 runs on a side), 3 not run." in text
    assert "A verdict needs 2 runs (seeds) per side." in text


def test_a_verdict_needs_three_seeds_per_side(results):
    # The project's rule: with fewer than 3 seeds on a side the claim is undecided, whatever the interval says.
    rows = rows_by_name(results)
    verdicts = {name: row["verdict"] for name, row in rows.items()}
    assert verdicts == {name: "undecided (n < 3)" for name in ("beats", "beaten", "at-least", "noisy-at-least",
                        "noisy-beats", "close", "close-enough", "not-better", "one-seed")} | {
                        "absent": "not run", "overridden": "not run", "paper-only": "not run"}
    assert rows["beats"]["reason"] == "toyscore (fraction=0.3): 2 runs (needs 3)"
    assert rows["beats"]["difference"] == pytest.approx(0.17) and rows["beats"]["se"] == pytest.approx(0.02)
    assert rows["absent"]["reason"] == "uniform (fraction=0.9): 0 runs; full: 2 runs (needs 3)"
    # A third seed on the short side decides it: toyscore 0.70, 0.72, 0.71 (mean 0.71, sd 0.01);
    # d = 0.17, SE = sqrt(0.03^2 / 3 + 0.01^2 / 3) = 0.018257: d - 2 SE = 0.1335 > 0.
    write(results, "t2", "toyscore", {"fraction": 0.3}, 2, 0.71, 0.3, 1, [])
    beats = rows_by_name(results)["beats"]
    assert beats["verdict"] == "holds" and beats["reason"] == ""
    assert beats["se"] == pytest.approx(math.sqrt(0.0009 / 3 + 0.0001 / 3))
    records, _ = load_records(results / "runs")
    text = markdown_claims(evaluate_claims(load_claims(results / "papers"), records))
    # toyscore against uniform (beats, beaten, at-least, not-better) is decided now; the rest have 2-seed sides
    assert "12 claims: 2 hold, 2 fail, 5 undecided (fewer than 3 runs on a side), 3 not run." in text
    assert "A verdict needs 3 runs (seeds) per side." in text
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_claims(load_claims(results / "papers"), records, min_runs=1)


@pytest.mark.parametrize("relation, threshold, d, se, expected", [
    (">", 0.0, 0.05, 0.02, True), (">", 0.0, 0.05, 0.03, False), (">", -0.005, 0.0, 0.002, True),
    ("<", 0.0, -0.05, 0.02, True), ("<", 0.0, -0.05, 0.03, False),
    (">=", 0.0, -0.05, 0.03, True), (">=", 0.0, -0.05, 0.02, False),
    ("<=", 0.0, 0.05, 0.03, True), ("<=", 0.0, 0.05, 0.02, False),
    ("within", 0.005, 0.001, 0.001, True), ("within", 0.005, 0.001, 0.0025, False),
    ("within", 0.005, -0.004, 0.0, True), ("within", 0.005, -0.006, 0.0, False),
])
def test_significance_rule_by_hand(relation, threshold, d, se, expected):
    assert verdict(relation, threshold, d, se) is expected


@pytest.mark.parametrize("change, message", [
    (('relation = ">"', 'relation = "bigger"'), "relation must be one of"),
    (("threshold = 0.0", "threshold = \"zero\""), "'threshold' must be a number"),
    (('scale = "cpu"', 'scale = "gpu"'), "scale must be one of paper, cpu"),
    (("left = ", "lefty = "), "unknown key 'lefty'"),
    (('metric = "test_acc"\n', ""), "missing key 'metric'"),
])
def test_bad_claim_files_are_one_readable_error(tmp_path, change, message):
    (tmp_path / "c.toml").write_text(claim("x", ">", 0.0, HALF, FULL).replace(*change, 1))
    with pytest.raises(BenchError, match=message):
        load_claims(tmp_path)


def test_duplicate_names_are_an_error(tmp_path):
    (tmp_path / "c.toml").write_text(claim("x", ">", 0.0, HALF, FULL) * 2)
    with pytest.raises(BenchError, match="claim name 'x' appears twice"):
        load_claims(tmp_path)


def test_the_repository_claims_are_valid_against_the_registry():
    claims = load_claims(ROOT / "results" / "paper")
    names = {c.name for c in claims}
    assert {"infobatch-r03-lossless", "el2n-beats-uniform-moderate", "uniform-beats-el2n-extreme",
            "ccs-matches-uniform-extreme", "forgetting-removes-30-cheaply",
            "grand-at-init-does-not-beat-uniform"} <= names
    for c in claims:
        assert {f.scale for f in c.forms} == {"paper", "cpu"}, c.name  # each has both forms
        for form in c.forms:
            for side in (form.left, form.right):
                params, _ = parse_setting(side.setting)
                resolve_params(side.method, params)  # a typo in a method or parameter fails here
    assert any("Kirsch 2023" in c.paper for c in claims)
    assert load_papers(ROOT / "results" / "paper")  # the claims file does not trouble the paper numbers


def test_cli_writes_the_claims_table(results):
    write(results, "t2", "toyscore", {"fraction": 0.3}, 2, 0.71, 0.3, 1, [])  # 3 seeds a side: "beats" decided
    out = results / "claims.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "replicate", "--runs", str(results), "--papers",
                             str(results / "papers"), "--claims-only", "--claims-out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_text() in result.stdout and "| **holds** |" in out.read_text()


def test_fashion_claims_sweep_makes_every_record_the_cpu_claims_need():
    from benchmarks.core.run import RunSpec
    from benchmarks.jobs.sweep import load_sweep

    sweep = load_sweep("fashion-claims")
    made = {(r.method, r.run_id) for r in sweep.runs}
    for c in load_claims(ROOT / "results" / "paper"):
        form = c.form("cpu")
        assert form.protocol == sweep.protocol, c.name
        for side in (form.left, form.right):
            params, overrides = parse_setting(side.setting)
            for seed in (0, 1, 2):  # a verdict needs 3 seeds per side (claims.MIN_RUNS)
                spec = RunSpec(form.protocol, side.method, params, seed, dict(form.overrides, **overrides))
                assert (side.method, spec.run_id) in made, (c.name, side.label, seed)
