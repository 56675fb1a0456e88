"""Published records: the records behind the committed tables, committed beside them.

Layout: `results/records/<set>/<run_id>.json`, one folder per sweep or bench job (its name), small
JSON only (no checkpoints, caches or models). `nox -s tables` rebuilds `results/tables/` from this
folder alone, byte for byte, so anyone can regenerate what the repository publishes.

`publish` copies a job's complete records there, unchanged. A run already published under another
set (the same run id: a full-data run shared by a sweep and the main job) is not copied twice, so no
table counts it twice. The working folder (`results/runs/`, git-ignored) is left as it is.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.record import RecordError, atomic_write_bytes, load_record
from benchmarks.errors import BenchError
from benchmarks.jobs.sweep import read_manifest


def published_ids(root: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(root.glob("*/*.json"))}


def publish(manifest: Path, to: str | Path, *, partial: bool = False, log=print) -> int:
    lines = read_manifest(manifest)
    name = lines[0].get("group") or manifest.parent.name
    root = Path(to)
    target = root / name
    complete, missing = [], []
    for line in lines:
        path = ResultsLayout(line["out"]).record(line["run_id"])
        try:
            ok = path.exists() and load_record(path)["status"] == "complete"
        except RecordError:
            ok = False
        (complete if ok else missing).append((line, path))
    if missing and not partial:
        first = missing[0][0]
        raise BenchError(f"{len(missing)} of {len(lines)} runs of '{name}' are not complete (first: {first['method']} "
                         f"{first['params']} seed {first['seed']}); finish them, or publish the rest with --partial")
    if not complete:
        raise BenchError(f"no complete runs of '{name}' to publish")
    elsewhere = {rid: path for rid, path in published_ids(root).items() if path.parent != target}
    copied = shared = 0
    for line, path in complete:
        if line["run_id"] in elsewhere:
            shared += 1  # one copy per run: a table counts each run once
            continue
        atomic_write_bytes(target / path.name, path.read_bytes())
        copied += 1
    log(f"published {copied} records of '{name}' to {target}"
        + (f"; {shared} already published in another set" if shared else "")
        + (f"; {len(missing)} not complete, left out" if missing else ""))
    log(f"next: python -m benchmarks tables --published --records {root} (nox -s tables, for results/records) "
        f"rebuilds the tables; commit {target} with them")
    return 0


GENERATED = ("*.md", "*.tex", "*.csv", "report.html", "plots/*.png", "plots/*.pdf")


def rebuild(records: str | Path, out: str | Path, papers: str | Path, log=print) -> int:
    """The published tables from the published records alone: per-protocol Markdown and LaTeX, runs.csv and
    summary.csv, the plots, replication.md, claims.md (the papers' CPU-scale claims, where the paper files state some), and report.html of them all.
    Everything `out` holds is generated here, so files from an earlier build that this one does not
    make (a protocol no longer published) are removed first."""
    from benchmarks.core.record import load_records
    from benchmarks.reporting.claims import evaluate_claims, load_claims, markdown_claims
    from benchmarks.reporting.html import write_report
    from benchmarks.reporting.plots import write_plots
    from benchmarks.reporting.replicate import load_papers, markdown_table, replicate
    from benchmarks.reporting.tables import build_sections, write_tables

    out = Path(out)
    found, problems = load_records(records)
    if problems:  # a published record that does not read would make the tables wrong without saying so
        raise BenchError(f"published record unreadable: {problems[0]}")
    problems = []
    sections = build_sections(found, problems)
    if problems:
        raise BenchError(f"published records: {problems[0]}")
    for pattern in GENERATED:
        for stale in out.glob(pattern):
            stale.unlink()
    if not sections:
        log(f"no published records under {records}: {out} holds no tables")
        return 0
    written = write_tables(sections, out) + write_plots(sections, out / "plots")
    replication = out / "replication.md"
    replication.write_text(markdown_table(replicate(load_papers(papers), found)))
    written.append(replication)
    claims = load_claims(papers)
    if claims:
        (out / "claims.md").write_text(markdown_claims(evaluate_claims(claims, found, "cpu"), "cpu"))
        written.append(out / "claims.md")
    written.append(write_report(sections, out, out / "plots", [("Replication", replication),
                                                              ("Claims", out / "claims.md")]))
    for path in written:
        log(f"wrote {path}")
    return 0
