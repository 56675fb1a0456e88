"""Our runs next to the numbers the papers report (benchmarks/resources/paper/*.toml, one file per paper;
--papers names another folder).

(The papers' qualitative claims, `[[claim]]` tables in the same folder, are checked by benchmarks/reporting/claims.py.)

Each [[entry]] names: paper, protocol, method, setting ("-" or "k=v, k=v" like report.params_label;
a remark in parentheses is ignored, "--set k=v" items are protocol overrides), metric, value, source
("Table 1", "Fig. 2 (approx.)") and tolerance; optionally `overrides = {k = v}`, `note`, and
`bound = "upper"` ("less than value": within means ours <= value + tolerance) or "lower". An entry matches the
complete runs of that protocol and method whose parameters, with the method's defaults filled in,
equal the setting's, and whose overrides equal the entry's (none unless it names some).

Metrics: test_acc, worst_group_acc (the test split's), delta_vs_full (test_acc minus the full-data
mean of the same protocol and overrides), saved, fraction, selection_share (from the compute
summary), or any other key of the records' metrics (e.g. val_acc) or method_stats (e.g. unforgettable_share).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from benchmarks.core import catalog
from benchmarks.core.record import current_records, params_label, reference_of
from benchmarks.errors import BenchError

REQUIRED = ("paper", "protocol", "method", "setting", "metric", "value", "source", "tolerance")
OPTIONAL = ("overrides", "note", "bound")
BOUNDS = ("upper", "lower")
COMPUTE_METRICS = ("saved", "fraction", "selection_share")
# The papers' numbers and claims ship inside the package (benchmarks/resources/paper/, package data), so `replicate`
# and `tables --published` find them from a wheel as from a clone (results/paper links there); --papers reads others.
PAPERS_DIR = Path(str(files("benchmarks") / "resources" / "paper"))


@dataclass
class PaperEntry:
    paper: str
    protocol: str
    method: str
    setting: str
    metric: str
    value: float
    source: str
    tolerance: float
    overrides: dict = field(default_factory=dict)
    bound: str | None = None  # "upper": the paper says "less than value"; "lower": "more than value"
    where: str = ""  # "file, entry N" for messages

    def within(self, ours: float) -> bool:
        slack = self.tolerance + 1e-12
        if self.bound == "upper":
            return ours <= self.value + slack
        if self.bound == "lower":
            return ours >= self.value - slack
        return abs(ours - self.value) <= slack

    @property
    def value_text(self) -> str:
        return {"upper": "< ", "lower": "> "}.get(self.bound, "") + f"{self.value:g}"

    def params(self) -> dict:
        return parse_setting(self.setting)[0]

    def all_overrides(self) -> dict:
        return dict(parse_setting(self.setting)[1], **self.overrides)


def parse_setting(text: str) -> tuple[dict, dict]:
    """"k=v, k=v (remark), --set key=value" -> (params, overrides), values in TOML syntax."""
    from benchmarks.core.protocol import parse_value

    bare = re.sub(r"\([^)]*\)", "", text)
    params, overrides = {}, {}
    for item in (part.strip() for part in bare.split(",")):
        if not item or item == "-":
            continue
        target = params
        if item.startswith("--set "):
            item, target = item[len("--set "):].strip(), overrides
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"setting item '{item}' is not key=value")
        target[key.strip()] = parse_value(value.strip())
    return params, overrides


def _entry(raw, path: Path, index: int) -> PaperEntry:
    where = f"{path}, entry {index}"
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: not a table")
    what = " / ".join(str(raw[k]) for k in ("protocol", "method", "setting") if k in raw)
    where_long = f"{where} ({what})" if what else where
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise BenchError(f"{where_long}: missing key '{missing[0]}' (an entry needs {', '.join(REQUIRED)})")
    unknown = sorted(set(raw) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise BenchError(f"{where_long}: unknown key '{unknown[0]}'")
    for key in ("value", "tolerance"):
        if not isinstance(raw[key], (int, float)) or isinstance(raw[key], bool):
            raise BenchError(f"{where_long}: '{key}' must be a number, got {raw[key]!r}")
    if raw["tolerance"] < 0:
        raise BenchError(f"{where_long}: 'tolerance' must be >= 0, got {raw['tolerance']!r}")
    for key in ("paper", "protocol", "method", "setting", "metric", "source"):
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise BenchError(f"{where_long}: '{key}' must be a non-empty string, got {raw[key]!r}")
    if raw.get("bound") is not None and raw["bound"] not in BOUNDS:
        raise BenchError(f"{where_long}: 'bound' must be one of {', '.join(BOUNDS)}, got {raw['bound']!r}")
    if not isinstance(raw.get("overrides", {}), dict):
        raise BenchError(f"{where_long}: 'overrides' must be a table, e.g. overrides = {{ lr = 0.001 }}")
    try:
        parse_setting(raw["setting"])
    except ValueError as exc:
        raise BenchError(f"{where_long}: bad setting: {exc}") from None
    return PaperEntry(raw["paper"], raw["protocol"], raw["method"], raw["setting"], raw["metric"],
                      float(raw["value"]), raw["source"], float(raw["tolerance"]), dict(raw.get("overrides", {})),
                      raw.get("bound"), where)


def load_papers(folder: str | Path | None = None) -> list[PaperEntry]:
    """Every entry of every *.toml under the folder; the first bad entry is one error naming file and entry."""
    folder = PAPERS_DIR if folder is None else Path(folder)  # default: the files the package ships
    files = sorted(folder.glob("*.toml")) if folder.is_dir() else [folder]
    if not files or not files[0].exists():
        raise BenchError(f"no paper files (*.toml) in {folder}")
    entries = []
    for path in files:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BenchError(f"{path}: not readable TOML ({exc})") from None
        raw_entries = data.get("entry")
        if raw_entries is None and "claim" in data:
            continue  # a file of claims only (benchmarks/reporting/claims.py)
        if not isinstance(raw_entries, list) or not raw_entries:
            raise BenchError(f"{path}: no [[entry]] tables")
        entries += [_entry(raw, path, i) for i, raw in enumerate(raw_entries, 1)]
    if not entries:
        raise BenchError(f"no [[entry]] tables in {folder}")
    return entries


def resolved_label(method: str, params: dict) -> str:
    """The setting label a run made with these params has: the method's defaults filled in (when known)."""
    try:
        return params_label(catalog.filled_params(method, params))
    except BenchError:  # a method not (yet) in the registry: compare as written
        return params_label(params)


def _is_reference_run(record: dict) -> bool:
    """A run of its protocol's reference method at the method's defaults (full BYOL, not a budgeted BYOL)."""
    reference = reference_of(record)
    if record["method"] != reference:
        return False
    try:
        return record["params"] == catalog.filled_params(reference, {})
    except BenchError:  # a method not (yet) in the registry: every run of it
        return True


def run_value(record: dict, metric: str) -> float | None:
    metrics, compute, stats = record.get("metrics") or {}, record.get("compute") or {}, record.get("method_stats") or {}
    if metric in COMPUTE_METRICS:
        return compute.get(metric)
    if metric == "worst_group_acc":
        return metrics.get("test_worst_group_acc")
    if metric == "delta_vs_full":
        return metrics.get("test_acc")
    return metrics[metric] if metric in metrics else stats.get(metric)


def replicate(entries: list[PaperEntry], records: list[dict]) -> list[dict]:
    """One row per paper entry: the paper's value, ours (mean, std, n over matching runs), the verdict."""
    complete = [r for r in current_records(records, []) if r.get("status") == "complete"
                and isinstance(r.get("params"), dict)]

    def key(r: dict) -> tuple:
        return r["protocol"], json.dumps(r.get("overrides") or {}, sort_keys=True)

    full_means: dict[tuple, float] = {}
    for k in {key(r) for r in complete}:
        accs = [r["metrics"]["test_acc"] for r in complete if key(r) == k and _is_reference_run(r)
                and (r.get("metrics") or {}).get("test_acc") is not None]
        if accs:
            full_means[k] = statistics.fmean(accs)
    rows = []
    for entry in entries:
        label = resolved_label(entry.method, entry.params())
        wanted = (entry.protocol, json.dumps(entry.all_overrides(), sort_keys=True))
        runs = [r for r in complete if key(r) == wanted and r["method"] == entry.method
                and params_label(r["params"]) == label]
        row = {"entry": entry, "n_runs": len(runs), "values": [], "mean": None, "std": None,
               "difference": None, "verdict": "not run"}
        if runs:
            values = [v for v in (run_value(r, entry.metric) for r in runs) if v is not None]
            if entry.metric == "delta_vs_full":
                full = full_means.get(wanted)
                values = [v - full for v in values] if full is not None else []
            if not values:
                row["verdict"] = ("no full-data run" if entry.metric == "delta_vs_full" and wanted not in full_means
                                  else f"'{entry.metric}' not recorded")
            else:
                mean = statistics.fmean(values)
                diff = mean - entry.value
                row.update(values=values, mean=mean, std=statistics.stdev(values) if len(values) > 1 else None,
                           difference=diff, verdict="yes" if entry.within(mean) else "no")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| paper | protocol | method | setting | metric | paper value | source | ours (mean ± std, n) | "
             "difference | tolerance | within tolerance |",
             "|---|---|---|---|---|---:|---|---:|---:|---:|---|"]
    for row in rows:
        e: PaperEntry = row["entry"]
        if row["mean"] is None:
            ours, diff = "", ""
        else:
            std = "" if row["std"] is None else f" ± {row['std']:.4f}"
            ours, diff = f"{row['mean']:.4f}{std} (n={len(row['values'])})", f"{row['difference']:+.4f}"
        cells = [e.paper, e.protocol, e.method, e.setting + (f" [{_overrides_text(e.overrides)}]" if e.overrides else ""),
                 e.metric, e.value_text, e.source, ours, diff, f"{e.tolerance:g}", row["verdict"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    ran = sum(1 for row in rows if row["mean"] is not None)
    within = sum(1 for row in rows if row["verdict"] == "yes")
    lines += ["", f"{len(rows)} paper numbers; {ran} with matching runs, {within} of them within tolerance. "
              "Values are fractions (0.956 = 95.6%); difference = ours - paper; \"< v\" is an upper bound "
              "(within: ours <= v + tolerance). A run matches an entry when its protocol, method, parameters "
              "(defaults filled in) and overrides are the entry's."]
    return "\n".join(lines) + "\n"


def _overrides_text(overrides: dict) -> str:
    return ", ".join(f"--set {k}={v}" for k, v in sorted(overrides.items()))
