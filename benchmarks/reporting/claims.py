"""Papers' qualitative claims, checked from run records: holds, fails, undecided, or not run.

A claim (`[[claim]]` in benchmarks/resources/paper/*.toml, see its claims.toml) compares two selections
of records, left and right, on one metric: "left - right <relation> threshold". It has one form per
scale (a paper-scale protocol and a CPU-scale analogue), each naming the protocol and both sides:

    [[claim]]
    name = "el2n-beats-uniform-at-50"          # unique, short
    paper = "Deep Learning on a Data Diet (Paul et al., NeurIPS 2021)"
    statement = "EL2N at 50% kept beats uniform at 50% kept"
    source = "Fig. 1 (approx.)"                 # where the paper says so
    metric = "test_acc"                         # any metric replicate knows (test_acc, saved, ...)
    relation = ">"                              # >, >=, <, <=, within
    threshold = 0.0                             # in the metric's units (0.005 = 0.5 pp of accuracy)
    [[claim.form]]
    scale = "paper"
    protocol = "datadiet-cifar10"
    left = { method = "el2n", setting = "fraction=0.5" }
    right = { method = "uniform", setting = "fraction=0.5" }
    [[claim.form]]
    scale = "cpu"
    protocol = "fashion-mnist"
    overrides = {}                              # optional, for both sides (as --set)
    left = { method = "el2n", setting = "fraction=0.5, score_runs=2" }
    right = { method = "uniform", setting = "fraction=0.5" }

A side matches the complete records of the form's protocol and overrides whose method is the side's and
whose parameters, with the method's defaults filled in, are the setting's (as replicate matches paper
numbers). Settings use the "k=v, k=v" syntax of the paper files; a remark in parentheses is ignored.

The significance rule. With n_L, n_R runs (seeds), means m_L, m_R and sample standard deviations
s_L, s_R: d = m_L - m_R and SE = sqrt(s_L^2 / n_L + s_R^2 / n_R) (Welch). The verdict reads the
interval d +- 2 SE (about 95% for many seeds; with few seeds it is a rough guide, and the table says n):
  ">"      holds iff d - 2 SE > threshold    (shown: left exceeds right by more than the threshold)
  "<"      holds iff d + 2 SE < threshold    (shown: left is below right + threshold)
  ">="     holds iff d + 2 SE >= threshold   (not shown below: fails only when left is significantly
                                              under right + threshold; "at least matches")
  "<="     holds iff d - 2 SE <= threshold   (not shown above: "does not beat")
  "within" holds iff |d| + 2 SE <= threshold (shown: the whole interval inside +-threshold)
A verdict needs at least MIN_RUNS = 3 runs (seeds) on each side (the project's rule: a claim needs at
least 3 seeds per side; with 2, the standard deviation behind SE is too rough to decide on). A claim
with no run on a side is "not run"; one with runs on both sides but fewer than MIN_RUNS on one is
"undecided (n < 3)": the table still shows d (and +- 2 SE where each side has 2 runs) and says what is
missing. A claim that fails is a finding to report, not to tune away.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchmarks.core.record import current_records, params_label
from benchmarks.errors import BenchError
from benchmarks.reporting.replicate import PAPERS_DIR

RELATIONS = (">", ">=", "<", "<=", "within")
SCALES = ("paper", "cpu")
MIN_RUNS = 3  # runs (seeds) per side a verdict needs
Z = 2.0  # standard errors in the significance rule
CLAIM_KEYS = {"name", "paper", "statement", "source", "metric", "relation", "threshold", "form", "note"}
FORM_KEYS = {"scale", "protocol", "overrides", "left", "right", "note"}
SIDE_KEYS = {"method", "setting", "overrides"}


@dataclass(frozen=True)
class Side:
    """A selection of records: a method at a setting (params; "--set k=v" items are protocol overrides)."""

    method: str
    setting: str
    overrides: dict = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        return f"{self.method} ({self.setting})" if self.setting.strip() not in ("", "-") else self.method


@dataclass
class Form:
    scale: str
    protocol: str
    left: Side
    right: Side
    overrides: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Claim:
    name: str
    paper: str
    statement: str
    source: str
    metric: str
    relation: str
    threshold: float
    forms: list[Form]
    note: str = ""
    where: str = ""

    def form(self, scale: str) -> Form | None:
        return next((f for f in self.forms if f.scale == scale), None)


def _side(raw, where: str) -> Side:
    if not isinstance(raw, dict) or "method" not in raw:
        raise BenchError(f"{where}: a side is a table with 'method' and 'setting', e.g. "
                         "left = { method = \"el2n\", setting = \"fraction=0.5\" }")
    unknown = sorted(set(raw) - SIDE_KEYS)
    if unknown:
        raise BenchError(f"{where}: unknown key '{unknown[0]}' (a side has {', '.join(sorted(SIDE_KEYS))})")
    from benchmarks.reporting.replicate import parse_setting

    setting = str(raw.get("setting", "-"))
    try:
        parse_setting(setting)
    except ValueError as exc:
        raise BenchError(f"{where}: bad setting: {exc}") from None
    return Side(str(raw["method"]), setting, dict(raw.get("overrides", {})))


def _claim(raw, path: Path, index: int) -> Claim:
    where = f"{path}, claim {index}" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: not a table")
    unknown = sorted(set(raw) - CLAIM_KEYS)
    if unknown:
        raise BenchError(f"{where}: unknown key '{unknown[0]}' (a claim has {', '.join(sorted(CLAIM_KEYS))})")
    for key in ("name", "paper", "statement", "source", "metric", "relation", "threshold", "form"):
        if key not in raw:
            raise BenchError(f"{where}: missing key '{key}'")
    if raw["relation"] not in RELATIONS:
        raise BenchError(f"{where}: relation must be one of {', '.join(RELATIONS)}, got {raw['relation']!r}")
    threshold = raw["threshold"]
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise BenchError(f"{where}: 'threshold' must be a number, got {threshold!r}")
    if raw["relation"] == "within" and threshold < 0:
        raise BenchError(f"{where}: relation 'within' needs threshold >= 0, got {threshold!r}")
    forms = []
    for j, form in enumerate(raw["form"] if isinstance(raw["form"], list) else [], 1):
        fwhere = f"{where} form {j}"
        if not isinstance(form, dict):
            raise BenchError(f"{fwhere}: not a table")
        unknown = sorted(set(form) - FORM_KEYS)
        if unknown:
            raise BenchError(f"{fwhere}: unknown key '{unknown[0]}' (a form has {', '.join(sorted(FORM_KEYS))})")
        for key in ("scale", "protocol", "left", "right"):
            if key not in form:
                raise BenchError(f"{fwhere}: missing key '{key}'")
        if form["scale"] not in SCALES:
            raise BenchError(f"{fwhere}: scale must be one of {', '.join(SCALES)}, got {form['scale']!r}")
        forms.append(Form(form["scale"], str(form["protocol"]), _side(form["left"], f"{fwhere} left"),
                          _side(form["right"], f"{fwhere} right"), dict(form.get("overrides", {})),
                          str(form.get("note", ""))))
    if not forms:
        raise BenchError(f"{where}: 'form' must hold at least one [[claim.form]] table")
    if len({f.scale for f in forms}) != len(forms):
        raise BenchError(f"{where}: two forms of the same scale")
    return Claim(str(raw["name"]), str(raw["paper"]), str(raw["statement"]), str(raw["source"]), str(raw["metric"]),
                 raw["relation"], float(threshold), forms, str(raw.get("note", "")), where)


def load_claims(folder: str | Path | None = None) -> list[Claim]:
    """Every [[claim]] of every *.toml under the folder (or of one file); names must be unique."""
    folder = PAPERS_DIR if folder is None else Path(folder)  # default: the files the package ships
    files = sorted(folder.glob("*.toml")) if folder.is_dir() else [folder]
    claims: list[Claim] = []
    for path in files:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BenchError(f"{path}: not readable TOML ({exc})") from None
        raw_claims = data.get("claim", [])
        if not isinstance(raw_claims, list):
            raise BenchError(f"{path}: 'claim' must be an array of tables ([[claim]])")
        claims += [_claim(raw, path, i) for i, raw in enumerate(raw_claims, 1)]
    names = [c.name for c in claims]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise BenchError(f"claim name '{duplicate}' appears twice")
    return claims


# -- evaluation ----------------------------------------------------------------------------------


def _matching(records: list[dict], protocol: str, overrides: dict, side: Side) -> list[dict]:
    from benchmarks.reporting.replicate import parse_setting, resolved_label

    params, setting_overrides = parse_setting(side.setting)
    wanted = json.dumps({**overrides, **setting_overrides, **side.overrides}, sort_keys=True)
    label = resolved_label(side.method, params)
    return [r for r in records if r["protocol"] == protocol and r["method"] == side.method
            and json.dumps(r.get("overrides") or {}, sort_keys=True) == wanted
            and params_label(r["params"]) == label]


def _summary(records: list[dict], metric: str) -> dict:
    from benchmarks.reporting.replicate import run_value

    pairs = sorted((r["seed"], run_value(r, metric)) for r in records)
    values = [v for _, v in pairs if isinstance(v, (int, float))]
    return {"n": len(values), "seeds": [s for s, v in pairs if isinstance(v, (int, float))], "values": values,
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def verdict(relation: str, threshold: float, difference: float, se: float) -> bool:
    """Whether the claim holds under the significance rule of the module docstring."""
    low, high = difference - Z * se, difference + Z * se
    return {">": low > threshold, "<": high < threshold, ">=": high >= threshold, "<=": low <= threshold,
            "within": -threshold <= low and high <= threshold}[relation]


def undecided(min_runs: int = MIN_RUNS) -> str:
    """The verdict of a claim with runs on both sides but fewer than `min_runs` on one."""
    return f"undecided (n < {min_runs})"


def evaluate_claims(claims: list[Claim], records: list[dict], scale: str = "cpu",
                    min_runs: int = MIN_RUNS) -> list[dict]:
    """One row per claim at `scale`: both sides' numbers, the difference, its standard error, the verdict.

    `min_runs`: runs (seeds) per side a verdict needs (the project's rule: MIN_RUNS; at least 2, for SE).
    """
    if min_runs < 2:
        raise ValueError(f"min_runs must be at least 2 (a standard error needs 2 runs a side), got {min_runs}")
    if scale not in SCALES:
        raise BenchError(f"unknown scale '{scale}' (known: {', '.join(SCALES)})")
    complete = [r for r in current_records(records, []) if r.get("status") == "complete"
                and isinstance(r.get("params"), dict)]
    rows = []
    for claim in claims:
        form = claim.form(scale)
        row = {"claim": claim, "form": form, "left": None, "right": None, "difference": None, "se": None,
               "verdict": "not run", "reason": ""}
        if form is None:
            row["reason"] = f"no {scale}-scale form"
            rows.append(row)
            continue
        left = _summary(_matching(complete, form.protocol, form.overrides, form.left), claim.metric)
        right = _summary(_matching(complete, form.protocol, form.overrides, form.right), claim.metric)
        row.update(left=left, right=right)
        short = [f"{side.label}: {s['n']} run{'s' if s['n'] != 1 else ''}" for side, s in
                 ((form.left, left), (form.right, right)) if s["n"] < min_runs]
        if left["n"] and right["n"]:  # d where both sides ran; SE where both have a standard deviation
            row["difference"] = left["mean"] - right["mean"]
            if left["std"] is not None and right["std"] is not None:
                row["se"] = math.sqrt(left["std"] ** 2 / left["n"] + right["std"] ** 2 / right["n"])
        if short:
            row["reason"] = "; ".join(short) + f" (needs {min_runs})"
            if left["n"] and right["n"]:
                row["verdict"] = undecided(min_runs)
        else:
            holds = verdict(claim.relation, claim.threshold, row["difference"], row["se"])
            row["verdict"] = "holds" if holds else "fails"
        rows.append(row)
    return rows


RULE_TEXT = {">": "d - 2SE > {t}", "<": "d + 2SE < {t}", ">=": "d + 2SE >= {t}", "<=": "d - 2SE <= {t}",
             "within": "|d| + 2SE <= {t}"}


def _side_text(summary: dict | None, percent: bool) -> str:
    if not summary or summary["n"] == 0:
        return "no runs"
    scale = 100 if percent else 1
    std = f" ± {summary['std'] * scale:.2f}" if summary["std"] is not None else ""
    return f"{summary['mean'] * scale:.2f}{std} (n={summary['n']}, seeds {','.join(map(str, summary['seeds']))})"


def markdown_claims(rows: list[dict], scale: str = "cpu", min_runs: int = MIN_RUNS) -> str:
    lines = [f"### Claims checked from records ({scale} scale)", "",
             "| claim | protocol | left | right | d = left - right (± 2 SE) | rule | verdict |",
             "|---|---|---|---|---:|---|---|"]
    for row in rows:
        claim: Claim = row["claim"]
        form: Form | None = row["form"]
        percent = claim.metric.endswith("acc")
        unit, scale_by = (" pp", 100) if percent else ("", 1)
        t = f"{claim.threshold * scale_by:g}{unit}"
        diff = "" if row["difference"] is None else f"{row['difference'] * scale_by:+.2f}" + \
            ("" if row["se"] is None else f" ± {2 * row['se'] * scale_by:.2f}") + unit
        left = f"{form.left.label}: {_side_text(row['left'], percent)}" if form else ""
        right = f"{form.right.label}: {_side_text(row['right'], percent)}" if form else ""
        cells = [f"**{claim.name}**: {claim.statement}", form.protocol if form else "", left, right, diff,
                 RULE_TEXT[claim.relation].format(t=t) + f" ({claim.metric})",
                 f"**{row['verdict']}**" + (f": {row['reason']}" if row["reason"] else "")]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("holds", "fails", undecided(min_runs), "not run")}
    n_undecided = counts[undecided(min_runs)]
    lines += ["", f"{len(rows)} claims: {counts['holds']} hold, {counts['fails']} fail, "
              + (f"{n_undecided} undecided (fewer than {min_runs} runs on a side), " if n_undecided else "")
              + f"{counts['not run']} not run. "
              "d = mean(left) - mean(right), shown ± 2 standard errors (Welch: SE = sqrt(sL²/nL + sR²/nR)). "
              "Rule: '>' and '<' need the whole ±2SE interval beyond the threshold (shown); '>=' and '<=' fail "
              "only when the whole interval lies on the wrong side (not refuted); 'within' needs the whole "
              f"interval inside ±threshold. A verdict needs {min_runs} runs (seeds) per side. "
              "Accuracies in percent. A failing claim is a finding, reported as measured.", "", "Sources:"]
    for row in rows:
        claim = row["claim"]
        notes = "; ".join(n for n in (claim.note, row["form"].note if row["form"] else "") if n)
        lines.append(f"- **{claim.name}**: {claim.paper}: {claim.source}" + (f" (note: {notes})" if notes else ""))
    return "\n".join(lines) + "\n"
