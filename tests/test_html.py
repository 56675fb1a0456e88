"""report.html: the page `tables` writes beside the tables, checked as text and in a real browser.

The browser test opens the page in headless Chromium (Debian's `chromium`; CI installs it), takes a
screenshot, and reads back, from the DOM after the load event, whether every image loaded (complete
with a natural width) and which tables are there. Without chromium it is skipped, saying why.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import results, sections_of  # noqa: F401 - `results` is the fixture of hand-made records

from benchmarks.reporting.html import markdown_html, write_report
from benchmarks.reporting.plots import plot_stems, write_plots

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


def build_report(folder: Path) -> tuple[Path, list]:
    sections, _ = sections_of(folder)
    out = folder / "tables"
    write_plots(sections, out / "plots")
    claims = out / "claims.md"
    claims.write_text("### Claims\n\n| claim | verdict |\n|---|---|\n| **a** \\| b | holds |\n\n- a rule\n")
    return write_report(sections, out, out / "plots", [("Claims", claims), ("Missing", out / "none.md")]), sections


def test_report_holds_every_table_note_plot_and_run(results):  # noqa: F811 - the fixture
    page, (section,) = build_report(results)
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # the table, with the same cells as the Markdown table
    assert "<th>test acc % (mean ± std)</th>" in text
    assert re.search(r"<td>uniform</td><td>fraction=0.5</td><td class=\"num\">3</td>"
                     r"<td class=\"num\">88.00 ± 3.00</td>", text)
    for note in section.notes():  # the rules under the table
        assert f"<li>{html.escape(note)}</li>" in text
    sources = re.findall(r'<img src="([^"]+)"', text)
    assert sources == [f"plots/{stem}.png" for stem, _, _ in plot_stems(section)]
    assert all((page.parent / src).is_file() for src in sources)
    assert "Per-run details (6 runs)" in text and text.count("<td>s0</td>") == 1  # every complete run, once
    assert "<strong>a</strong> | b" in text and "<h2 id=\"Claims\">Claims</h2>" in text
    assert "Missing" not in text  # a document that does not exist is left out
    assert str(results) not in text  # no absolute path: the same records give the same bytes anywhere
    first = text
    write_report(sections_of(results)[0], page.parent, page.parent / "plots", [("Claims", page.parent / "claims.md")])
    assert page.read_text() == first


def test_markdown_of_the_suite_renders_as_html():
    text = "### T\n\n| a | b |\n|---|---:|\n| x \\| y | **1** |\n\n- one `code`\n- two\n\nplain <p>\n"
    assert markdown_html(text) == (
        "<h4>T</h4>\n"
        '<div class="wide"><table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>x | y</td>'
        "<td><strong>1</strong></td></tr></tbody></table></div>\n"
        '<ul class="notes"><li>one <code>code</code></li><li>two</li></ul>\n'
        "<p>plain &lt;p&gt;</p>")


CHECK = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "page-check";
  out.textContent = JSON.stringify({
    images: Array.from(document.images).map(i => [i.getAttribute("src"), i.complete && i.naturalWidth > 0]),
    tables: document.querySelectorAll("table").length,
    headings: Array.from(document.querySelectorAll("h2")).map(h => h.textContent)});
  document.body.appendChild(out);
});
</script>
"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium): the page is not "
                                             "opened in a browser here")
def test_report_opens_in_a_browser_with_every_image_loaded(results):  # noqa: F811 - the fixture
    page, (section,) = build_report(results)
    probe = page.with_name("report-check.html")  # beside the page, so its relative image links hold
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="page-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"no check in the page's DOM; chromium said: {dom.stderr[-2000:]}"
    check = json.loads(html.unescape(found.group(1)))
    assert [src for src, _ in check["images"]] == [f"plots/{stem}.png" for stem, _, _ in plot_stems(section)]
    assert all(loaded for _, loaded in check["images"]), check["images"]
    assert check["tables"] == 3  # the section's table, its runs, the claims
    assert check["headings"] == ["toy", "Claims"]
    shot = page.with_name("report.png")
    chromium(f"--screenshot={shot}", "--window-size=1400,3000", page.as_uri())
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
