"""Plots per table section (protocol + overrides), as PNG and PDF:

- <slug>-accuracy-vs-compute: test accuracy (mean ± std over seeds) against the compute fraction, one
  point per method setting, keyed in a legend by colour (method) and marker (setting), the Pareto
  front (the best accuracy for at most that compute) drawn as a step line through its points, and,
  where records list their cached work, the amortised compute as a hollow marker on the same row;
- <slug>-curves: test accuracy against compute spent (fraction of the full-data run) along training,
  one panel per method: per setting the mean over seeds as a line and the seeds' min-max as a band,
  the reference method's mean in every panel for comparison;
- <slug>-curves-steps (when the curves record optimiser steps): the same panels against steps;
- <slug>-accuracy-vs-kept (when methods keeping a fixed fraction ran at two or more fractions): test
  accuracy against the fraction of the training set kept, one line per method;
- <slug>-per-class (when the records keep per-class accuracy): mean test accuracy per class and
  setting, as a heat map.

Settings are named in words where a method's parameter says how a value reads (Param.labels: CCS's
ccs_beta = -1 is "paper beta"); the tables keep the recorded values. Curves are aggregated per
setting before drawing, so a plot costs the same for 10 runs or 10,000 of the same settings.

Figures are drawn with matplotlib's object API (no pyplot, no global backend switch) and saved
without timestamps, so regenerating unchanged data gives unchanged files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from benchmarks.core import catalog
from benchmarks.reporting.tables import Section, fraction_rows, pareto_front, reference_rows

FORMATS = ("png", "pdf")
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")
WIDTH = 6.4  # inches of the axes' column; a legend beside it adds to the figure


def save_figure(fig: Figure, out: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight", metadata=_METADATA[fmt])
        paths.append(path)
    return paths


def _colours(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def value_words(method: str, name: str, value) -> str:
    """`name=value`, the value in the words its Param gives it (ccs_beta=paper beta) where it gives some."""
    words = catalog.words(method, name, value)
    return f"{name}={words if words is not None else value}"


def setting_names(summary) -> dict[tuple[str, str], str]:
    """Per (method, setting): the parameters that tell it apart from the method's other settings, in words.

    The legend names the method; a setting needs only what differs between the method's rows (a
    parameter every row shares, such as score_runs=2, would only crowd it): "" for a method's only row.
    """
    names = {}
    for method, group in summary.groupby("method", sort=False):
        keys = {k for shown in group["shown"] for k in shown}
        varying = sorted(k for k in keys if len({repr(shown.get(k)) for shown in group["shown"]}) > 1)
        for row in group.itertuples():
            names[(method, row.setting)] = ", ".join(value_words(method, k, row.shown[k])
                                                     for k in varying if k in row.shown)
    return names


def _entry(method: str, name: str) -> str:
    return f"{method}: {name}" if name else method


def usual_seeds(counts) -> int:
    """The most common number of seeds per setting (legends name n only where it differs)."""
    counts = list(counts)
    return max(set(counts), key=lambda n: (counts.count(n), n)) if counts else 0


def _seeds_note(n: int, usual: int) -> str:
    return "" if n == usual else f" (n={n})"


def _std(value: float) -> float:
    return 0.0 if value != value else 100 * value  # NaN (one seed): no bar


def _legend_beside(ax, handles=None, labels=None) -> None:
    """The legend right of the axes, in one or two columns, so that it never covers a point."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    columns = 1 if len(handles) <= 24 else 2
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              ncol=columns, frameon=False)


def accuracy_vs_compute(section: Section, out: Path) -> list[Path]:
    summary = section.summary.dropna(subset=["acc_mean", "fraction"]).reset_index(drop=True)
    names = setting_names(summary)
    methods = list(dict.fromkeys(sorted(summary["method"])))
    colours = _colours(methods)
    rows_per_method = {m: list(summary.loc[summary["method"] == m, "setting"]) for m in methods}
    fig = Figure(figsize=(WIDTH, 4.6))
    ax = fig.add_subplot()
    front = pareto_front(summary["fraction"], summary["acc_mean"])
    amortised = section.has_amortised
    usual = usual_seeds(summary["n"])
    for method in methods:
        for i, setting in enumerate(rows_per_method[method]):
            row = summary[(summary["method"] == method) & (summary["setting"] == setting)].iloc[0]
            on_front = front[int(row.name)]
            x, y = row.fraction, 100 * row.acc_mean
            ax.errorbar(x, y, yerr=_std(row.acc_std), fmt=MARKERS[i % len(MARKERS)], markersize=6, capsize=3,
                        color=colours[method], markeredgecolor="black" if on_front else colours[method],
                        markeredgewidth=1.4 if on_front else 0.5, zorder=3,
                        label=_entry(method, names[(method, setting)]) + _seeds_note(row.n, usual))
            if amortised and row.amortised == row.amortised and abs(row.amortised - x) > 1e-9:
                ax.plot([row.amortised, x], [y, y], color=colours[method], linewidth=0.8, linestyle=":", zorder=2)
                ax.plot(row.amortised, y, marker=MARKERS[i % len(MARKERS)], markersize=6, markerfacecolor="white",
                        color=colours[method], linestyle="none", zorder=3)
    points = sorted((f, 100 * a) for f, a, on in zip(summary["fraction"], summary["acc_mean"], front) if on)
    handles, labels = ax.get_legend_handles_labels()
    if points:
        right = max(summary["fraction"].max(), summary["amortised"].max() if amortised else 0) * 1.04
        xs, ys = zip(*points)
        ax.step([*xs, right], [*ys, ys[-1]], where="post", color="black", linewidth=1, linestyle="--", zorder=1)
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1, marker="o", markerfacecolor="none",
                              markeredgecolor="black"))
        labels.append("Pareto front: best accuracy for\nat most that compute (ringed)")
    if amortised:
        handles.append(Line2D([], [], color="grey", linestyle=":", marker="o", markerfacecolor="white"))
        labels.append("amortised compute: cached work\npaid once across the runs")
    if section.full_mean == section.full_mean:  # not NaN
        handles.append(ax.axhline(100 * section.full_mean, color="grey", linestyle="-", linewidth=0.8, zorder=0))
        labels.append(f"full-data mean ({100 * section.full_mean:.2f}%)")
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=0.8, zorder=0)
    ax.set_xlim(left=0)
    ax.set_xlabel("compute, fraction of the full-data run (train + selection FLOPs; 1 = full data)")
    ax.set_ylabel(f"test accuracy, % (mean ± std over {usual} seeds)" if usual > 1 else "test accuracy, %")
    ax.set_title(f"{section.title}: accuracy vs compute (budget: {section.budget})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_beside(ax, handles, labels)
    return save_figure(fig, out, f"{section.slug}-accuracy-vs-compute")


def aggregate_curves(section: Section, x_of) -> dict[tuple[str, str], tuple[np.ndarray, ...]]:
    """Per (method, setting): (x, mean, min, max) of test accuracy (%) at each evaluated epoch over its
    seeds; x = the mean of x_of(run, row) over the seeds evaluated there (None drops a point)."""
    points: dict[tuple[str, str], dict[int, tuple[list, list]]] = {}
    for method, setting, full, curve in zip(section.runs["method"], section.runs["setting"],
                                            section.runs["full_flops"], section.runs["curve"]):
        epochs = points.setdefault((method, setting), {})
        for row in curve:
            if "test_acc" not in row:
                continue
            x = x_of(full, row)
            if x is None:
                continue
            xs, ys = epochs.setdefault(row.get("epoch", len(epochs)), ([], []))
            xs.append(x)
            ys.append(100 * row["test_acc"])
    curves = {}
    for key, epochs in points.items():
        if not epochs:
            continue
        ordered = [epochs[e] for e in sorted(epochs)]
        curves[key] = (np.array([np.mean(xs) for xs, _ in ordered]), np.array([np.mean(ys) for _, ys in ordered]),
                       np.array([min(ys) for _, ys in ordered]), np.array([max(ys) for _, ys in ordered]))
    return curves


def _compute_spent(full, row) -> float | None:
    return row["flops"] / full if "flops" in row and full and full == full else None


def _steps(full, row) -> float | None:
    return row.get("step")


def _curve_panels(section: Section, out: Path, x_of, xlabel: str, against: str, stem: str) -> list[Path]:
    """One panel per method: each setting's mean over seeds as a line, the seeds' min-max as a band."""
    curves = aggregate_curves(section, x_of)
    if not curves:
        return []
    summary = section.summary
    names = setting_names(summary)
    methods = list(dict.fromkeys(sorted(m for m, _ in curves)))
    runs = section.runs[reference_rows(section.runs, section.reference)]  # the full-data runs
    reference = [key for key in dict.fromkeys(zip(runs["method"], runs["setting"])) if key in curves]
    columns = min(3, len(methods))
    rows = math.ceil(len(methods) / columns)
    fig = Figure(figsize=(WIDTH * columns / 2, 2.9 * rows + 0.6))
    axes = fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    counts = section.runs.groupby(["method", "setting"]).size()
    usual = usual_seeds(counts)
    for ax, method in zip(axes.flat, methods):
        settings = [s for s in summary.loc[summary["method"] == method, "setting"] if (method, s) in curves]
        colours = _colours(settings)
        if reference and method != section.reference:
            x, mean, _, _ = curves[reference[0]]
            ax.plot(x, mean, color="grey", linestyle="--", linewidth=1, marker=".", markersize=4,
                    label=f"full data: {section.reference} (mean)")
        for setting in settings:
            x, mean, low, high = curves[(method, setting)]
            colour = colours[setting] if len(settings) > 1 else "tab:blue"
            ax.fill_between(x, low, high, color=colour, alpha=0.2, linewidth=0)
            name = names.get((method, setting), "") or "mean"
            ax.plot(x, mean, color=colour, marker="." if len(x) > 1 else "o", markersize=3 if len(x) > 1 else 5,
                    linewidth=1.2,
                    label=name + _seeds_note(int(counts.get((method, setting), 0)), usual))
        if section.target is not None:
            ax.axhline(100 * section.target, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(method, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best", frameon=True, framealpha=0.8)
    for column in range(columns):  # the x axis under each column's lowest panel (a last row may be short)
        lowest = axes[max(r for r in range(rows) if r * columns + column < len(methods)), column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy, %", fontsize=8)
    target = "" if section.target is None else f"; dotted: target {100 * section.target:.2f}%"
    fig.suptitle(f"{section.title}: test accuracy {against}\n(line: mean over {usual} seeds; band: their min-max"
                 f"{target})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, f"{section.slug}-{stem}")


def accuracy_curves(section: Section, out: Path) -> list[Path]:
    return _curve_panels(section, out, _compute_spent, "compute spent, fraction of the full-data run",
                         "during training", "curves")


def accuracy_vs_steps(section: Section, out: Path) -> list[Path]:
    """Online selection compares methods at equal steps: each step trains on the same number of examples."""
    return _curve_panels(section, out, _steps, "optimiser steps", "against steps", "curves-steps")


def accuracy_vs_kept(section: Section, out: Path) -> list[Path]:
    rows = fraction_rows(section)
    colours = _colours(list(rows))
    fig = Figure(figsize=(WIDTH, 4.4))
    ax = fig.add_subplot()
    for name, cells in rows.items():
        points = sorted((f, row) for f, row in cells.items() if row.acc_mean == row.acc_mean)
        kept = [100 * f for f, _ in points]
        acc = [100 * row.acc_mean for _, row in points]
        std = [_std(row.acc_std) for _, row in points]
        first = points[0][1]
        words = ", ".join(value_words(first.method, k, v) for k, v in first.shown.items() if k != "fraction")
        ax.errorbar(kept, acc, yerr=std, marker="o", capsize=3, linewidth=1, color=colours[name],
                    label=_entry(first.method, words), linestyle="--" if name.startswith("uniform") else "-")
    if section.full_mean == section.full_mean:
        ax.axhline(100 * section.full_mean, color="grey", linestyle=":", linewidth=1,
                   label=f"full data ({100 * section.full_mean:.2f}%)")
    ax.set_xlabel("training set kept, %")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(f"{section.title}: accuracy vs data kept (budget: {section.budget})", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_beside(ax)
    return save_figure(fig, out, f"{section.slug}-accuracy-vs-kept")


def class_means(section: Section) -> tuple[list[str], np.ndarray]:
    """(row names, [rows, classes] mean test accuracy % over seeds) of the settings whose runs keep
    per-class accuracy, in table order; NaN where no seed has the class."""
    names = setting_names(section.summary)
    labels, means, seeds = [], [], []
    runs = section.runs[section.runs["class_acc"].map(lambda c: bool(c))]
    width = max((len(c) for c in runs["class_acc"]), default=0)
    for row in section.summary.itertuples():
        mine = runs[(runs["method"] == row.method) & (runs["setting"] == row.setting)]["class_acc"]
        if not len(mine):
            continue
        table = np.full((len(mine), width), np.nan)
        for i, accs in enumerate(mine):
            table[i, :len(accs)] = [np.nan if a is None else 100 * a for a in accs]
        counts = np.sum(~np.isnan(table), axis=0)
        sums = np.nansum(table, axis=0)
        means.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
        labels.append(_entry(row.method, names[(row.method, row.setting)]))
        seeds.append(len(mine))
    usual = usual_seeds(seeds)
    labels = [label + _seeds_note(n, usual) for label, n in zip(labels, seeds)]
    return labels, np.array(means).reshape(len(means), width)


def per_class(section: Section, out: Path) -> list[Path]:
    labels, means = class_means(section)
    if not labels:
        return []
    rows, classes = means.shape
    fig = Figure(figsize=(max(WIDTH, 1.5 + 0.45 * classes), 1.2 + 0.3 * rows))
    ax = fig.add_subplot()
    image = ax.imshow(means, aspect="auto", cmap="viridis", vmin=np.nanmin(means), vmax=np.nanmax(means))
    if classes <= 20 and rows <= 60:  # the numbers fit their cells
        middle = (np.nanmin(means) + np.nanmax(means)) / 2
        for r in range(rows):
            worst = np.nanargmin(means[r]) if not np.all(np.isnan(means[r])) else -1
            for c in range(classes):
                if means[r, c] == means[r, c]:
                    ax.text(c, r, f"{means[r, c]:.0f}", ha="center", va="center", fontsize=6,
                            color="black" if means[r, c] > middle else "white",
                            fontweight="bold" if c == worst else "normal")
    ax.set_yticks(range(rows), labels, fontsize=7)
    ax.set_xticks(range(classes), [str(c) for c in range(classes)], fontsize=7)
    ax.set_xlabel("class (index in the dataset's label order)")
    ax.set_title(f"{section.title}: test accuracy per class, % (mean over seeds; bold: the row's worst class)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02).ax.tick_params(labelsize=7)
    return save_figure(fig, out, f"{section.slug}-per-class")


def plot_stems(section: Section) -> list[tuple[str, str, bool]]:
    """(file stem, what it shows, whether it is a wide figure of panels) of each plot write_plots makes of a
    section, in its order."""
    stems = [("accuracy-vs-compute", "Test accuracy against compute: ringed points and the dashed step line are "
                                     "the Pareto front (the best accuracy for at most that compute)."),
             ("curves", "Test accuracy along training against compute spent, one panel per method: mean over "
                        "seeds (line) and their min-max (band); dashed grey: the full-data mean.")]
    if section.has_steps:
        stems.append(("curves-steps", "The same curves against optimiser steps."))
    if fraction_rows(section) is not None:
        stems.append(("accuracy-vs-kept", "Test accuracy against the fraction of the training set kept."))
    if section.has_classes:
        stems.append(("per-class", "Mean test accuracy per class and setting (bold: each row's worst class)."))
    return [(f"{section.slug}-{stem}", text, stem.startswith("curves")) for stem, text in stems]


def write_plots(sections: list[Section], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for section in sections:
        written += accuracy_vs_compute(section, out)
        written += accuracy_curves(section, out)
        if section.has_steps:
            written += accuracy_vs_steps(section, out)
        if fraction_rows(section) is not None:
            written += accuracy_vs_kept(section, out)
        if section.has_classes:
            written += per_class(section, out)
    return written
