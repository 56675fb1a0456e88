"""Run records -> pandas -> one Markdown table per protocol.

Numbers come only from records: mean +- std over seeds with n, the difference to the full-data
mean, the compute fraction (train + selection over the computed full-data cost) and the share of
that compute spent choosing data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .record import load_records


def params_label(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "-"


def records_frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        if r["status"] != "complete":
            continue
        compute = r.get("compute") or {}
        metrics = r.get("metrics") or {}
        rows.append({
            "protocol": r["protocol"], "method": r["method"], "setting": params_label(r["params"]),
            "overrides": json.dumps(r.get("overrides") or {}, sort_keys=True), "seed": r["seed"],
            "budget": r.get("budget"), "test_acc": metrics.get("test_acc"),
            "worst_group_acc": metrics.get("test_worst_group_acc"),
            "fraction": compute.get("fraction"), "selection_share": compute.get("selection_share"),
            "wall_clock_s": r.get("wall_clock_s"), "run_id": r["run_id"],
        })
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, overrides, method, setting) with mean/std/n over seeds."""
    keys = ["protocol", "overrides", "budget", "method", "setting"]
    grouped = frame.groupby(keys, dropna=False, sort=False)
    summary = grouped.agg(n=("seed", "nunique"), acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"),
                          fraction=("fraction", "mean"), selection_share=("selection_share", "mean"),
                          wall_clock_s=("wall_clock_s", "mean")).reset_index()
    full = summary[summary["method"] == "full"].set_index(["protocol", "overrides"])["acc_mean"]
    summary["delta_vs_full"] = [
        row.acc_mean - full.get((row.protocol, row.overrides), float("nan")) for row in summary.itertuples()]
    return summary.sort_values(["protocol", "overrides", "fraction", "method"], ascending=[True, True, False, True])


def _pct(value: float, digits: int = 2) -> str:
    return "" if pd.isna(value) else f"{100 * value:.{digits}f}"


def markdown_table(summary: pd.DataFrame) -> str:
    lines = ["| method | setting | n | test acc % (mean ± std) | Δ vs full (pp) | compute fraction | "
             "selection share | wall-clock s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary.itertuples():
        std = "" if pd.isna(row.acc_std) else f" ± {100 * row.acc_std:.2f}"
        delta = "" if pd.isna(row.delta_vs_full) else f"{100 * row.delta_vs_full:+.2f}"
        lines.append(f"| {row.method} | {row.setting} | {row.n} | {_pct(row.acc_mean)}{std} | {delta} | "
                     f"{row.fraction:.3f} | {_pct(row.selection_share, 1)}% | {row.wall_clock_s:.0f} |")
    return "\n".join(lines)


def build_tables(runs_folder: str | Path) -> tuple[dict[str, str], list[str]]:
    """Markdown text per protocol (a section per set of overrides), plus one line per unreadable record."""
    records, problems = load_records(runs_folder)
    frame = records_frame(records)
    tables = {}
    if frame.empty:
        return tables, problems
    for (protocol, overrides, budget), group in summarise(frame).groupby(["protocol", "overrides", "budget"],
                                                                         sort=True):
        title = protocol if overrides == "{}" else f"{protocol} {overrides}"
        heading = (f"### {title}\n\nBudget: {budget}. Test accuracy at the last epoch; compute fraction = "
                   "(train + selection FLOPs) / full-data FLOPs; evaluation passes excluded.\n\n")
        tables[protocol] = tables.get(protocol, "") + heading + markdown_table(group) + "\n\n"
    return tables, problems


def write_tables(runs_folder: str | Path, out: str | Path) -> list[Path]:
    tables, problems = build_tables(runs_folder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for protocol, text in tables.items():
        path = out / f"{protocol}.md"
        path.write_text(text)
        written.append(path)
    return written
