"""The code fingerprint (benchmarks/core/provenance.py) and the tables' note on sections that mix code.

The sources hash is checked against a hand-fed sha256 of a made-up tree; the git state against a repository
made here; the note against the fixture's published records (old, without a fingerprint: no note, so the
published tables stay as they were) with fingerprints added."""

from __future__ import annotations

import copy
import hashlib
import subprocess
from pathlib import Path

import pytest

from benchmarks.core.provenance import (
    code_fingerprint,
    code_label,
    git_state,
    package_version,
    sources_sha256,
)
from benchmarks.core.record import load_records
from benchmarks.reporting.tables import build_sections, markdown_tables

REPO = Path(__file__).resolve().parents[1]
FIXTURE_RECORDS = REPO / "tests" / "fixtures" / "published" / "records"


def make_tree(root: Path) -> None:
    for relative, text in {"benchmarks/__init__.py": "", "benchmarks/core/a.py": "A = 1\n",
                           "benchmarks/protocols/p.toml": "epochs = 1\n", "methods/m.py": "M = 2\n",
                           "baselines/b.py": "B = 3\n", "benchmarks/notes.md": "not code\n",
                           "benchmarks/__pycache__/a.py": "stale\n", "tests/t.py": "not the package\n"}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def test_the_sources_hash_is_the_code_files_in_path_order(tmp_path):
    make_tree(tmp_path)
    expected = hashlib.sha256()
    for relative in ("baselines/b.py", "benchmarks/__init__.py", "benchmarks/core/a.py", "benchmarks/protocols/p.toml",
                     "methods/m.py"):
        data = (tmp_path / relative).read_bytes()
        expected.update(f"{relative}\0{len(data)}\0".encode() + data)
    assert sources_sha256(tmp_path) == expected.hexdigest()
    (tmp_path / "benchmarks" / "notes.md").write_text("edited")  # not code: same hash
    (tmp_path / "tests" / "t.py").write_text("edited")
    assert sources_sha256(tmp_path) == expected.hexdigest()
    (tmp_path / "methods" / "m.py").rename(tmp_path / "methods" / "n.py")  # same bytes, another module
    assert sources_sha256(tmp_path) != expected.hexdigest()


def test_git_state_is_the_checkouts_that_tracks_the_code(tmp_path):
    assert git_state(tmp_path) == {"git": None, "dirty": None}  # no repository
    make_tree(tmp_path)

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("__pycache__/\n")
    git("add", ".gitignore", "tests")
    git("commit", "-q", "-m", "a repository that does not track the code")
    assert git_state(tmp_path) == {"git": None, "dirty": None}
    git("add", ".")
    git("commit", "-q", "-m", "the code")
    assert git_state(tmp_path) == {"git": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "tests" / "t.py").write_text("edited")  # outside the code folders
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "methods" / "new.py").write_text("")  # untracked code counts
    assert git_state(tmp_path)["dirty"] is True


def test_the_version_is_the_checkouts_own(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "data-efficiency-bench"\nversion = "9.8.7"\n')
    assert package_version(tmp_path) == "9.8.7"
    assert code_fingerprint()["sources_sha256"] == sources_sha256(REPO)  # this process runs this checkout's code


def with_code(records: list[dict], codes: dict[str, dict]) -> list[dict]:
    """The records with a code fingerprint added to those named (run id -> fingerprint)."""
    out = copy.deepcopy(records)
    for record in out:
        if record["run_id"] in codes:
            record["code"] = codes[record["run_id"]]
    return out


A = {"version": "0.1.0", "git": "a" * 40, "dirty": False, "sources_sha256": "1" * 64}
B = {"version": "0.1.0", "git": "b" * 40, "dirty": True, "sources_sha256": "2" * 64}


@pytest.fixture(scope="module")
def records():
    found, problems = load_records(FIXTURE_RECORDS)
    assert not problems
    return found


def tables(records: list[dict]) -> str:
    return "\n".join(markdown_tables(build_sections(records, [])).values())


def test_tables_mark_a_section_whose_runs_come_from_different_code(records):
    plain = tables(records)
    assert "Mixed code" not in plain  # the published records carry no fingerprint
    everyone = [r["run_id"] for r in records]
    assert tables(with_code(records, dict.fromkeys(everyone, A))) == plain  # one code: the tables as before
    assert tables(with_code(records, {everyone[0]: A})) == plain  # one fingerprint among old records: no mix
    same_code = dict(A, git="c" * 40, dirty=True)  # another commit, the same sources: the same code
    assert tables(with_code(records, {rid: A if i % 2 else same_code for i, rid in enumerate(everyone)})) == plain

    biggest = max(build_sections(records, []), key=lambda section: len(section.runs))
    runs = list(biggest.runs["run_id"])
    assert len(runs) >= 4
    mixed = build_sections(with_code(records, {runs[0]: A, runs[1]: B, runs[2]: A}), [])
    for section in mixed:
        note = [text for text in section.notes() if text.startswith("Mixed code")]
        if section.title != biggest.title:
            assert not note, section.title
            continue
        assert note == [f"Mixed code: these runs come from different code: {code_label(A)} (2 runs); "
                        f"{code_label(B)} (1 run); no fingerprint ({len(runs) - 3} run{'s' if len(runs) > 4 else ''}). "
                        "Compare with care."]
        assert "git aaaaaaaa, sources 111111111111" in note[0] and "git bbbbbbbb (dirty)" in note[0]
        assert f"- {note[0]}" in markdown_tables([section])[section.protocol]
