"""Run records -> pandas -> one table per protocol, in Markdown and in LaTeX (booktabs).

Numbers come only from records: mean +- std over seeds (sample std) with n, the difference to the
full-data mean, the compute fraction (train + selection over the computed full-data cost), the
share of that compute spent choosing data, wall-clock, and the compute (and, where the curves record
them, the optimiser steps) needed to reach a target accuracy (the full-data mean minus a tolerance),
read off each run's curve.

A table is built per section: one protocol with one set of overrides. Rows sort by compute saved,
most first; the full-data row is among them. A row's setting names only the parameters a reader
needs: the method's headline parameter (Method.traits.headline_params) and those that differ from its
defaults or between its rows (each record keeps the full set). Where methods keep a fixed `fraction` of the data at two or more fractions, a second
table puts them side by side: one row per method, one column per fraction kept.

Tuned sweeps (benchmarks/jobs/tuning.py): a selected run is a row like any other, in the section of
the overrides it would have had untuned (its drawn protocol settings are shown in its setting), with
"tuned: N trials on <metric>" and its tuning compute (the trials' compute fractions summed) in their
own columns; trial runs are never rows of the compared table: a small "tuning trials" table lists
them. Those columns and that table appear only in sections holding tuned records.

Columns that only some records can fill appear only in sections whose records have them: worst-class
accuracy (records that keep per-class accuracy, `metrics.test_class_acc`) and the amortised compute
fraction (records that list the cached work they charged, `compute.artefacts`; see amortised_flops).
The same tables are also written as CSV (write_csv; the columns are documented in README.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmarks.core import catalog
from benchmarks.core.record import current_records, load_records, params_label, reference_of

RULE_MEANING = {"best-val-worst-group": "the evaluated epoch with the highest validation worst-group accuracy; "
                                        "every test number is that epoch's"}
FULL_METHOD = "full"  # the reference of supervised protocols; a record names its own (compute.reference)
DEFAULT_TOLERANCE = 0.01  # target = full-data mean test accuracy - 1 pp
_EPS = 1e-9  # accuracies are ratios of counts; this only absorbs float rounding in "mean - tolerance"

RUN_COLUMNS = ["protocol", "overrides", "budget", "selection_rule", "reference", "method", "setting", "seed",
               "test_acc",
               "worst_group_acc", "adjusted_avg_acc", "oracle", "fraction", "selection_share", "full_flops",
               "wall_clock_s", "cached_s", "scores_cached", "curve", "run_id", "path", "params", "fingerprint",
               "role", "tuning", "drawn", "metrics", "class_acc", "worst_class_acc", "total_flops", "artefacts"]
TRIAL, SELECTED = "trial", "selected"  # the roles of a tuned sweep's runs (benchmarks/jobs/tuning.py)


def overrides_label(overrides_json: str) -> str:
    overrides = json.loads(overrides_json)
    return " ".join(f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in sorted(overrides.items()))


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def worst_class(class_acc) -> float:
    """The lowest per-class accuracy (classes the split lacks, None, left out); NaN without any."""
    present = [float(a) for a in class_acc or () if a is not None]
    return min(present) if present else float("nan")


def _artefacts(compute: dict) -> tuple:
    pieces = compute.get("artefacts") or []
    if not isinstance(pieces, list):
        raise TypeError("'compute.artefacts' is not a list")
    return tuple((str(piece["key"]), float(piece["flops"])) for piece in pieces)


def _run_row(r: dict) -> dict:
    compute = r.get("compute") or {}
    metrics = r.get("metrics") or {}
    resolved = r.get("resolved_protocol") or {}
    stats = r.get("method_stats") or {}
    curve = r.get("curve") or []
    if not isinstance(curve, list) or not all(isinstance(row, dict) for row in curve):
        raise TypeError("'curve' is not a list of rows")
    tuning = r.get("tuning") or None
    if tuning is not None and (not isinstance(tuning, dict) or tuning.get("role") not in (TRIAL, SELECTED)):
        raise TypeError("'tuning' is not a trial's or a selected run's descriptor")
    overrides = r.get("overrides") or {}
    fingerprint = str(r.get("protocol_fingerprint") or "")
    setting = params_label(r["params"])
    drawn: dict = {}
    if tuning is not None:
        # A tuned run belongs with the runs of the overrides it would have had untuned; the protocol
        # settings drawn for it are part of its setting instead.
        drawn = {k: overrides.get(k) for k in tuning.get("tuned_overrides") or []}
        overrides = tuning.get("base_overrides") or {}
        fingerprint = str(tuning.get("base_fingerprint") or "") if fingerprint else ""
        if tuning["role"] == SELECTED:  # never merged with an untuned row of the same parameters
            setting += f" | {params_label(drawn)} | {tuning_label(tuning)}"
    return {
        "protocol": str(r["protocol"]), "overrides": json.dumps(overrides, sort_keys=True),
        "budget": r.get("budget") or resolved.get("budget") or "unknown",
        "selection_rule": resolved.get("selection_rule") or "last-epoch",
        "reference": reference_of(r),
        "method": str(r["method"]), "setting": setting, "seed": r["seed"],
        "test_acc": _number(metrics.get("test_acc")),
        "worst_group_acc": _number(metrics.get("test_worst_group_acc")),
        "adjusted_avg_acc": _number(metrics.get("test_adjusted_avg_acc")),
        "oracle": bool(r.get("reads_train_groups")),  # read training group labels (Group DRO): a reference
        "fraction": _number(compute.get("fraction")), "selection_share": _number(compute.get("selection_share")),
        "full_flops": _number(compute.get("full_flops")),
        # Charged seconds, as FLOPs are charged: the run's own wall-clock plus what the cached work it
        # reused (proxies, scores) took when it was computed; cached_s is that reused part.
        "wall_clock_s": _number(r.get("wall_clock_s")) + _number(r.get("cached_seconds") or 0.0),
        "cached_s": _number(r.get("cached_seconds") or 0.0),
        "scores_cached": bool(stats.get("scores_cached")) if isinstance(stats, dict) else False,
        "curve": curve, "run_id": str(r["run_id"]), "path": r.get("_path") or r["run_id"],
        "params": dict(r["params"]),
        "fingerprint": fingerprint,
        "role": tuning["role"] if tuning else "", "tuning": tuning, "drawn": drawn, "metrics": dict(metrics),
        "class_acc": metrics.get("test_class_acc"), "worst_class_acc": worst_class(metrics.get("test_class_acc")),
        "total_flops": _number(compute.get("total_flops")), "artefacts": _artefacts(compute),
    }


def tuning_label(tuning: dict) -> str:
    """'tuned: 6 trials on val_worst_group_acc' for a selected run's descriptor."""
    lowest = " (lowest)" if tuning.get("direction") == "min" else ""
    return f"tuned: {tuning.get('of')} trials on {tuning.get('metric')}{lowest}"


def records_frame(records: list[dict], problems: list[str] | None = None) -> pd.DataFrame:
    """One row per complete record. A record whose fields are malformed is skipped with a problem line;
    a second record of the same run id (a copied folder) is skipped too."""
    rows, seen = [], {}
    for r in current_records(records, problems if problems is not None else []):
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


def steps_to_target(curve: list[dict], target: float | None) -> float:
    """Optimiser steps at the first evaluated epoch whose test accuracy reaches the target; NaN if none."""
    if target is None or math.isnan(target):
        return float("nan")
    for row in curve:
        acc = row.get("test_acc")
        if acc is not None and acc >= target - _EPS and "step" in row:
            return float(row["step"])
    return float("nan")


def amortised_flops(runs: pd.DataFrame) -> pd.Series:
    """Per run: its train + selection FLOPs with the cached work shared inside `runs` paid once.

    A run's record lists the pieces of cached work it charged (`compute.artefacts`: {key, flops}; a
    proxy, a score file). Piece `a` of F_a FLOPs, listed by n_a of the runs, costs F_a once, divided
    among them: amortised = total - sum of its listed pieces' F + sum over its distinct keys of F_a / n_a.
    A run that charged `a` twice still bears F_a / n_a once. Runs without pieces keep their total.
    """
    users: dict[str, set] = {}
    for rid, pieces in zip(runs["run_id"], runs["artefacts"]):
        for key, _ in pieces:
            users.setdefault(key, set()).add(rid)
    amortised = []
    for total, pieces in zip(runs["total_flops"], runs["artefacts"]):
        shares = {key: flops / len(users[key]) for key, flops in pieces}
        amortised.append(total - sum(flops for _, flops in pieces) + sum(shares.values()))
    return pd.Series(amortised, index=runs.index, dtype=float)


def has_steps(runs: pd.DataFrame) -> bool:
    """Whether the runs' curves record optimiser steps (every record written by the trainer does)."""
    return any("step" in row for curve in runs["curve"] for row in curve)


@dataclass
class Section:
    """One table: the runs of one protocol under one set of overrides, summarised over seeds."""

    protocol: str
    overrides: str  # JSON, sorted keys
    budget: str
    runs: pd.DataFrame  # one row per run, with its time to target
    summary: pd.DataFrame  # one row per (method, setting), sorted by compute saved
    full_mean: float  # the reference method's mean; NaN without a reference run
    target: float | None
    tolerance: float
    selection_rules: list[str]
    reference: str = FULL_METHOD  # the method at full budget that "Δ vs full" and the target refer to
    # Set when records of this protocol name come from protocol files of different contents (an edited
    # file): the fingerprint's start tells the versions apart, so none is reported under another's name.
    variant: str = ""
    code_note: str = ""  # set when the runs come from different code (code_mix_note)
    trials: pd.DataFrame | None = None  # a tuned sweep's trial runs: listed apart, never compared

    @property
    def has_tuning(self) -> bool:
        return (self.trials is not None and len(self.trials) > 0) or bool((self.summary["tuning"] != "").any())

    @property
    def title(self) -> str:
        name = self.protocol + (f" [protocol version {self.variant}]" if self.variant else "")
        return name if self.overrides == "{}" else f"{name}, {overrides_label(self.overrides)}"

    @property
    def slug(self) -> str:
        name = self.protocol + (f"_v{self.variant}" if self.variant else "")
        if self.overrides == "{}":
            return name
        extra = "_".join(f"{k}-{v}" for k, v in sorted(json.loads(self.overrides).items()))
        return re.sub(r"[^A-Za-z0-9._=-]+", "", f"{name}_{extra}")[:120]

    @property
    def has_classes(self) -> bool:
        return bool(self.summary["wc_mean"].notna().any())

    @property
    def has_amortised(self) -> bool:
        return bool(self.runs["artefacts"].map(len).any())

    @property
    def has_cached(self) -> bool:
        return bool((self.summary["cached_s"] > 0).any())

    @property
    def has_groups(self) -> bool:
        return bool(self.summary["wg_mean"].notna().any())

    @property
    def has_adjusted(self) -> bool:
        return bool(self.summary["adj_mean"].notna().any())

    @property
    def has_oracle(self) -> bool:
        return bool(self.summary["oracle"].any())

    @property
    def has_steps(self) -> bool:
        return has_steps(self.runs)

    @property
    def scores_cached(self) -> bool:
        return bool(self.runs["scores_cached"].any())

    def notes(self) -> list[str]:
        budget = {"epochs": "epochs (a subset gets fewer steps)",
                  "iterations": "iterations (a subset keeps the full-data number of steps)"}.get(self.budget,
                                                                                              self.budget)
        rules = [r for r in self.selection_rules if r != "last-epoch"]
        reported = ("the last epoch (no model selection on the test set)" if not rules else
                    "the epoch chosen on validation by the protocol's rule " + ", ".join(f"'{r}'" for r in rules)
                    + "".join(f" ({RULE_MEANING[r]})" for r in rules if r in RULE_MEANING))
        notes = [f"Budget: {budget}.", f"Reported: {reported}.",
                 "Compute fraction = (train + selection FLOPs) / FLOPs of the full-data run (computed, not run); "
                 "evaluation passes excluded. Selection share = the part of it spent choosing data. "
                 "Rows sorted by compute saved, most first.",
                 "Setting = the method's headline parameter and those that differ from its defaults or between its rows "
                 "(each run record holds them all)."]
        if self.reference != FULL_METHOD:
            notes.append(f"Full data = the protocol's reference method, {self.reference}, at its default parameters "
                         "(full budget): its runs give the full-data mean, its cost the compute fraction's denominator. "
                         "Evaluation (e.g. a linear probe) is metered apart: eval_flops in each record.")
        if self.target is None:
            notes.append("No full-data run: no target accuracy, so no compute to target.")
        else:
            notes.append(f"Compute to target = compute fraction at the first evaluated epoch with test acc "
                         f">= {100 * self.target:.2f}% (full-data mean {100 * self.full_mean:.2f}% - "
                         f"{100 * self.tolerance:.2f} pp), mean over the seeds that reach it; "
                         "reached = seeds reaching it / seeds.")
            if self.has_steps:
                notes.append("Steps to target = optimiser steps taken by that epoch, mean over the same seeds.")
        if self.has_groups:
            notes.append("Groups: test acc = the plain average over test examples; "
                         + ("adjusted avg = per-group test accuracies weighted by the TRAINING group proportions "
                            "(what the papers call average accuracy on Waterbirds); " if self.has_adjusted else "")
                         + "worst-group = the lowest group's test accuracy.")
        if self.has_classes:
            notes.append("Worst-class = the lowest per-class test accuracy of each run (records keep every class's: "
                         "metrics.test_class_acc), mean ± std over seeds.")
        if self.has_oracle:
            notes.append("(oracle) = the method reads training group labels (Group DRO): a reference for what "
                         "group labels buy, not a competitor; every other method never sees them.")
        if self.has_cached:
            notes.append("Wall-clock s = seconds per run (data loading and evaluation included) plus the seconds "
                         "that cached work it reused (proxy training, scores) took when it was computed, charged "
                         "as its FLOPs are; cached s = that reused part.")
        if self.scores_cached:
            notes.append("Some runs reused cached scores: their scoring cost is still charged to each run "
                         "as selection compute.")
        if self.has_tuning:
            notes += self.tuning_notes()
        if self.has_amortised:
            notes.append("Amortised = the compute fraction when cached work (proxy training, scores) is paid once "
                         "across the runs of this table that used it: each piece's FLOPs divided among them "
                         "(compute.artefacts in each record); the charged compute fraction stays the headline, "
                         "what one run costs on its own.")
        if self.code_note:
            notes.append(self.code_note)
        return notes

    def tuning_notes(self) -> list[str]:
        labels = sorted(set(self.summary["tuning"]) - {""})
        seeds = sorted({t["seed"] for t in self.runs["tuning"] if isinstance(t, dict) and "seed" in t}
                       | (set(self.trials["seed"]) if self.trials is not None else set()))
        notes = ["Tuning: a row marked tuned ran, at every seed, the setting chosen among seeded random trials "
                 "drawn from the method's declared search space (run at seed " + ", ".join(map(str, seeds))
                 + ") by the best validation metric named (ties: the lowest trial); the test split chose "
                 "nothing. Its setting shows the drawn values, protocol settings (lr, weight decay) included. "
                 "Tuning compute = the trials' (train + selection FLOPs) / FLOPs of the full-data run, summed "
                 "over the trials: spent once for the row, apart from its compute fraction. The trials are "
                 "listed apart (tuning trials), never compared."]
        untuned = sorted(set(self.summary.loc[self.summary["tuning"] == "", "method"]))
        if len(labels) > 1 or (labels and untuned):
            notes.append("Not every row is tuned the same way (" + "; ".join(labels)
                         + (f"; not tuned: {', '.join(untuned)}" if untuned else "")
                         + "): compare rows tuned alike.")
        if ((self.summary["method"] == self.reference) & (self.summary["tuning"] != "")).any():
            notes.append(f"Full data = the tuned {self.reference} rows (their selected setting): they give the "
                         "full-data mean and the target.")
        if self.trials is not None and len(self.trials) and not labels:
            notes.append("No setting is selected yet: the trials below wait for the rest of their tuning.")
        return notes


def _method_defaults(method: str) -> tuple[dict, tuple[str, ...]] | None:
    """A method's registered defaults and headline parameters; None for a method this checkout lacks
    (read from the catalog: tables start without importing torch)."""
    return catalog.defaults(method)


def reference_rows(runs: pd.DataFrame, reference: str) -> pd.Series:
    """The runs of the reference method at its default parameters: full BYOL is the reference of the
    self-supervised protocols, its budgeted rows are not (a method this checkout lacks: all its rows).
    Where the reference was tuned, its selected runs alone: the reference tuned as the methods are."""
    known = _method_defaults(reference)
    rows = (runs["method"] == reference) & runs["params"].map(lambda p: known is None or p == known[0])
    tuned = rows & (runs["role"] == SELECTED)
    return tuned if tuned.any() else rows


def shown_params(runs: pd.DataFrame) -> dict[tuple[str, str], dict]:
    """Per (method, setting): the method's headline parameters (such as `fraction`) and those that
    differ from its defaults or between its rows.

    Every default spelled out buries what a row is about (ten parameters for one fraction); a method
    unknown to this checkout shows everything, since its defaults cannot be told.
    """
    shown = {}
    for method, group in runs.groupby("method", sort=False):
        settings = dict(zip(group["setting"], group["params"]))
        known = _method_defaults(method)
        defaults, headline = known if known is not None else ({}, ())
        keys = sorted({k for params in settings.values() for k in params})
        always = set(headline) | {k for k in keys if len({repr(params.get(k)) for params in settings.values()}) > 1}
        for setting, params in settings.items():
            shown[(method, setting)] = {k: v for k, v in sorted(params.items())
                                        if known is None or k in always or k not in defaults or defaults[k] != v}
    return shown


def setting_label(method_params: dict, shown: dict, drawn: dict | None = None) -> str:
    """What a row's setting cell says; `drawn`: a tuned row's drawn protocol settings, named after it."""
    if drawn:
        return params_label({**shown, **drawn})
    if not method_params:
        return "-"
    return params_label(shown) if shown else "defaults"


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, setting): mean/std (ddof=1)/n over seeds, sorted by compute saved, most first."""
    summary = runs.groupby(["method", "setting"], sort=False).agg(
        params=("params", "first"), label=("label", "first"), shown=("shown", "first"),
        tuning=("tuning_label", "first"),
        n=("seed", "count"), acc_mean=("test_acc", "mean"), acc_std=("test_acc", "std"),
        wg_mean=("worst_group_acc", "mean"), wg_std=("worst_group_acc", "std"),
        adj_mean=("adjusted_avg_acc", "mean"), adj_std=("adjusted_avg_acc", "std"), oracle=("oracle", "any"),
        fraction=("fraction", "mean"), selection_share=("selection_share", "mean"),
        wc_mean=("worst_class_acc", "mean"), wc_std=("worst_class_acc", "std"),
        amortised=("amortised_fraction", "mean"),
        wall_clock_s=("wall_clock_s", "mean"), cached_s=("cached_s", "mean"), to_target=("to_target", "mean"),
        steps_to_target=("steps_to_target", "mean"), reached=("to_target", "count")).reset_index()
    return summary.sort_values(["fraction", "method", "setting"], na_position="last").reset_index(drop=True)


def code_mix_note(records: list[dict], paths) -> str:
    """A note when a section's runs (their records' paths, the frame's "path") come from different code, ""
    otherwise: each code fingerprint with its number of runs. Only records that carry one (record["code"])
    can disagree; older records are counted apart, never a mix by themselves (published tables stay as they were)."""
    from benchmarks.core.provenance import code_key, code_label

    wanted, by_key, unknown = set(paths), {}, 0
    for r in records:
        path = r.get("_path") or r.get("run_id")
        if path not in wanted:
            continue
        wanted.discard(path)  # the frame holds each path once
        if isinstance(r.get("code"), dict):
            label, count = by_key.get(code_key(r["code"]), (code_label(r["code"]), 0))
            by_key[code_key(r["code"])] = (label, count + 1)
        else:
            unknown += 1
    if len(by_key) < 2:
        return ""
    parts = [f"{label} ({count} run{'s' if count > 1 else ''})" for label, count in sorted(by_key.values())]
    if unknown:
        parts.append(f"no fingerprint ({unknown} run{'s' if unknown > 1 else ''})")
    return "Mixed code: these runs come from different code: " + "; ".join(parts) + ". Compare with care."


def build_sections(records: list[dict], problems: list[str] | None = None,
                   tolerance: float = DEFAULT_TOLERANCE) -> list[Section]:
    frame = records_frame(records, problems)
    versions = frame.groupby(["protocol", "overrides"])["fingerprint"].nunique()
    sections = []
    for (protocol, overrides, budget, version), runs in frame.groupby(["protocol", "overrides", "budget", "fingerprint"],
                                                                      sort=True):
        trials = runs[runs["role"] == TRIAL]
        runs = runs[runs["role"] != TRIAL]  # a trial is never a row: it is listed in its own table
        reference = (runs if len(runs) else trials)["reference"].iloc[0]
        full = runs.loc[reference_rows(runs, reference), "test_acc"].dropna()
        full_mean = float(full.mean()) if len(full) else float("nan")
        target = full_mean - tolerance if len(full) else None
        runs = runs.assign(to_target=[compute_to_target(c, target, f) for c, f in zip(runs["curve"], runs["full_flops"])],
                           steps_to_target=[steps_to_target(c, target) for c in runs["curve"]],
                           amortised_fraction=amortised_flops(runs) / runs["full_flops"])
        shown = shown_params(runs)
        runs = runs.assign(shown=[shown[(m, s)] for m, s in zip(runs["method"], runs["setting"])])
        runs = runs.assign(label=[setting_label(p, sh, d) for p, sh, d in zip(runs["params"], runs["shown"],
                                                                                runs["drawn"])],
                           tuning_label=[tuning_label(t) if isinstance(t, dict) else "" for t in runs["tuning"]])
        summary = summarise(runs)
        summary["delta_vs_full"] = summary["acc_mean"] - full_mean
        summary = summary.join(tuning_compute(runs, trials, summary))
        sections.append(Section(protocol, overrides, budget, runs, summary, full_mean, target, tolerance,
                                sorted(runs["selection_rule"].unique()), reference,
                                variant=version[:8] if versions[(protocol, overrides)] > 1 else "",
                                trials=trials if len(trials) else None,
                                code_note=code_mix_note(records, runs["path"])))
    return sections


def tuning_compute(runs: pd.DataFrame, trials: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Per summary row: the summed compute fraction of the trials its selection came from (NaN for an
    untuned row), and how many of its trials' records are here (the sum covers those)."""
    fractions = dict(zip(trials["run_id"], trials["fraction"]))
    descriptors = {(m, s): t for m, s, t in zip(runs["method"], runs["setting"], runs["tuning"]) if isinstance(t, dict)}
    sums, found = [], []
    for method, setting in zip(summary["method"], summary["setting"]):
        tuning = descriptors.get((method, setting))
        ids = (tuning.get("trial_runs") or []) if tuning else []
        present = [fractions[i] for i in ids if i in fractions]
        sums.append(float(sum(present)) if present else float("nan"))
        found.append((len(present), len(ids)))
    return pd.DataFrame({"tuning_compute": sums, "trials_found": found}, index=summary.index)


# ----- rendering -----

def _pct(value: float, digits: int = 2) -> str:
    return "" if pd.isna(value) else f"{100 * value:.{digits}f}"


def _mean_std(mean: float, std: float, plus_minus: str = "±") -> str:
    if pd.isna(mean):
        return ""
    return _pct(mean) + ("" if pd.isna(std) else f" {plus_minus} {100 * std:.2f}")


def _tuning_compute_cell(row) -> str:
    if pd.isna(row.tuning_compute):
        return ""
    text = f"{row.tuning_compute:.3f}"
    found, of = row.trials_found
    return text if found == of else f"{text} ({found} of {of} trials' records)"


def _cells(section: Section, row, plus_minus: str = "±") -> list[str]:
    method = f"{row.method} (oracle)" if row.oracle else row.method
    cells = [method, row.label, *([row.tuning or "not tuned"] if section.has_tuning else []), str(row.n),
             _mean_std(row.acc_mean, row.acc_std, plus_minus)]
    if section.has_adjusted:
        cells.append(_mean_std(row.adj_mean, row.adj_std, plus_minus))
    if section.has_groups:
        cells.append(_mean_std(row.wg_mean, row.wg_std, plus_minus))
    if section.has_classes:
        cells.append(_mean_std(row.wc_mean, row.wc_std, plus_minus))
    cells += ["" if pd.isna(row.delta_vs_full) else f"{100 * row.delta_vs_full:+.2f}",
              "" if pd.isna(row.fraction) else f"{row.fraction:.3f}",
              *(["" if pd.isna(row.amortised) else f"{row.amortised:.3f}"] if section.has_amortised else []),
              *([_tuning_compute_cell(row)] if section.has_tuning else []),
              _pct(row.selection_share, 1),
              "" if pd.isna(row.wall_clock_s) else f"{row.wall_clock_s:.1f}",
              *([f"{row.cached_s:.1f}"] if section.has_cached else []),
              "" if pd.isna(row.to_target) else f"{row.to_target:.3f}"]
    if section.has_steps:
        cells.append("" if pd.isna(row.steps_to_target) else f"{row.steps_to_target:.0f}")
    cells.append("" if section.target is None else f"{row.reached}/{row.n}")
    return cells


def _headers(section: Section) -> list[str]:
    headers = ["method", "setting", *(["tuning"] if section.has_tuning else []), "n", "test acc % (mean ± std)"]
    if section.has_adjusted:
        headers.append("adjusted avg acc % (mean ± std)")
    if section.has_groups:
        headers.append("worst-group acc % (mean ± std)")
    if section.has_classes:
        headers.append("worst-class acc % (mean ± std)")
    return headers + ["Δ vs full (pp)", "compute fraction",
                      *(["compute fraction, amortised"] if section.has_amortised else []),
                      *(["tuning compute"] if section.has_tuning else []),
                      "selection share %", "wall-clock s",
                      *(["cached s"] if section.has_cached else []), "compute to target"] \
        + (["steps to target"] if section.has_steps else []) + ["reached"]


def pareto_front(fraction, accuracy) -> list[bool]:
    """Per point: on the front of accuracy against compute, i.e. no other point costs at most as much and
    is at least as accurate, better in one of the two (the front = the best accuracy for at most that
    compute fraction). NaN points are never on it."""
    points = list(zip(fraction, accuracy))
    on = []
    for f, a in points:
        if f != f or a != a:
            on.append(False)
            continue
        on.append(not any(g <= f and b >= a and (g < f or b > a) for g, b in points if g == g and b == b))
    return on


FRACTION_PARAM = "fraction"


def fraction_rows(section: Section) -> dict[str, dict[float, object]] | None:
    """Methods that keep a fixed `fraction` of the data: row name -> {fraction kept: summary row}.

    A row is a method with its other shown parameters; uniform rows come first, as the reference.
    None unless some row has two or more fractions.
    """
    grid: dict[tuple[bool, str], dict[float, object]] = {}
    for row in section.summary.itertuples():
        if row.method == section.reference or not isinstance(row.params.get(FRACTION_PARAM), float):
            continue
        others = params_label({k: v for k, v in row.shown.items() if k != FRACTION_PARAM})
        name = row.method if others == "-" else f"{row.method} ({others})"
        grid.setdefault((row.method != "uniform", name), {})[row.params[FRACTION_PARAM]] = row
    if not any(len(cells) >= 2 for cells in grid.values()):
        return None
    return {name: cells for (_, name), cells in sorted(grid.items())}


def fraction_grid(section: Section) -> tuple[list[str], list[list[str]], list[str]] | None:
    """fraction_rows as a table: (headers, rows, notes), one column per fraction kept, largest first."""
    grid = fraction_rows(section)
    if grid is None:
        return None
    fractions = sorted({f for cells in grid.values() for f in cells}, reverse=True)
    usual_n = max(row.n for cells in grid.values() for row in cells.values())

    def cell(row) -> str:
        if row is None:
            return ""
        text = f"{_mean_std(row.acc_mean, row.acc_std)} [{row.fraction:.2f}]"
        return text if row.n == usual_n else f"{text} n={row.n}"

    headers = ["method"] + [f"kept {f:g}" for f in fractions]
    rows = [[name] + [cell(cells.get(f)) for f in fractions] for name, cells in grid.items()]
    notes = [f"Cells: test acc % (mean ± std over {usual_n} seeds unless n says otherwise) "
             "[compute fraction, scoring and proxy training included]; kept = fraction of the training set."]
    if section.target is not None:
        full = section.summary[section.summary["method"] == section.reference].iloc[0]
        notes.append(f"Full data: {_mean_std(full.acc_mean, full.acc_std)} (n={full.n}) [1.00].")
    return headers, rows, notes


def trials_table(section: Section) -> tuple[list[str], list[list[str]], list[str]] | None:
    """The section's tuning trials as a table: (headers, rows, notes); None without trials.

    A trial's value is the metric its selection was made on (from the selected runs' descriptors),
    "chosen" marks the trial selected; a trial no selection names yet shows no value.
    """
    if section.trials is None or not len(section.trials):
        return None
    picks: dict[str, tuple[str, bool]] = {}  # trial run id -> (metric, chosen)
    for tuning in section.runs["tuning"]:
        if isinstance(tuning, dict):
            ids = tuning.get("trial_runs") or []
            for i, rid in enumerate(ids):
                metric, chosen = picks.get(rid, (tuning.get("metric"), False))
                picks[rid] = (metric, chosen or i == tuning.get("trial"))
    rows = []
    trials = section.trials.assign(trial_index=[t.get("trial") for t in section.trials["tuning"]])
    for row in trials.sort_values(["method", "trial_index", "run_id"]).itertuples():
        known = _method_defaults(row.method)
        defaults = known[0] if known is not None else {}
        tuned = set(row.tuning.get("tuned_params") or [])
        fixed = {k: v for k, v in sorted(row.params.items()) if k not in tuned and defaults.get(k, object()) != v}
        name = row.method + (f" ({params_label(fixed)})" if fixed else "")
        drawn = {**{k: row.params.get(k) for k in sorted(tuned)}, **row.drawn}
        metric, chosen = picks.get(row.run_id, (None, False))
        value = row.metrics.get(metric) if metric else None
        rows.append([name, str(row.trial_index), params_label(drawn), metric or "",
                     "" if value is None else f"{100 * value:.2f}",
                     "" if pd.isna(row.fraction) else f"{row.fraction:.3f}", "yes" if chosen else ""])
    headers = ["method", "trial", "drawn setting", "selection metric", "value %", "compute fraction", "chosen"]
    notes = ["One run per trial at the tuning seed; value = the trial's selection metric (validation), "
             "compute fraction as in the table above. Trials are not compared: their cost is the tuned rows' "
             "tuning compute."]
    return headers, rows, notes


def _text_columns(section: Section) -> int:
    """The main table's left-aligned columns: method and setting, and the tuning column where shown."""
    return 3 if section.has_tuning else 2


def _markdown_table(headers: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = "|" + "|".join(["---"] * text_columns + ["---:"] * (len(headers) - text_columns)) + "|"
    return [line(headers), rule] + [line(cells) for cells in rows]


def section_table(section: Section) -> tuple[list[str], list[list[str]]]:
    """The section's table as text cells: (headers, rows), as Markdown and HTML show it."""
    return _headers(section), [_cells(section, row) for row in section.summary.itertuples()]


def markdown_section(section: Section) -> str:
    headers, rows = section_table(section)
    lines = [f"### {section.title}", "", *_markdown_table(headers, rows, _text_columns(section)), ""]
    lines += [f"- {note}" for note in section.notes()]
    grid = fraction_grid(section)
    if grid is not None:
        headers, rows, notes = grid
        lines += ["", f"#### {section.title}: by fraction kept", "", *_markdown_table(headers, rows, 1), ""]
        lines += [f"- {note}" for note in notes]
    trials = trials_table(section)
    if trials is not None:
        headers, rows, notes = trials
        lines += ["", f"#### {section.title}: tuning trials", "", *_markdown_table(headers, rows, 4), ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "Δ": r"$\Delta$", "≥": r"$\geq$", "<": r"$<$", ">": r"$>$"}


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX text mode; adjacent math pieces merge into one."""
    text = str(text).replace(">=", "≥")
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text).replace("$$", "")


def _latex_table(caption: str, label: str, headers: list[str], rows: list[list[str]], notes: list[str],
                 text_columns: int) -> str:
    return "\n".join([
        r"\begin{table}[ht]", r"\centering", r"\small",
        rf"\caption{{{caption}}}",
        rf"\label{{tab:{label}}}",
        r"\begin{tabular}{" + "l" * text_columns + "r" * (len(headers) - text_columns) + "}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in headers) + r" \\",
        r"\midrule",
        *(" & ".join(latex_escape(c) for c in cells) + r" \\" for cells in rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\par\smallskip",
        rf"\parbox{{\linewidth}}{{\footnotesize {' '.join(latex_escape(n) for n in notes)}}}",
        r"\end{table}",
    ]) + "\n"


def latex_section(section: Section) -> str:
    label = re.sub(r"[^A-Za-z0-9-]+", "-", section.slug)
    title = latex_escape(section.title)
    text = _latex_table(rf"{title}: test accuracy (mean $\pm$ std over seeds) and compute.", label,
                        _headers(section), [_cells(section, row) for row in section.summary.itertuples()],
                        section.notes(), _text_columns(section))
    grid = fraction_grid(section)
    if grid is not None:
        headers, rows, notes = grid
        text += "\n" + _latex_table(rf"{title}: test accuracy by fraction of the data kept.", f"{label}-by-fraction",
                                    headers, rows, notes, 1)
    trials = trials_table(section)
    if trials is not None:
        headers, rows, notes = trials
        text += "\n" + _latex_table(rf"{title}: tuning trials (not compared).", f"{label}-tuning-trials",
                                    headers, rows, notes, 4)
    return text


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


# ----- CSV (the column schema is in README.md, "Reading the tables": keep the two in step) -----

RUNS_CSV = ["protocol", "overrides", "variant", "budget", "selection_rule", "reference", "method", "setting", "params",
            "seed", "run_id", "test_acc", "worst_group_acc", "adjusted_avg_acc", "worst_class_acc", "test_class_acc",
            "oracle", "fraction", "amortised_fraction", "selection_share", "total_flops", "full_flops", "wall_clock_s",
            "cached_s", "scores_cached", "compute_to_target", "steps_to_target"]
SUMMARY_CSV = ["protocol", "overrides", "variant", "budget", "reference", "method", "setting", "n", "test_acc_mean",
               "test_acc_std", "delta_vs_full", "worst_group_acc_mean", "worst_group_acc_std", "adjusted_avg_acc_mean",
               "adjusted_avg_acc_std", "worst_class_acc_mean", "worst_class_acc_std", "oracle", "fraction",
               "amortised_fraction", "selection_share", "wall_clock_s", "cached_s", "compute_to_target",
               "steps_to_target", "reached", "target_acc", "full_acc_mean", "pareto"]


def _integers(values: pd.Series) -> pd.Series:
    """FLOP counts as integers (empty where unknown), not as 1.9e13-style floats."""
    return values.round().astype("Int64")


def runs_frame(sections: list[Section]) -> pd.DataFrame:
    """One row per run of every section, the RUNS_CSV columns (lists and dicts as JSON text)."""
    frames = []
    for section in sections:
        runs = section.runs.sort_values(["method", "setting", "seed", "run_id"])
        frames.append(pd.DataFrame({
            "protocol": section.protocol, "overrides": section.overrides, "variant": section.variant,
            "budget": section.budget, "selection_rule": runs["selection_rule"], "reference": section.reference,
            "method": runs["method"], "setting": runs["label"],
            "params": runs["params"].map(lambda p: json.dumps(p, sort_keys=True)), "seed": runs["seed"],
            "run_id": runs["run_id"], "test_acc": runs["test_acc"], "worst_group_acc": runs["worst_group_acc"],
            "adjusted_avg_acc": runs["adjusted_avg_acc"], "worst_class_acc": runs["worst_class_acc"],
            "test_class_acc": runs["class_acc"].map(lambda c: "" if c is None else json.dumps(c)),
            "oracle": runs["oracle"], "fraction": runs["fraction"], "amortised_fraction": runs["amortised_fraction"],
            "selection_share": runs["selection_share"], "total_flops": _integers(runs["total_flops"]),
            "full_flops": _integers(runs["full_flops"]), "wall_clock_s": runs["wall_clock_s"], "cached_s": runs["cached_s"],
            "scores_cached": runs["scores_cached"], "compute_to_target": runs["to_target"],
            "steps_to_target": runs["steps_to_target"]}, columns=RUNS_CSV))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUNS_CSV)


def summary_frame(sections: list[Section]) -> pd.DataFrame:
    """One row per (section, method, setting), in table order, the SUMMARY_CSV columns."""
    frames = []
    for section in sections:
        s = section.summary
        frames.append(pd.DataFrame({
            "protocol": section.protocol, "overrides": section.overrides, "variant": section.variant,
            "budget": section.budget, "reference": section.reference, "method": s["method"], "setting": s["label"],
            "n": s["n"], "test_acc_mean": s["acc_mean"], "test_acc_std": s["acc_std"],
            "delta_vs_full": s["delta_vs_full"], "worst_group_acc_mean": s["wg_mean"],
            "worst_group_acc_std": s["wg_std"], "adjusted_avg_acc_mean": s["adj_mean"],
            "adjusted_avg_acc_std": s["adj_std"], "worst_class_acc_mean": s["wc_mean"],
            "worst_class_acc_std": s["wc_std"], "oracle": s["oracle"], "fraction": s["fraction"],
            "amortised_fraction": s["amortised"], "selection_share": s["selection_share"],
            "wall_clock_s": s["wall_clock_s"], "cached_s": s["cached_s"], "compute_to_target": s["to_target"],
            "steps_to_target": s["steps_to_target"],
            "reached": s["reached"].astype("Int64") if section.target is not None else pd.NA,
            "target_acc": section.target if section.target is not None else float("nan"),
            "full_acc_mean": section.full_mean, "pareto": pareto_front(s["fraction"], s["acc_mean"])},
            columns=SUMMARY_CSV))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_CSV)


def write_csv(sections: list[Section], out: str | Path) -> list[Path]:
    """runs.csv (one row per run) and summary.csv (one row per table row) of every section."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in (("runs.csv", runs_frame(sections)), ("summary.csv", summary_frame(sections))):
        frame.to_csv(out / name, index=False, lineterminator="\n")
        written.append(out / name)
    return written


def build_tables(runs_folder: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> tuple[dict[str, str], list[str]]:
    """Markdown text per protocol (a section per set of overrides), plus one line per unreadable record."""
    records, problems = load_records(runs_folder)
    return markdown_tables(build_sections(records, problems, tolerance)), problems


def write_tables(sections: list[Section], out: str | Path) -> list[Path]:
    """<protocol>.md and <protocol>.tex per protocol, and runs.csv and summary.csv of them all."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, texts in ((".md", markdown_tables(sections)), (".tex", latex_tables(sections))):
        for protocol, text in texts.items():
            path = out / f"{protocol}{suffix}"
            path.write_text(text)
            written.append(path)
    return written + write_csv(sections, out)
