"""Plots per table section (protocol + overrides), as PNG and PDF:

- <slug>-accuracy-vs-saved: test accuracy against compute saved (1 - fraction), one point per method
  setting with std error bars over seeds, the full-data mean as a horizontal line;
- <slug>-curves: test accuracy against compute spent (fraction of the full-data run) along training,
  one line per run, one colour per method setting;
- <slug>-curves-steps (when the curves record optimiser steps): the same lines against steps;
- <slug>-accuracy-vs-kept (when methods keeping a fixed fraction ran at two or more fractions): test
  accuracy against the fraction of the training set kept, one line per method.

Figures are drawn with matplotlib's object API (no pyplot, no global backend switch) and saved
without timestamps, so regenerating unchanged data gives unchanged files.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from benchmarks.reporting.tables import Section, fraction_rows

FORMATS = ("png", "pdf")
_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None}}


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


def _label(method: str, label: str) -> str:
    return method if label in ("-", "defaults") else f"{method} ({label})"


def _point_labels(summary) -> dict:
    """Per (method, setting): only the shown parameters whose values differ between the method's points.

    The legend names the method; a point needs only what tells it apart from the method's other
    points (a parameter every point shares, such as score_runs=2, would only crowd the plot).
    """
    labels = {}
    for method, group in summary.groupby("method"):
        keys = {k for shown in group["shown"] for k in shown}
        varying = sorted(k for k in keys if len({repr(shown.get(k)) for shown in group["shown"]}) > 1)
        for row in group.itertuples():
            labels[(method, row.setting)] = ", ".join(f"{k}={row.shown[k]}" for k in varying if k in row.shown)
    return labels


def _finish_accuracy_axes(ax, section: Section, xlabel: str, against: str, full_line: str) -> None:
    """The full-data mean as a horizontal line, labels, grid and legend of an accuracy-vs-x plot."""
    if section.full_mean == section.full_mean:  # not NaN
        ax.axhline(100 * section.full_mean, color="grey", linestyle=full_line, linewidth=1,
                   label=f"full data ({100 * section.full_mean:.2f}%)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title(f"{section.title}: accuracy vs {against} (budget: {section.budget})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def accuracy_vs_saved(section: Section, out: Path) -> list[Path]:
    summary = section.summary.dropna(subset=["acc_mean", "fraction"])
    short = _point_labels(summary)
    methods = sorted(summary["method"].unique())
    colours = _colours(methods)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    seen = set()
    for row in summary.itertuples():
        saved = 100 * (1 - row.fraction)
        std = 0.0 if row.acc_std != row.acc_std else 100 * row.acc_std  # NaN (one seed): no bar
        ax.errorbar(saved, 100 * row.acc_mean, yerr=std, fmt="o", capsize=3, color=colours[row.method],
                    label=None if row.method in seen else row.method)
        seen.add(row.method)
        if short.get((row.method, row.setting)):
            ax.annotate(short[(row.method, row.setting)], (saved, 100 * row.acc_mean), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=colours[row.method])
    _finish_accuracy_axes(ax, section, "compute saved, % of the full-data run (train + selection FLOPs)",
                          "compute saved", full_line="--")
    return save_figure(fig, out, f"{section.slug}-accuracy-vs-saved")


def _run_curves(section: Section, out: Path, x_of, xlabel: str, against: str, stem: str) -> list[Path]:
    """Test accuracy along training, one line per run, one colour per method setting; x = x_of(run, row)
    (None drops the point)."""
    runs = section.runs.sort_values(["method", "setting", "seed"])
    labels = list(dict.fromkeys(_label(m, s) for m, s in zip(runs["method"], runs["label"])))
    colours = _colours(labels)
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    seen = set()
    for run in runs.itertuples():
        points = [(x_of(run, row), 100 * row["test_acc"]) for row in run.curve if "test_acc" in row]
        points = [(x, y) for x, y in points if x is not None]
        if not points:
            continue
        label = _label(run.method, run.label)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=".", linewidth=1, color=colours[label], label=None if label in seen else label)
        seen.add(label)
    if section.target is not None:
        ax.axhline(100 * section.target, color="grey", linestyle=":", linewidth=1,
                   label=f"target ({100 * section.target:.2f}%)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy, %")
    ax.set_title(f"{section.title}: test accuracy {against} (one line per run)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out, f"{section.slug}-{stem}")


def _compute_spent(run, row) -> float | None:
    full = run.full_flops
    return row["flops"] / full if "flops" in row and full and full == full else None


def accuracy_curves(section: Section, out: Path) -> list[Path]:
    return _run_curves(section, out, _compute_spent,
                       "compute spent, fraction of the full-data run (train + selection FLOPs)",
                       "during training", "curves")


def accuracy_vs_steps(section: Section, out: Path) -> list[Path]:
    """Online selection compares methods at equal steps: each step trains on the same number of examples."""
    return _run_curves(section, out, lambda run, row: row.get("step"), "optimiser steps", "against steps",
                       "curves-steps")


def accuracy_vs_kept(section: Section, out: Path) -> list[Path]:
    rows = fraction_rows(section)
    colours = _colours(list(rows))
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for name, cells in rows.items():
        points = sorted((f, row) for f, row in cells.items() if row.acc_mean == row.acc_mean)
        kept = [100 * f for f, _ in points]
        acc = [100 * row.acc_mean for _, row in points]
        std = [0.0 if row.acc_std != row.acc_std else 100 * row.acc_std for _, row in points]
        ax.errorbar(kept, acc, yerr=std, marker="o", capsize=3, linewidth=1, color=colours[name], label=name,
                    linestyle="--" if name.startswith("uniform") else "-")
    _finish_accuracy_axes(ax, section, "training set kept, %", "data kept", full_line=":")
    return save_figure(fig, out, f"{section.slug}-accuracy-vs-kept")


def write_plots(sections: list[Section], out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for section in sections:
        written += accuracy_vs_saved(section, out)
        written += accuracy_curves(section, out)
        if section.has_steps:
            written += accuracy_vs_steps(section, out)
        if fraction_rows(section) is not None:
            written += accuracy_vs_kept(section, out)
    return written
