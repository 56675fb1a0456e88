"""One HTML page per results folder: OUT/report.html, written by `tables` beside the Markdown tables.

Per section (protocol + overrides): the table as in <protocol>.md, the rules under it (the same
notes), the by-fraction table, the section's plots, and the per-run details (in a fold). Then the
documents written beside it (replication.md, claims.md), rendered from their Markdown.

The plots are linked as relative files (`plots/<stem>.png` beside the page), not embedded, so the
page stays small enough to commit: open it from the results folder, or copy the folder whole. The
page holds no timestamp and no absolute path, so the same records give the same bytes anywhere.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import pandas as pd

from benchmarks.reporting.plots import plot_stems
from benchmarks.reporting.tables import Section, fraction_grid, runs_frame, section_table

REPORT = "report.html"
MAX_RUN_ROWS = 1000  # per section; every run is in runs.csv
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1500px; padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; }
ul.notes { font-size: 13px; color: #444; max-width: 1100px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 12px 20px;
         grid-auto-flow: row dense; align-items: start; margin: 12px 0; }
figure { margin: 0; }
figure.panels { grid-column: 1 / -1; max-width: 1150px; }
figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; max-width: 900px; }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
nav ul { columns: 2; font-size: 14px; }
.wide { overflow-x: auto; }
"""
_NUMBER = re.compile(r"^[+-]?(\d[\d.]*|\.\d+)( ± [\d.]+)?( \[[\d.]+\])?( n=\d+)?$|^\d+/\d+$|^$")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _anchor(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-") or "section"


def html_table(headers: list[str], rows: list[list[str]], text_columns: int) -> str:
    """A table; columns after the first `text_columns` are right-aligned where they hold numbers."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)

    def cell(i: int, value: str) -> str:
        numeric = i >= text_columns and _NUMBER.match(value or "")
        return f'<td class="num">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"

    body = "\n".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="wide"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _notes(notes: list[str]) -> str:
    return '<ul class="notes">\n' + "\n".join(f"<li>{_e(n)}</li>" for n in notes) + "\n</ul>"


def _percent(value) -> str:
    return "" if pd.isna(value) else f"{100 * value:.2f}"


def _fixed(value, digits: int) -> str:
    return "" if pd.isna(value) else f"{value:.{digits}f}"


def runs_table(section: Section) -> str:
    """The section's runs, one row each (at most MAX_RUN_ROWS; runs.csv holds them all)."""
    runs = runs_frame([section])
    shown = runs.head(MAX_RUN_ROWS)
    headers = ["method", "setting", "seed", "run id", "test acc %"]
    columns = [("worst_group_acc", "worst-group acc %", _percent), ("worst_class_acc", "worst-class acc %", _percent)]
    extra = [(key, name, fmt) for key, name, fmt in columns if runs[key].notna().any()]
    headers += [name for _, name, _ in extra] + ["compute fraction"]
    amortised = section.has_amortised
    if amortised:
        headers.append("compute fraction, amortised")
    headers += ["selection share %", "wall-clock s", "compute to target"]
    rows = []
    for run in shown.itertuples():
        row = [run.method, run.setting, str(run.seed), run.run_id, _percent(run.test_acc)]
        row += [fmt(getattr(run, key)) for key, _, fmt in extra]
        row.append(_fixed(run.fraction, 3))
        if amortised:
            row.append(_fixed(run.amortised_fraction, 3))
        row += [_fixed(100 * run.selection_share if not pd.isna(run.selection_share) else float("nan"), 1),
                _fixed(run.wall_clock_s, 1), _fixed(run.compute_to_target, 3)]
        rows.append(row)
    more = (f"<p>The first {MAX_RUN_ROWS} of {len(runs)} runs; runs.csv holds them all.</p>"
            if len(runs) > MAX_RUN_ROWS else "")
    return (f"<details><summary>Per-run details ({len(runs)} runs)</summary>\n"
            + html_table(headers, rows, 4) + more + "\n</details>")


def _figures(section: Section, plots_dir: Path | None, out: Path) -> str:
    if plots_dir is None:
        return ""
    figures = []
    for stem, caption, panels in plot_stems(section):
        png = plots_dir / f"{stem}.png"
        if not png.exists():
            continue
        src = Path(os.path.relpath(png, out)).as_posix()
        kind = ' class="panels"' if panels else ""
        figures.append(f'<figure{kind}><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(stem)}" loading="eager"></a>'
                       f"<figcaption>{_e(caption)} (PDF: {_e(stem)}.pdf)</figcaption></figure>")
    return '<div class="plots">\n' + "\n".join(figures) + "\n</div>" if figures else ""


def section_html(section: Section, plots_dir: Path | None, out: Path) -> str:
    headers, rows = section_table(section)
    parts = [f'<h2 id="{_e(_anchor(section.slug))}">{_e(section.title)}</h2>', html_table(headers, rows, 2),
             _notes(section.notes())]
    grid = fraction_grid(section)
    if grid is not None:
        grid_headers, grid_rows, grid_notes = grid
        parts += [f"<h3>{_e(section.title)}: by fraction kept</h3>", html_table(grid_headers, grid_rows, 1),
                  _notes(grid_notes)]
    parts += [_figures(section, plots_dir, out), runs_table(section)]
    return "\n".join(p for p in parts if p)


def _inline(text: str) -> str:
    """Our Markdown's inline marks: **bold**, `code`, and the \\| of a table cell."""
    text = _e(text.replace("\\|", "|"))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def markdown_html(text: str) -> str:
    """The Markdown the suite writes (headings, pipe tables, bullet lists, paragraphs) as HTML."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)  # the page's own h1/h2 stay above
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            head, body = _cells(block[0]), [_cells(b) for b in block[2:]]
            out.append('<div class="wide"><table><thead><tr>' + "".join(f"<th>{_inline(h)}</th>" for h in head)
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row)
                                                          + "</tr>" for row in body) + "</tbody></table></div>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append('<ul class="notes">' + "".join(items) + "</ul>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
            i += 1
        else:
            i += 1
    return "\n".join(out)


def write_report(sections: list[Section], out: str | Path, plots_dir: str | Path | None = None,
                 documents: list[tuple[str, str | Path]] = ()) -> Path:
    """OUT/report.html: every section, its plots from `plots_dir` (linked relative to OUT), then each
    (title, Markdown file) of `documents` that exists."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = Path(plots_dir) if plots_dir is not None else None
    docs = [(title, Path(path)) for title, path in documents if Path(path).exists()]
    contents = [f'<li><a href="#{_e(_anchor(s.slug))}">{_e(s.title)}</a></li>' for s in sections]
    contents += [f'<li><a href="#{_e(_anchor(title))}">{_e(title)}</a></li>' for title, _ in docs]
    body = ["<h1>Benchmark results</h1>",
            "<p>Generated by <code>python -m benchmarks tables</code> from the run records: every number below "
            "is read off them. Machine-readable: runs.csv and summary.csv beside this page (columns in README.md, "
            "&ldquo;Reading the tables&rdquo;).</p>",
            "<nav><ul>" + "".join(contents) + "</ul></nav>"]
    body += [section_html(section, plots, out) for section in sections]
    for title, path in docs:
        body += [f'<h2 id="{_e(_anchor(title))}">{_e(title)}</h2>', markdown_html(path.read_text())]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>Benchmark results</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = out / REPORT
    path.write_text(page)
    return path
