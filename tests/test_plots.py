"""Plots a reader understands at a glance, at a cost that does not grow with the number of runs.

From hand-made records (tests/test_report.py's `write`): settings named in words, the Pareto front
drawn through the right points, a legend in place of labels that could overlap, curves aggregated per
setting (mean line, min-max band) with hand-computed values, the same number of artists for 3 seeds
or 30, the per-class heat map, and byte-identical files when regenerated.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_report import UNIFORM, sections_of, write

from benchmarks.reporting import plots
from benchmarks.reporting.plots import (
    accuracy_curves,
    accuracy_vs_compute,
    aggregate_curves,
    class_means,
    setting_names,
    value_words,
    write_plots,
)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, by file stem, instead of writing them."""
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, stem: figures.setdefault(stem, fig) and [])
    return figures


def test_a_parameter_value_reads_in_the_words_its_method_gives_it():
    assert value_words("ccs", "ccs_beta", -1.0) == "ccs_beta=paper beta"
    assert value_words("el2n", "ccs_beta", -1.0) == "ccs_beta=paper beta"  # the same shared parameter
    assert value_words("ccs", "ccs_beta", 0.3) == "ccs_beta=0.3"
    assert value_words("ccs", "fraction", 0.5) == "fraction=0.5"  # no words declared: the value
    assert value_words("not-a-method", "knob", -1.0) == "knob=-1.0"  # a method this checkout lacks


def ccs_section(tmp_path):
    """full (2 seeds); ccs at the paper's beta and at 0.3 (score_runs=2 shared by both, so never shown)."""
    write(tmp_path, "f0", "full", {}, 0, 0.90, 1.0, 1, [(1, 500, 0.8), (2, 1000, 0.90)])
    write(tmp_path, "f1", "full", {}, 1, 0.92, 1.0, 1, [(1, 500, 0.9), (2, 1000, 0.92)])
    for seed, (acc, beta) in enumerate([(0.88, -1.0), (0.86, 0.3)]):
        write(tmp_path, f"c{seed}", "ccs", {"fraction": 0.5, "ccs_beta": beta, "score_runs": 2}, 0, acc, 0.8, 1,
              [(1, 400, acc - 0.1), (2, 800, acc)])
    write(tmp_path, "u0", "uniform", UNIFORM, 0, 0.85, 0.5, 1, [(1, 250, 0.8), (2, 500, 0.85)])
    (section,), _ = sections_of(tmp_path)
    return section


def test_points_are_keyed_in_a_legend_with_settings_in_words_and_the_front_drawn(tmp_path, drawn):
    section = ccs_section(tmp_path)
    assert sorted(setting_names(section.summary).values()) == ["", "", "ccs_beta=0.3", "ccs_beta=paper beta"]
    accuracy_vs_compute(section, tmp_path)
    (ax,) = drawn["toy-accuracy-vs-compute"].axes
    assert len(ax.texts) == 0  # no label drawn beside a point: nothing can overlap
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:4] == ["ccs: ccs_beta=paper beta", "ccs: ccs_beta=0.3", "full (n=2)", "uniform"]  # n: not the usual
    assert len(set(labels)) == len(labels)
    assert any(label.startswith("Pareto front") for label in labels)
    # the front: uniform (0.5, 85%), ccs paper beta (0.8, 88%), full (1.0, 91%); ccs 0.3 (0.8, 86%) is dominated
    (step,) = [line for line in ax.lines if line.get_drawstyle() == "steps-post"]
    assert list(step.get_xdata()[:-1]) == [0.5, 0.8, 1.0]
    assert list(step.get_ydata()) == pytest.approx([85.0, 88.0, 91.0, 91.0])


def test_curves_are_the_mean_and_min_max_of_the_seeds_at_each_epoch(tmp_path):
    for seed, rows in enumerate([[(1, 400, 0.70), (2, 800, 0.80)], [(1, 420, 0.60), (2, 820, 0.90)],
                                 [(1, 410, 0.65), (2, 810, 0.85)]]):
        write(tmp_path, f"u{seed}", "uniform", UNIFORM, seed, rows[-1][2], 0.8, 1, rows)
    (section,), _ = sections_of(tmp_path)
    x, mean, low, high = aggregate_curves(section, plots._compute_spent)[("uniform", "class_balanced=False, "
                                                                                    "fraction=0.5")]
    assert x == pytest.approx([0.41, 0.81]) and mean == pytest.approx([65.0, 85.0])
    assert low == pytest.approx([60.0, 80.0]) and high == pytest.approx([70.0, 90.0])


def artists(figure) -> int:
    return sum(len(ax.lines) + len(ax.collections) for ax in figure.axes)


def test_a_plot_draws_as_much_for_30_seeds_as_for_3(tmp_path, drawn):
    counts = []
    for seeds in (3, 30):
        folder = tmp_path / str(seeds)
        for seed in range(seeds):
            write(folder, f"f{seed}", "full", {}, seed, 0.9, 1.0, 1, [(1, 500, 0.8), (2, 1000, 0.9)])
            write(folder, f"u{seed}", "uniform", UNIFORM, seed, 0.85, 0.5, 1, [(1, 250, 0.8), (2, 500, 0.85)])
        (section,), _ = sections_of(folder)
        drawn.clear()
        accuracy_curves(section, folder)
        accuracy_vs_compute(section, folder)
        counts.append([artists(drawn[stem]) for stem in ("toy-curves", "toy-accuracy-vs-compute")])
    assert counts[0] == counts[1]


def test_per_class_heat_map_holds_the_mean_over_seeds(tmp_path):
    write(tmp_path, "f0", "full", {}, 0, 0.9, 1.0, 1, [(1, 1000, 0.9)], class_acc=[0.9, 0.7, None])
    write(tmp_path, "f1", "full", {}, 1, 0.8, 1.0, 1, [(1, 1000, 0.8)], class_acc=[0.7, 0.9, None])
    write(tmp_path, "u0", "uniform", UNIFORM, 0, 0.7, 0.5, 1, [(1, 500, 0.7)], class_acc=[0.5, None, 0.6])
    (section,), _ = sections_of(tmp_path)
    labels, means = class_means(section)
    assert labels == ["uniform (n=1)", "full"]  # table order (most compute saved first); n where not the usual
    assert np.allclose(means, [[50.0, np.nan, 60.0], [80.0, 80.0, np.nan]], equal_nan=True)
    names = sorted(p.name for p in write_plots([section], tmp_path / "plots"))
    assert "toy-per-class.png" in names and "toy-per-class.pdf" in names


def test_regenerated_plots_are_byte_identical(tmp_path):
    section = ccs_section(tmp_path)
    first = {p.name: p.read_bytes() for p in write_plots([section], tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in write_plots([section], tmp_path / "b")}
    assert first == second and len(first) == 4
