"""Run records -> pandas -> one table per protocol, in Markdown and in LaTeX (booktabs).

Numbers come only from records: mean +- std over seeds (sample std) with n, the difference to the
full-data mean, the compute fraction (train + selection over the computed full-data cost), the
share of that compute spent choosing data, wall-clock, and the compute needed to reach a target
accuracy (the full-data mean minus a tolerance), read off each run's curve.

A table is built per section: one protocol with one set of overrides. Rows sort by compute saved,
most first; the full-data row is among them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .record import load_records

FULL_METHOD = "full"
DEFAULT_TOLERANCE = 0.01  # target = full-data mean test accuracy - 1 pp
_EPS = 1e-9  # accuracies are ratios of counts; this only absorbs float rounding in "mean - tolerance"

RUN_COLUMNS = ["protocol", "overrides", "budget", "selection_rule", "method", "setting", "seed", "test_acc",
               "worst_group_acc", "fraction", "selection_share", "full_flops", "wall_clock_s", "scores_cached",
               "curve", "run_id", "path"]


def params_label(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def overrides_label(overrides_json: str) -> str:
    overrides = json.loads(overrides_json)
    return " ".join(f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in sorted(overrides.items()))


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _run_row(r: dict) -> dict:
    compute = r.get("compute") or {}
    metrics = r.get("metrics") or {}
    resolved = r.get("resolved_protocol") or {}
    stats = r.get("method_stats") or {}
    curve = r.get("curve") or []
    if not isinstance(curve, list) or not all(isinstance(row, dict) for row in curve):
        raise TypeError("'curve' is not a list of rows")
    return {
        "protocol": str(r["protocol"]), "overrides": json.dumps(r.get("overrides") or {}, sort_keys=True),
        "budget": r.get("budget") or resolved.get("budget") or "unknown",
        "selection_rule": resolved.get("selection_rule") or "last-epoch",
        "method": str(r["method"]), "setting": params_label(r["params"]), "seed": r["seed"],
        "test_acc": _number(metrics.get("test_acc")),
        "worst_group_acc": _number(metrics.get("test_worst_group_acc")),
        "fraction": _number(compute.get("fraction")), "selection_share": _number(compute.get("selection_share")),
        "full_flops": _number(compute.get("full_flops")), "wall_clock_s": _number(r.get("wall_clock_s")),
        "scores_cached": bool(stats.get("scores_cached")) if isinstance(stats, dict) else False,
        "curve": curve, "run_id": str(r["run_id"]), "path": r.get("_path") or r["run_id"],
    }


def records_frame(records: list[dict], problems: list[str] | None = None) -> pd.DataFrame:
    """One row per complete record. A record whose fields are malformed is skipped with a problem line;
    a second record of the same run id (a copied folder) is skipped too."""
    rows, seen = [], {}
    for r in records:
        if r.get("status") != "complete":
            continue
        try:
            row = _run_row(r)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if problems is not None:
                problems.append(f"{r.get('_path') or r.get('run_id', '?')}: malformed record "
                                f"({type(exc).__name__}: {exc})")
            continue
        if row["run_id"] in seen:
            if problems is not None:
                problems.append(f"{row['path']}: duplicate of run {row['run_id']} (also at {seen[row['run_id']]}); "
                                "ignored")
            continue
        seen[row["run_id"]] = row["path"]
        rows.append(row)
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def compute_to_target(curve: list[dict], target: float | None, full_flops: float) -> float:
    """Compute fraction at the first evaluated epoch whose test accuracy reaches the target; NaN if none."""
    if target is None or math.isnan(target) or not full_flops or math.isnan(full_flops):
        return float("nan")
    for row in curve:
        acc = row.get("test_acc")
        if acc is not None and acc >= target - _EPS:
            return row["flops"] / full_flops
    return float("nan")


@dataclass
class Section:
    """One table: the runs of one protocol under one set of overrides, summarised over seeds."""

    protocol: str
    overrides: str  # JSON, sorted keys
    budget: str
    runs: pd.DataFrame  # one row per run, with its time to target
    summary: pd.DataFrame  # one row per (method, setting), sorted by compute saved
    full_mean: float  # NaN without a full-data run
    target: float | None
    tolerance: float
    selection_rules: list[str]

    @property
    def title(self) -> str:
        return self.protocol if self.overrides == "{}" else f"{self.protocol}, {overrides_label(self.overrides)}"

    @property
    def slug(self) -> str:
        if self.overrides == "{}":
            return self.protocol
        extra = "_".join(f"{k}-{v}" for k, v in sorted(json.loads(self.overrides).items()))
        return re.sub(r"[^A-Za-z0-9._=-]+", "", f"{self.protocol}_{extra}")[:120]

    @property
    def has_groups(self) -> bool:
        return bool(self.summary["wg_mean"].notna().any())

    @property
    def scores_cached(self) -> bool:
        return bool(self.runs["scores_cached"].any())

    def notes(self) -> list[str]:
        budget = {"epochs": "epochs (a subset gets fewer steps)",
                  "iterations": "iterations (a subset keeps the full-data number of steps)"}.get(self.budget,
                                                                                              self.budget)
        rules = [r for r in self.selection_rules if r != "last-epoch"]
        reported = ("the last epoch (no model selection on the test set)" if not rules else
                    "the epoch chosen on validation by the protocol's rule " + ", ".join(f"'{r}'" for r in rules))
        notes = [f"Budget: {budget}.", f"Reported: {reported}.",
                 "Compute fraction = (train + selection FLOPs) / FLOPs of the full-data run (computed, not run); "
                 "evaluation passes excluded. Selection share = the part of it spent choosing data. "
                 "Rows sorted by compute saved, most first."]
        if self.target is None:
            notes.append("No full-data run: no target accuracy, so no compute to target.")
        else:
            notes.append(f"Compute to target = compute fraction at the first evaluated epoch with test acc "
                         f">= {100 * self.target:.2f}% (full-data mean {100 * self.full_mean:.2f}% - "
                         f"{100 * self.tolerance:.2f} pp), mean over the seeds that reach it; "
                         "reached = seeds reaching it / seeds.")
        if self.scores_cached:
            notes.append("Some runs reused cached scores: their scoring cost is still charged to each run "
                         "as selection compute.")
        return notes


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, setting): mean/std (ddof=1)/n over seeds, sorted by compute saved, most first."""
    summary = runs.groupby(["method", "setting"], sort=False).agg(
        n=("seed", "count"), acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"),
        wg_mean=("worst_group_acc", "mean"), wg_std=("worst_group_acc", "std"),
        fraction=("fraction", "mean"), selection_share=("selection_share", "mean"),
        wall_clock_s=("wall_clock_s", "mean"), to_target=("to_target", "mean"),
        reached=("to_target", "count")).reset_index()
    return summary.sort_values(["fraction", "method", "setting"], na_position="last").reset_index(drop=True)


def build_sections(records: list[dict], problems: list[str] | None = None,
                   tolerance: float = DEFAULT_TOLERANCE) -> list[Section]:
    frame = records_frame(records, problems)
    sections = []
    for (protocol, overrides, budget), runs in frame.groupby(["protocol", "overrides", "budget"], sort=True):
        full = runs.loc[runs["method"] == FULL_METHOD, "test_acc"].dropna()
        full_mean = float(full.mean()) if len(full) else float("nan")
        target = full_mean - tolerance if len(full) else None
        runs = runs.assign(to_target=[compute_to_target(c, target, f) for c, f in zip(runs["curve"], runs["full_flops"])])
        summary = summarise(runs)
        summary["delta_vs_full"] = summary["acc_mean"] - full_mean
        sections.append(Section(protocol, overrides, budget, runs, summary, full_mean, target, tolerance,
                                sorted(runs["selection_rule"].unique())))
    return sections


# ----- rendering -----

def _pct(value: float, digits: int = 2) -> str:
    return "" if pd.isna(value) else f"{100 * value:.{digits}f}"


def _mean_std(mean: float, std: float, plus_minus: str = "±") -> str:
    if pd.isna(mean):
        return ""
    return _pct(mean) + ("" if pd.isna(std) else f" {plus_minus} {100 * std:.2f}")


def _cells(section: Section, row, plus_minus: str = "±") -> list[str]:
    cells = [row.method, row.setting, str(row.n), _mean_std(row.acc_mean, row.acc_std, plus_minus)]
    if section.has_groups:
        cells.append(_mean_std(row.wg_mean, row.wg_std, plus_minus))
    cells += ["" if pd.isna(row.delta_vs_full) else f"{100 * row.delta_vs_full:+.2f}",
              "" if pd.isna(row.fraction) else f"{row.fraction:.3f}",
              _pct(row.selection_share, 1),
              "" if pd.isna(row.wall_clock_s) else f"{row.wall_clock_s:.1f}",
              "" if pd.isna(row.to_target) else f"{row.to_target:.3f}",
              "" if section.target is None else f"{row.reached}/{row.n}"]
    return cells


def _headers(section: Section) -> list[str]:
    headers = ["method", "setting", "n", "test acc % (mean ± std)"]
    if section.has_groups:
        headers.append("worst-group acc % (mean ± std)")
    return headers + ["Δ vs full (pp)", "compute fraction", "selection share %", "wall-clock s",
                      "compute to target", "reached"]


def markdown_section(section: Section) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    headers = _headers(section)
    lines = [f"### {section.title}", "", line(headers), "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|"]
    lines += [line(_cells(section, row)) for row in section.summary.itertuples()]
    lines.append("")
    lines += [f"- {note}" for note in section.notes()]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "≥": r"$\geq$", "<": r"$<$", ">": r"$>$"}


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX text mode; adjacent math pieces merge into one."""
    text = str(text).replace(">=", "≥")
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace("$$", "")


def latex_section(section: Section) -> str:
    headers = _headers(section)
    rows = []
    for row in section.summary.itertuples():
        cells = [latex_escape(c) for c in _cells(section, row)]
        rows.append(" & ".join(cells) + r" \\")
    notes = " ".join(latex_escape(n) for n in section.notes())
    label = re.sub(r"[^A-Za-z0-9-]+", "-", section.slug)
    return "\n".join([
        r"\begin{table}[ht]", r"\centering", r"\small",
        rf"\caption{{{latex_escape(section.title)}: test accuracy (mean $\pm$ std over seeds) and compute.}}",
        rf"\label{{tab:{label}}}",
        r"\begin{tabular}{ll" + "r" * (len(headers) - 2) + "}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in headers) + r" \\",
        r"\midrule",
        *rows,
        r"\bottomrule",
        r"\end{tabular}",
        r"\par\smallskip",
        rf"\parbox{{\linewidth}}{{\footnotesize {notes}}}",
        r"\end{table}",
    ]) + "\n"


def _per_protocol(sections: list[Section], render, separator: str) -> dict[str, str]:
    texts: dict[str, list[str]] = {}
    for section in sections:
        texts.setdefault(section.protocol, []).append(render(section))
    return {protocol: separator.join(parts) for protocol, parts in texts.items()}


def markdown_tables(sections: list[Section]) -> dict[str, str]:
    return _per_protocol(sections, markdown_section, "\n")


def latex_tables(sections: list[Section]) -> dict[str, str]:
    header = "% Generated by `python -m benchmarks tables` from the run records; needs \\usepackage{booktabs}.\n"
    return {p: header + text for p, text in _per_protocol(sections, latex_section, "\n").items()}


def build_tables(runs_folder: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> tuple[dict[str, str], list[str]]:
    """Markdown text per protocol (a section per set of overrides), plus one line per unreadable record."""
    records, problems = load_records(runs_folder)
    return markdown_tables(build_sections(records, problems, tolerance)), problems


def write_tables(sections: list[Section], out: str | Path) -> list[Path]:
    """<protocol>.md and <protocol>.tex per protocol."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, texts in ((".md", markdown_tables(sections)), (".tex", latex_tables(sections))):
        for protocol, text in texts.items():
            path = out / f"{protocol}{suffix}"
            path.write_text(text)
            written.append(path)
    return written
