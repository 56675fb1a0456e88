"""`python -m benchmarks reproduce`: re-run a published record from its identity and compare the numbers.

A record holds what defines its run (protocol, method, parameters, seed, overrides). This command
resolves that identity with the code here and refuses when it no longer gives the record's run id
(the protocol file or the method's parameters changed since: it says which), re-runs it into a
scratch results folder (a new temporary one unless --out names one), and reports per metric the
published value, the new value and the difference, with both records' code fingerprint and
hardware, so a user can say "identical" or "reproduced within X pp".

What "identical" means: every metric, every FLOP count and every evaluated epoch of the curve
equal bit for bit (timings aside). Whether that can hold depends on the hardware and the software:
the report puts host, device, torch and python side by side, since a different CPU or torch build
may legitimately round differently.

Several records: a folder or a published set's name re-runs all of its complete records, or a
seeded sample of them (--sample K, --sample-seed), optionally only those of one method (--method)
or made with some overrides (--set).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.protocol import NOT_IN_IDENTITY, parse_assignments
from benchmarks.core.provenance import code_label
from benchmarks.core.record import RecordError, load_record, load_records, params_label
from benchmarks.errors import BenchError

EXAMPLES = """examples:
  python -m benchmarks reproduce results/records/spurious-fashion/f818fe1488085fdc.json
  python -m benchmarks reproduce f818fe1488085fdc                     # found under --records
  python -m benchmarks reproduce fashion-pruning --sample 3 --out /tmp/repro   # 3 runs of a published set
  python -m benchmarks reproduce RUN_ID --tolerance 0.01             # exit 1 beyond 1 pp
"""
ENV_KEYS = ("host", "device", "device_name", "threads", "torch", "python")
COMPUTE_KEYS = ("train_flops", "selection_flops", "eval_flops", "full_flops", "total_flops")
RUN_ID = re.compile(r"[0-9a-f]{16}")


def find_records(target: str, records_dir: str | Path) -> list[dict]:
    """The records TARGET names: a record file, a folder of records, a run id or a set name under records_dir."""
    path, folder = Path(target), Path(records_dir)
    try:
        if path.is_file():
            return [dict(load_record(path), _path=str(path))]
        if path.is_dir() or (not RUN_ID.fullmatch(target) and (folder / target).is_dir()):
            found, problems = load_records(path if path.is_dir() else folder / target)
            if not found:
                raise BenchError(f"no readable records under {path if path.is_dir() else folder / target}"
                                 + (f" ({problems[0]})" if problems else ""))
            return found
        if RUN_ID.fullmatch(target):
            if not folder.is_dir():
                raise BenchError(f"--records '{folder}' is not a folder: give the record's file, or the folder "
                                 "of published records with --records")
            hits = sorted(folder.rglob(f"{target}.json"))
            if hits:
                return [dict(load_record(hits[0]), _path=str(hits[0]))]
            raise BenchError(f"no record of run {target} under {folder} (looked for {target}.json)")
    except RecordError as exc:
        raise BenchError(str(exc)) from None
    raise BenchError(f"'{target}' is not a record file, a folder, a run id (16 hex digits) or a set under {folder}")


def choose(records: list[dict], *, method: str | None = None, overrides: dict | None = None,
           sample: int | None = None, seed: int = 0) -> list[dict]:
    """The complete records to re-run: filtered, then a seeded sample (the same K for the same seed and set)."""
    kept = [r for r in records if r.get("status") == "complete" and (method is None or r.get("method") == method)
            and all((r.get("overrides") or {}).get(k) == v for k, v in (overrides or {}).items())]
    if not kept:
        raise BenchError("no complete record matches (status complete"
                         + (f", method {method}" if method else "") + (f", overrides {overrides}" if overrides else "")
                         + ")")
    kept.sort(key=lambda r: r["run_id"])
    if sample is not None:
        if sample < 1:
            raise BenchError(f"--sample {sample}: must be >= 1")
        kept = sorted(random.Random(seed).sample(kept, min(sample, len(kept))), key=lambda r: r["run_id"])
    return kept


def spec_of(record: dict):
    """The RunSpec the record was made from, resolved here; BenchError when it no longer gives the record's run id."""
    from benchmarks.core.spec import RunSpec

    spec = RunSpec(protocol=record["protocol"], method=record["method"], params=dict(record["params"]),
                   seed=record["seed"], overrides=dict(record.get("overrides") or {}))
    try:
        resolved = spec.resolve()
    except BenchError as exc:
        raise BenchError(f"run {record['run_id']} cannot be re-run with this code: {exc}") from None
    if resolved.run_id != record["run_id"]:
        raise BenchError(f"run {record['run_id']}: this code resolves its identity to run {resolved.run_id}: "
                         + changed_since(record, resolved) + "; its numbers are not this code's to reproduce")
    return spec


def changed_since(record: dict, resolved) -> str:
    """Why a record's identity resolves to another run id now: the protocol's fields or the method's parameters."""
    old, new = record.get("resolved_protocol") or {}, resolved.protocol.as_dict()
    fields = [k for k in sorted(set(old) | set(new)) if k not in NOT_IN_IDENTITY and old.get(k) != new.get(k)]
    if record.get("protocol_fingerprint") != resolved.fingerprint and fields:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fields[:4])
        return (f"protocol '{record['protocol']}' changed since ({shown}" + (", ..." if len(fields) > 4 else "") + ")")
    if record.get("protocol_fingerprint") != resolved.fingerprint:
        return f"protocol '{record['protocol']}' changed since (its fingerprint differs)"
    if dict(record["params"]) != resolved.params:
        keys = sorted(k for k in set(record["params"]) | set(resolved.params)
                      if record["params"].get(k, "(absent)") != resolved.params.get(k, "(absent)"))
        return (f"method '{record['method']}' parameters changed since ("
                + ", ".join(f"{k}: {record['params'].get(k, '(absent)')!r} -> {resolved.params.get(k, '(absent)')!r}"
                            for k in keys) + ")")
    return "the definition of a run id changed since"


def flat_metrics(metrics: dict) -> dict:
    """Metrics with list values spread out (test_group_acc[0], ...), numbers only."""
    flat = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return {k: v for k, v in flat.items() if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def is_accuracy(key: str) -> bool:
    return key.split("[")[0].endswith("_acc")


@dataclass
class Comparison:
    published: dict
    rerun: dict
    rows: list[tuple[str, float | None, float | None, float | None]]  # metric, published, re-run, difference
    compute_equal: bool
    curve_difference: str  # "" when every evaluated epoch is equal
    # Metrics only the re-run has: the code now records more (e.g. per-class accuracy); nothing to compare
    added: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return (all(p == n for _, p, n, _ in self.rows) and self.compute_equal and not self.curve_difference)

    @property
    def largest(self) -> tuple[str, float]:
        """The accuracy metric that moved most and by how much (absolute; 0.01 = 1 pp); NaN when one is missing."""
        worst = ("", 0.0)
        for key, _, _, d in self.rows:
            if not is_accuracy(key):
                continue
            gap = math.nan if d is None else abs(d)
            if math.isnan(gap) or gap > worst[1]:
                worst = (key, gap)
                if math.isnan(gap):
                    break
        return worst


def compare(published: dict, rerun: dict) -> Comparison:
    old, new = flat_metrics(published.get("metrics")), flat_metrics(rerun.get("metrics"))
    rows = []
    for key in old:  # every published metric; one the re-run lacks makes the two not comparable
        p, n = old[key], new.get(key)
        rows.append((key, p, n, None if p is None or n is None else n - p))
    compute_equal = all((published.get("compute") or {}).get(k) == (rerun.get("compute") or {}).get(k)
                        for k in COMPUTE_KEYS)
    return Comparison(published, rerun, rows, compute_equal, curve_difference(published.get("curve") or [],
                                                                                rerun.get("curve") or []),
                      added=[k for k in new if k not in old])


def curve_difference(old: list[dict], new: list[dict]) -> str:
    """Where two curves first differ (timings aside), "" when they do not: the epoch and the keys."""
    if len(old) != len(new):
        return f"{len(old)} epochs published, {len(new)} re-run"
    for a, b in zip(old, new):
        # the published row's keys: a key only the re-run has is something this code records more of
        keys = [k for k in sorted(a) if not (k == "seconds" or k.endswith("_seconds") or k.endswith("_s"))
                and a.get(k) != b.get(k)]
        if keys:
            return f"first differs at epoch {a.get('epoch', '?')} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
    return ""


def _number(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.6f}"


def _difference(value) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else (f"{value:+d}" if isinstance(value, int) else f"{value:+.6f}".rstrip("0"))


def _code(record: dict) -> str:
    if isinstance(record.get("code"), dict):
        return code_label(record["code"])
    git = (record.get("env") or {}).get("git")
    return f"no code fingerprint (older record); env.git {git}" if git else "no code fingerprint (older record)"


def report(c: Comparison, tolerance: float | None = None) -> str:
    """The comparison as Markdown: identity, code and hardware side by side, the metrics, the verdict."""
    p, r = c.published, c.rerun
    lines = [f"## Reproduction of run {p['run_id']}: {p['protocol']} / {p['method']} ({params_label(p['params'])}) "
             f"seed {p['seed']}" + (f", overrides {p['overrides']}" if p.get("overrides") else ""), "",
             f"published: {p.get('_path') or p['run_id']}", f"re-run:    {r.get('_path') or r['run_id']}", "",
             "| | published | re-run | |", "|---|---|---|---|",
             f"| code | {_code(p)} | {_code(r)} | {'same' if _code(p) == _code(r) else 'differs'} |"]
    env_p, env_r = p.get("env") or {}, r.get("env") or {}
    for key in ENV_KEYS:
        a, b = env_p.get(key), env_r.get(key)
        lines.append(f"| {key} | {a if a not in (None, '') else '-'} | {b if b not in (None, '') else '-'} | "
                     f"{'same' if a == b else 'differs'} |")
    lines += ["", "| metric | published | re-run | difference |", "|---|---:|---:|---:|"]
    lines += [f"| {key} | {_number(a)} | {_number(b)} | {_difference(d)} |" for key, a, b, d in c.rows]
    lines += ["", "compute: " + ("FLOP counts identical" if c.compute_equal else "FLOP counts differ: " + ", ".join(
        f"{k} {(p.get('compute') or {}).get(k)} -> {(r.get('compute') or {}).get(k)}" for k in COMPUTE_KEYS
        if (p.get("compute") or {}).get(k) != (r.get("compute") or {}).get(k))),
        "curve: " + (c.curve_difference or "every epoch identical (timings aside)"), ""]
    if c.added:
        lines.append(f"new in the re-run (this code records more; not compared): {', '.join(c.added[:6])}"
                     + (f" and {len(c.added) - 6} more" if len(c.added) > 6 else ""))
    lines.append("verdict: " + verdict(c, tolerance))
    return "\n".join(lines) + "\n"


def verdict(c: Comparison, tolerance: float | None = None) -> str:
    if c.identical:
        return "identical (every metric, FLOP count and epoch of the curve equal bit for bit)"
    key, gap = c.largest
    if math.isnan(gap):
        return f"NOT comparable: metric {key} is missing on one side"
    text = f"reproduced within {100 * gap:.2f} pp (largest difference: {key})" if key else \
        "accuracies identical; other numbers differ (see above)"
    if tolerance is not None:
        text += (f"; within --tolerance {100 * tolerance:g} pp" if gap <= tolerance + 1e-12
                 else f"; BEYOND --tolerance {100 * tolerance:g} pp")
    return text


def within(c: Comparison, tolerance: float) -> bool:
    key, gap = c.largest
    return c.identical or (not math.isnan(gap) and gap <= tolerance + 1e-12)


def reproduce(record: dict, out: str | Path, *, data_root: str | None = None, device: str | None = None,
              log=print) -> Comparison:
    """Re-run one record into `out` (which must not hold that run's record yet) and compare."""
    from benchmarks.core.run import execute

    spec = spec_of(record)
    path = ResultsLayout(out).record(record["run_id"])
    if path.exists():
        raise BenchError(f"{path} exists: reproduce writes into a scratch folder (--out) that does not hold this "
                         "run yet; remove it or choose another --out")
    rerun = execute(spec, out, data_root=data_root, device=device or _device_of(record), log=log)
    return compare(record, dict(rerun, _path=str(path)))


def _device_of(record: dict) -> str:
    """The published run's kind of device (cpu or cuda) where this machine has it, else auto (the report says)."""
    import torch

    kind = str((record.get("env") or {}).get("device") or "auto").split(":")[0]
    return kind if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()) else "auto"


def _cmd_reproduce(args: argparse.Namespace) -> int:
    if args.tolerance is not None and not 0 <= args.tolerance < 1:
        raise BenchError(f"--tolerance {args.tolerance}: must be in [0, 1) (0.01 = 1 pp)")
    records = choose(find_records(args.target, args.records), method=args.method,
                     overrides=parse_assignments(args.set, "--set"), sample=args.sample, seed=args.sample_seed)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-reproduce-"))
    print(f"reproducing {len(records)} run(s) into {out}", flush=True)
    comparisons = []
    for record in records:
        comparisons.append(reproduce(record, out, data_root=args.data_root, device=args.device))
        print(report(comparisons[-1], args.tolerance), flush=True)
    if len(comparisons) > 1:
        same = sum(c.identical for c in comparisons)
        gaps = [c.largest[1] for c in comparisons]
        print(f"summary: {same} of {len(comparisons)} identical; largest accuracy difference "
              f"{100 * max(gaps):.2f} pp")
    text = "\n".join(report(c, args.tolerance) for c in comparisons)
    (out / "reproduce.md").write_text(text)
    print(f"wrote {out / 'reproduce.md'}")
    if args.tolerance is None:
        return 0 if all(c.identical for c in comparisons) else 1
    return 0 if all(within(c, args.tolerance) for c in comparisons) else 1


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="re-run published records from their identity into a scratch folder and "
                       "compare every metric (identical, or within how much), code and hardware side by side",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="a record file, a run id (found under --records), a folder of records, or the "
                   "name of a published set (a folder under --records)")
    p.add_argument("--records", default="results/records", metavar="DIR",
                   help="where run ids and set names are looked up (default results/records)")
    p.add_argument("--sample", type=int, default=None, metavar="K", help="re-run K records of the set, chosen with "
                   "--sample-seed (default: all)")
    p.add_argument("--sample-seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--method", default=None, help="only the set's records of this method")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="only the set's records made with these protocol overrides")
    p.add_argument("--out", default=None, help="scratch results folder for the re-runs (default: a new temporary "
                   "folder); the report is written to OUT/reproduce.md")
    p.add_argument("--data-root", default=None, help="where datasets are looked for first (then $BENCH_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the published run's kind of device "
                   "where this machine has it, else auto)")
    p.add_argument("--tolerance", type=float, default=None, metavar="T", help="exit status 1 when an accuracy moves "
                   "by more than T (0.01 = 1 pp; default: exit 1 unless identical)")
    p.set_defaults(func=_cmd_reproduce)
