"""Tables, plots, CSV, per-class accuracy, amortised compute and the time-to-target, from small hand-made records
(written with write_record) and a few seconds-long smoke runs."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import SCHEMA, load_records, write_record
from benchmarks.reporting.plots import write_plots
from benchmarks.reporting.tables import (
    RUNS_CSV,
    SUMMARY_CSV,
    build_sections,
    compute_to_target,
    latex_escape,
    latex_tables,
    markdown_tables,
    pareto_front,
    write_csv,
)

FULL_FLOPS = 1000


def write(out, rid, method, params, seed, acc, fraction, wall, curve, *, protocol="toy", overrides=None,
          selection_share=0.0, worst_group=None, rule="last-epoch", stats=None, status="complete", class_acc=None,
          artefacts=None):
    metrics = {"test_acc": acc, "selected_epoch": len(curve)}
    if worst_group is not None:
        metrics["test_worst_group_acc"] = worst_group
    if class_acc is not None:
        metrics["test_class_acc"] = class_acc
    record = {"schema": SCHEMA, "run_id": rid, "status": status, "protocol": protocol, "method": method,
              "params": params, "seed": seed, "overrides": overrides or {}, "budget": "epochs",
              "resolved_protocol": {"name": protocol, "budget": "epochs", "selection_rule": rule},
              "metrics": metrics if status == "complete" else {},
              "compute": {"fraction": fraction, "saved": 1 - fraction, "selection_share": selection_share,
                          "full_flops": FULL_FLOPS, "total_flops": round(fraction * FULL_FLOPS),
                          **({"artefacts": artefacts} if artefacts is not None else {})},
              "wall_clock_s": wall, "curve": [dict(zip(("epoch", "flops", "test_acc"), row)) for row in curve],
              "method_stats": stats or {}, "error": None}
    write_record(ResultsLayout(out).record(rid), record)


UNIFORM = {"class_balanced": False, "fraction": 0.5}


@pytest.fixture
def results(tmp_path):
    """full: 2 seeds (90, 92 -> 91.00 ± 1.41); uniform: 3 seeds (85, 88, 91 -> 88.00 ± 3.00);
    toyscore: 1 seed. Target = 91 - 1 = 90."""
    write(tmp_path, "f0", "full", {}, 0, 0.90, 1.0, 10, [(1, 500, 0.80), (2, 1000, 0.90)])
    write(tmp_path, "f1", "full", {}, 1, 0.92, 1.0, 12, [(1, 500, 0.905), (2, 1000, 0.92)])
    write(tmp_path, "u0", "uniform", UNIFORM, 0, 0.85, 0.5, 5, [(1, 250, 0.80), (2, 500, 0.85)])
    write(tmp_path, "u1", "uniform", UNIFORM, 1, 0.88, 0.5, 6, [(1, 250, 0.89), (2, 500, 0.88)])
    write(tmp_path, "u2", "uniform", UNIFORM, 2, 0.91, 0.5, 7, [(1, 250, 0.86), (2, 500, 0.91)])
    write(tmp_path, "s0", "toyscore", {"fraction": 0.3}, 0, 0.70, 0.45, 3, [(1, 400, 0.6), (2, 450, 0.7)],
          selection_share=1 / 3, stats={"scores_cached": True})
    write(tmp_path, "x0", "uniform", UNIFORM, 3, 0.10, 0.5, 1, [], status="failed")  # never tabulated
    return tmp_path


EXPECTED_TOY = """\
### toy

| method | setting | n | test acc % (mean ± std) | Δ vs full (pp) | compute fraction | selection share % | wall-clock s | compute to target | reached |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|
| toyscore | fraction=0.3 | 1 | 70.00 | -21.00 | 0.450 | 33.3 | 3.0 |  | 0/1 |
| uniform | fraction=0.5 | 3 | 88.00 ± 3.00 | -3.00 | 0.500 | 0.0 | 6.0 | 0.500 | 1/3 |
| full | - | 2 | 91.00 ± 1.41 | +0.00 | 1.000 | 0.0 | 11.0 | 0.750 | 2/2 |

- Budget: epochs (a subset gets fewer steps).
- Reported: the last epoch (no model selection on the test set).
- Compute fraction = (train + selection FLOPs) / FLOPs of the full-data run (computed, not run); evaluation passes excluded. Selection share = the part of it spent choosing data. Rows sorted by compute saved, most first.
- Setting = the method's headline parameter and those that differ from its defaults or between its rows (each run record holds them all).
- Compute to target = compute fraction at the first evaluated epoch with test acc >= 90.00% (full-data mean 91.00% - 1.00 pp), mean over the seeds that reach it; reached = seeds reaching it / seeds.
- Some runs reused cached scores: their scoring cost is still charged to each run as selection compute.
"""


def sections_of(folder, **kw):
    records, problems = load_records(folder / "runs")
    return build_sections(records, problems, **kw), problems


def test_markdown_table_matches_hand_computed_text(results):
    sections, problems = sections_of(results)
    assert problems == []
    assert markdown_tables(sections) == {"toy": EXPECTED_TOY}


def test_mean_std_delta_over_seeds(results):
    (section,), _ = sections_of(results)
    rows = section.summary.set_index("method")
    assert rows.loc["uniform", "acc_mean"] == pytest.approx(0.88)
    assert rows.loc["uniform", "acc_std"] == pytest.approx(0.03)  # sample std (ddof=1); population would be 0.0245
    assert rows.loc["full", "acc_std"] == pytest.approx(math.sqrt(2 * 0.01**2))
    assert math.isnan(rows.loc["toyscore", "acc_std"])  # one seed: no spread
    assert rows.loc["uniform", "delta_vs_full"] == pytest.approx(-0.03)
    assert list(section.summary["method"]) == ["toyscore", "uniform", "full"]  # most compute saved first


def test_tolerance_moves_the_target(results):
    (section,), _ = sections_of(results, tolerance=0.05)  # target 86%
    rows = section.summary.set_index("method")
    # seed 0 never (80, 85); seeds 1 and 2 at epoch 1 (89, and 86 exactly on the target)
    assert rows.loc["uniform", "reached"] == 2 and rows.loc["uniform", "to_target"] == pytest.approx(0.25)
    assert rows.loc["toyscore", "reached"] == 0 and math.isnan(rows.loc["toyscore", "to_target"])
    assert rows.loc["full", "to_target"] == pytest.approx((1.0 + 0.5) / 2)


def test_compute_to_target_from_hand_made_curves():
    curve = [{"epoch": 1, "flops": 100}, {"epoch": 2, "flops": 200, "test_acc": 0.5},  # epoch 1 not evaluated
             {"epoch": 3, "flops": 300, "test_acc": 0.8}, {"epoch": 4, "flops": 400, "test_acc": 0.9}]
    assert compute_to_target(curve, 0.8, 1000) == 0.3
    assert compute_to_target(curve, 0.45, 1000) == 0.2
    assert math.isnan(compute_to_target(curve, 0.95, 1000))  # never reached
    assert math.isnan(compute_to_target(curve, None, 1000))  # no full-data run, no target


def test_setting_names_headline_non_default_and_varying_parameters(tmp_path):
    """uniform: fraction is its headline (shown at the default 0.5 too), class_balanced at its default is
    hidden; el2n: score_runs=2 is not its default, mode varies between its rows, ccs_beta never shows."""
    el2n = {"fraction": 0.5, "mode": "hardest", "offset": 0.0, "class_balanced": False, "ccs_beta": 0.3,
            "score_runs": 2, "score_epoch": -1}
    write(tmp_path, "u0", "uniform", UNIFORM, 0, 0.8, 0.5, 1, [])
    write(tmp_path, "e0", "el2n", el2n, 0, 0.8, 0.8, 1, [])
    write(tmp_path, "e1", "el2n", dict(el2n, mode="easiest"), 0, 0.7, 0.8, 1, [])
    write(tmp_path, "t0", "toyscore", {"fraction": 0.3, "knob": 1}, 0, 0.7, 0.45, 1, [])  # unknown: all shown
    (section,), _ = sections_of(tmp_path)
    labels = dict(zip(section.summary["method"] + "/" + section.summary["acc_mean"].astype(str), section.summary["label"]))
    assert labels == {"uniform/0.8": "fraction=0.5", "el2n/0.8": "fraction=0.5, mode=hardest, score_runs=2",
                      "el2n/0.7": "fraction=0.5, mode=easiest, score_runs=2", "toyscore/0.7": "fraction=0.3, knob=1"}


def test_fraction_grid_puts_fractions_side_by_side(tmp_path):
    """Rows: uniform first, then each method with its non-fraction shown parameters; columns: the
    fractions kept, largest first; n shown where it differs from the usual number of seeds."""
    write(tmp_path, "f0", "full", {}, 0, 0.90, 1.0, 1, [])
    write(tmp_path, "f1", "full", {}, 1, 0.92, 1.0, 1, [])
    for seed, (a9, a3) in enumerate([(0.88, 0.80), (0.86, 0.84)]):
        write(tmp_path, f"u9{seed}", "uniform", {"fraction": 0.9}, seed, a9, 0.9, 1, [])
        write(tmp_path, f"u3{seed}", "uniform", {"fraction": 0.3}, seed, a3, 0.3, 1, [])
    write(tmp_path, "k9", "kcenter", {"fraction": 0.9}, 0, 0.89, 0.95, 1, [], selection_share=0.05)
    sections, _ = sections_of(tmp_path)
    text = markdown_tables(sections)["toy"]
    grid = text[text.index("#### toy: by fraction kept"):]
    assert grid.splitlines()[2:6] == [
        "| method | kept 0.9 | kept 0.3 |",
        "|---|---:|---:|",
        "| uniform | 87.00 ± 1.41 [0.90] | 82.00 ± 2.83 [0.30] |",
        "| kcenter | 89.00 [0.95] n=1 |  |",
    ]
    assert "- Full data: 91.00 ± 1.41 (n=2) [1.00]." in grid
    assert "by fraction" in latex_tables(sections)["toy"]
    plots = sorted(p.name for p in write_plots(sections, tmp_path / "plots"))
    assert "toy-accuracy-vs-kept.png" in plots and "toy-accuracy-vs-kept.pdf" in plots


def test_no_fraction_grid_without_a_method_at_two_fractions(results):
    sections, _ = sections_of(results)
    assert "by fraction kept" not in markdown_tables(sections)["toy"]


def test_groups_selection_rule_and_no_full_run(tmp_path):
    write(tmp_path, "g0", "jtt", {"up": 5}, 0, 0.90, 1.2, 4, [(1, 600, 0.9)], protocol="birds", worst_group=0.70,
          rule="best-val-worst-group")
    write(tmp_path, "g1", "jtt", {"up": 5}, 1, 0.80, 1.2, 4, [(1, 600, 0.8)], protocol="birds", worst_group=0.60,
          rule="best-val-worst-group")
    write(tmp_path, "o0", "full", {}, 0, 0.5, 1.0, 1, [(1, 10, 0.5)], overrides={"epochs": 1})
    sections, _ = sections_of(tmp_path)
    tables = markdown_tables(sections)
    birds = tables["birds"]
    assert "| worst-group acc % (mean ± std) |" in birds
    assert "| jtt | up=5 | 2 | 85.00 ± 7.07 | 65.00 ± 7.07 |  | 1.200 | 0.0 | 4.0 |  |  |" in birds
    assert "rule 'best-val-worst-group'" in birds and "No full-data run" in birds
    assert "### toy, --set epochs=1" in tables["toy"] and "worst-group" not in tables["toy"]


def test_corrupt_records_are_reported_with_their_path_not_fatal(results):
    (results / "runs" / "trunc.json").write_text('{"schema": 1, "run_id": "t", "sta')
    bad = {"schema": SCHEMA, "run_id": "b", "status": "complete", "protocol": "toy", "method": "uniform",
           "params": {}, "seed": 9, "overrides": {}, "compute": "oops", "curve": []}
    write_record(results / "runs" / "bad.json", bad)
    sections, problems = sections_of(results)
    assert markdown_tables(sections) == {"toy": EXPECTED_TOY}  # the good records still make the same table
    assert len(problems) == 2
    assert any("trunc.json" in p for p in problems) and any("bad.json" in p and "malformed" in p for p in problems)


def test_records_of_an_older_schema_are_refused_not_mixed(results):
    old = {"schema": SCHEMA - 1, "run_id": "old", "status": "complete", "protocol": "toy", "method": "uniform",
           "params": UNIFORM, "seed": 7, "overrides": {}, "metrics": {"test_acc": 0.5},
           "compute": {"fraction": 0.5}, "curve": []}
    write_record(results / "runs" / "old.json", old)
    sections, problems = sections_of(results)
    assert markdown_tables(sections) == {"toy": EXPECTED_TOY}  # the old record is not in the table
    assert len(problems) == 1 and "old.json" in problems[0] and f"schema {SCHEMA - 1}" in problems[0]
    assert "run it again" in problems[0]


def test_latex_is_booktabs_with_escaped_text(results):
    sections, _ = sections_of(results)
    tex = latex_tables(sections)["toy"]
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    for command in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{llrrrrrrrr}", r"\end{table}"):
        assert command in body
    assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
    assert r"uniform & fraction=0.5 & 3 & 88.00 $\pm$ 3.00 & -3.00 & 0.500" in body
    assert not re.search(r"(?<!\\)[_%&#]", body.replace(" & ", " ")), "unescaped special character"
    assert body.count("{") == body.count("}")
    assert "±" not in body and "Δ" not in body
    assert latex_escape("a_b 50% {x} & ±") == r"a\_b 50\% \{x\} \& $\pm$"


def test_plots_are_written_and_not_empty(results, tmp_path):
    sections, _ = sections_of(results)
    paths = write_plots(sections, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == ["toy-accuracy-vs-compute.pdf", "toy-accuracy-vs-compute.png", "toy-curves.pdf", "toy-curves.png"]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000
        assert data.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF")


def test_cli_tables_writes_markdown_and_latex_and_warns_on_corrupt(results):
    (results / "runs" / "trunc.json").write_text("{")
    out = results / "tables"
    result = subprocess.run([sys.executable, "-m", "benchmarks", "tables", "--runs", str(results), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert EXPECTED_TOY in result.stdout
    assert "warning: skipped" in result.stderr and "trunc.json" in result.stderr
    assert (out / "toy.md").read_text() == EXPECTED_TOY
    assert r"\toprule" in (out / "toy.tex").read_text()


# -- per-class accuracy ------------------------------------------------------------------------------


def test_per_class_accuracy_equals_a_hand_counted_confusion_matrix():
    import torch

    from benchmarks.core.evaluation import class_accuracy

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=generator)
    labels[labels == 3] = 4  # class 3 absent from the split
    predicted = torch.randint(0, 5, (200,), generator=generator)
    predicted[:120] = labels[:120]  # better than chance
    confusion = [[0] * 5 for _ in range(5)]
    for y, p in zip(labels.tolist(), predicted.tolist()):
        confusion[y][p] += 1
    expected = [confusion[c][c] / sum(confusion[c]) if sum(confusion[c]) else None for c in range(5)]
    assert class_accuracy(predicted == labels, labels, 5) == expected
    assert expected[3] is None and all(isinstance(a, float) for i, a in enumerate(expected) if i != 3)
    assert class_accuracy(torch.tensor([True, False, True]), torch.tensor([0, 0, 1]), 2) == [0.5, 1.0]


def test_a_run_records_per_class_accuracy_from_the_same_evaluation(run_smoke):
    """Weighted by the test split's class counts, the per-class accuracies give test_acc back, at every
    evaluated epoch (the same correct flags, no extra pass)."""
    import torch

    from benchmarks.core.protocol import load_protocol
    from benchmarks.data import load_data

    record = run_smoke("full", epochs=2)
    protocol = load_protocol("smoke")
    counts = torch.bincount(load_data(protocol.dataset, None, protocol.data_kwargs).test.labels, minlength=4).tolist()
    for row in [record["metrics"], *(r for r in record["curve"] if "test_acc" in r)]:
        per_class = row["test_class_acc"]
        assert len(per_class) == 4
        assert sum(a * n for a, n in zip(per_class, counts)) / sum(counts) == pytest.approx(row["test_acc"], abs=1e-6)


def test_worst_class_column_appears_where_records_keep_classes(tmp_path):
    write(tmp_path, "f0", "full", {}, 0, 0.9, 1.0, 1, [], class_acc=[0.9, 0.7, None, 0.95])
    write(tmp_path, "f1", "full", {}, 1, 0.8, 1.0, 1, [], class_acc=[0.6, 0.8, None, 0.9])
    write(tmp_path, "u0", "uniform", UNIFORM, 0, 0.7, 0.5, 1, [])  # an older record: no per-class accuracy
    (section,), _ = sections_of(tmp_path)
    table = markdown_tables([section])["toy"]
    assert "| worst-class acc % (mean ± std) |" in table
    # worst classes 0.7 and 0.6 (None: a class the split lacks, never the worst): 65.00 ± 7.07
    assert "| full | - | 2 | 85.00 ± 7.07 | 65.00 ± 7.07 | +0.00 |" in table
    assert "| uniform | fraction=0.5 | 1 | 70.00 |  | -15.00 |" in table
    assert "Worst-class = the lowest per-class test accuracy" in table


# -- amortised compute -------------------------------------------------------------------------------


def test_amortised_compute_pays_a_shared_proxy_once(tmp_path):
    """Two runs share proxy P (100 FLOPs); run a also has its own scoring pass S (50), run c none.
    Full = 1000. a: 400 charged -> 400 - 150 + 100/2 + 50/1 = 350; b: 300 -> 300 - 100 + 50 = 250;
    c (no cached work) keeps its 200."""
    write(tmp_path, "a", "toyscore", {"fraction": 0.2}, 0, 0.7, 0.4, 1, [],
          artefacts=[{"key": "proxy-P", "flops": 100}, {"key": "score-S", "flops": 50}])
    write(tmp_path, "b", "toyscore", {"fraction": 0.1}, 0, 0.6, 0.3, 1, [], artefacts=[{"key": "proxy-P", "flops": 100}])
    write(tmp_path, "c", "uniform", UNIFORM, 0, 0.5, 0.2, 1, [])
    (section,), _ = sections_of(tmp_path)
    amortised = dict(zip(section.runs["run_id"], section.runs["amortised_fraction"]))
    assert amortised == pytest.approx({"a": 0.35, "b": 0.25, "c": 0.2})
    table = markdown_tables([section])["toy"]
    assert "| compute fraction | compute fraction, amortised | selection share % |" in table
    assert "| toyscore | fraction=0.2 | 1 | 70.00 |  | 0.400 | 0.350 | 0.0 |" in table  # no full run: no delta
    assert "Amortised = the compute fraction when cached work" in table
    # a run that charged the same piece twice bears its share once
    write(tmp_path, "b", "toyscore", {"fraction": 0.1}, 0, 0.6, 0.4, 1, [],
          artefacts=[{"key": "proxy-P", "flops": 100}, {"key": "proxy-P", "flops": 100}])
    (section,), _ = sections_of(tmp_path)
    assert dict(zip(section.runs["run_id"], section.runs["amortised_fraction"]))["b"] == pytest.approx(0.25)


def test_runs_sharing_a_cached_proxy_list_it_and_are_charged_as_before(tmp_path):
    """el2n at two fractions, one seed: the second run reads the first's proxy and scores from the cache.
    Both are charged the same selection FLOPs (unchanged) and list the same pieces, which add up to them."""
    from benchmarks.core.run import execute
    from benchmarks.core.spec import RunSpec
    from conftest import quiet

    params = {"score_runs": 1, "score_epoch": 1}
    records = [execute(RunSpec("smoke", "el2n", dict(params, fraction=f), 0, {"epochs": 1}), tmp_path, log=quiet)
               for f in (0.3, 0.6)]
    first, second = (r["compute"] for r in records)
    assert first["selection_flops"] == second["selection_flops"] > 0
    assert first["artefacts"] == second["artefacts"]
    assert [p["key"].split("-")[0] for p in first["artefacts"]] == ["proxy", "el2n"]  # the proxy inside the scores
    assert sum(p["flops"] for p in first["artefacts"]) == first["selection_flops"]
    (section,), _ = sections_of(tmp_path)
    full = first["full_flops"]
    shared = sum(p["flops"] for p in first["artefacts"])
    for record in records:
        row = section.runs.set_index("run_id").loc[record["run_id"]]
        assert row["amortised_fraction"] == pytest.approx((record["compute"]["total_flops"] - shared / 2) / full)
    # without a cache nothing is shared, so nothing is listed; the charge is the same
    from benchmarks.core.registry import create_method
    from benchmarks.core.run import build_context

    spec = RunSpec("smoke", "el2n", dict(params, fraction=0.3), 0, {"epochs": 1})
    ctx = build_context(spec.resolve().protocol, 0, log=quiet)
    method = create_method("el2n", **spec.params)
    method.ctx = ctx
    method.prepare(ctx)
    assert ctx.meter.artefacts == [] and ctx.meter.flops["selection"] == first["selection_flops"]


# -- the Pareto front, CSV and the documented schemas ------------------------------------------------


def test_pareto_front_is_the_best_accuracy_for_at_most_that_compute():
    nan = float("nan")
    fraction = [0.3, 0.5, 0.5, 0.7, 1.0, 1.2, 0.4, nan]
    accuracy = [0.80, 0.85, 0.83, 0.85, 0.90, 0.90, nan, 0.99]
    # 0.5/0.85 beats 0.5/0.83; 0.7/0.85 is matched by 0.5/0.85 at less compute; 1.2 by 1.0; NaN never
    assert pareto_front(fraction, accuracy) == [True, True, False, False, True, False, False, False]
    assert pareto_front([0.5, 0.5], [0.8, 0.8]) == [True, True]  # equal points: both on the front


def readme_columns(title: str) -> list[str]:
    """The first column of the README table that follows the line starting with `title`."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append(line.split("|")[1].strip())
    return [name.strip() for cell in rows[1:] for name in cell.split(",")]


def test_csv_columns_are_the_documented_ones_and_hold_the_table_values(results, tmp_path):
    assert readme_columns("`runs.csv`, one row per run") == RUNS_CSV
    assert readme_columns("`summary.csv`, one row per table row") == SUMMARY_CSV
    import pandas as pd

    sections, _ = sections_of(results)
    paths = write_csv(sections, tmp_path)
    runs, summary = (pd.read_csv(p) for p in paths)
    assert list(runs.columns) == RUNS_CSV and list(summary.columns) == SUMMARY_CSV
    assert len(runs) == 6 and sorted(runs["run_id"]) == ["f0", "f1", "s0", "u0", "u1", "u2"]
    uniform = summary.set_index("method").loc["uniform"]
    assert uniform["n"] == 3 and uniform["test_acc_mean"] == pytest.approx(0.88)
    assert uniform["test_acc_std"] == pytest.approx(0.03) and uniform["reached"] == 1
    assert uniform["target_acc"] == pytest.approx(0.90) and uniform["full_acc_mean"] == pytest.approx(0.91)
    assert dict(zip(summary["method"], summary["pareto"])) == {"toyscore": True, "uniform": True, "full": True}
    assert runs.set_index("run_id").loc["u0", "total_flops"] == 500 and runs["full_flops"].eq(FULL_FLOPS).all()


def test_every_record_field_is_documented(run_smoke):
    from benchmarks.core.record import IDENTITY_FIELDS, OUTCOME_FIELDS

    documented = set(readme_columns("**The run record**"))
    fields = {"schema", "status", "model_path", *IDENTITY_FIELDS, *OUTCOME_FIELDS}
    assert fields <= documented, sorted(fields - documented)
    assert set(run_smoke("full", epochs=1)) <= documented
