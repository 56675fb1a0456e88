"""`nox -s perf` at a tiny size: every measurement runs, with the session's own method list.

The perf session is not run by CI; this test is what keeps it from rotting. An API change that
breaks a measurement fails here instead of in the next person's `nox -s perf`.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

from benchmarks.tools.perf import GOALS, MEASUREMENTS, PER_METHOD, main

NOXFILE = Path(__file__).resolve().parent.parent / "noxfile.py"


def session_methods() -> dict[str, list[str]]:
    """noxfile.py's PERF_METHODS, read without importing nox (not a test dependency)."""
    for node in ast.parse(NOXFILE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PERF_METHODS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("noxfile.py defines no PERF_METHODS")


def test_every_measurement_runs_at_tiny_size(tmp_path, capsys):
    methods = session_methods()
    args = [arg for option, names in methods.items() for name in names for arg in (option, name)]
    out = tmp_path / "perf.json"
    assert main(["--tiny", "--out", str(out), *args]) == 0
    ratios = json.loads(out.read_text())
    expected = set(MEASUREMENTS)
    for kind, (option, _hook, _measure) in PER_METHOD.items():
        names = methods["--" + option.replace("_", "-")]
        assert names, f"the perf session names no method for {kind}"
        expected |= {f"{kind}/fashion-mnist/{m}" if kind == "scoring_cost" else f"{kind}/{m}" for m in names}
    assert set(ratios) == expected
    bad = {name: value for name, value in ratios.items()
           if not (isinstance(value, float) and math.isfinite(value) and value > 0)}
    assert not bad, f"not finite positive ratios: {bad}"
    printed = capsys.readouterr().out
    for name in ratios:  # each ratio printed, with its goal where it has one
        kind = name.split("/")[0]
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"{name} = "))
        if kind in GOALS:
            op, goal = GOALS[kind]
            assert f"(goal {op} {goal}: " in line, line
        else:
            assert kind == "scoring_cost", f"{name} has no goal"


def test_merges_into_an_existing_file(tmp_path):
    out = tmp_path / "perf.json"
    out.write_text(json.dumps({"from_an_earlier_run": 2.5}))
    assert main(["--tiny", "--out", str(out), "--only", "ghost_over_materialised"]) == 0
    ratios = json.loads(out.read_text())
    assert set(ratios) == {"from_an_earlier_run", "ghost_over_materialised"} and ratios["from_an_earlier_run"] == 2.5


def test_a_method_that_cannot_be_measured_is_one_line(tmp_path, capsys):
    out = tmp_path / "perf.json"
    # the reference method selects nothing online: a step ratio of it would mean nothing
    assert main(["--tiny", "--out", str(out), "--only", "step_over_reference_step", "--step-method", "full"]) == 2
    assert main(["--tiny", "--out", str(out), "--only", "scoring_cost", "--cost-method", "no-such-method"]) == 2
    assert main(["--tiny", "--out", str(out), "--only", "epoch_over_reference"]) == 2  # no method named
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), errors
    assert "does not implement `select`" in errors[0] and "unknown method 'no-such-method'" in errors[1]
    assert "--epoch-method" in errors[2]
    assert not out.exists()  # nothing measured, nothing written
