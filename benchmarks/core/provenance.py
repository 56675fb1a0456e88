"""Which code made a run: the code fingerprint every record carries (record["code"]).

    {"version": "0.1.0",                  the package version (pyproject's beside a checkout, else the
                                           installed distribution's)
     "git": "<40 hex>" | None,            the commit, when the code runs from a git checkout that tracks it
     "dirty": bool | None,                uncommitted changes (untracked files included) under the code
                                           folders; None without git
     "sources_sha256": "<64 hex>"}        sha256 of the code itself (below)

The sources hash is always computed, not only without git: a dirty checkout's commit does not say
which code ran, and a wheel has no commit at all, while equal hashes say the same code whether it ran
from a clone or from an installed copy. It covers every .py and .toml file under the code folders
(benchmarks/, methods/, baselines/: the harness, its protocols and sweep specs, the methods), sorted
by relative path, each fed as "path NUL length NUL bytes", so a renamed or moved file changes it too.
Methods that plugins add from other packages are outside it (their own packages' versions say them).

Computed once per process, at the first run: what is hashed is the code as the process started with
it, not files edited while a long run trains.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DISTRIBUTION = "data-efficiency-bench"
CODE_PACKAGES = ("benchmarks", "methods", "baselines")
SOURCE_SUFFIXES = (".py", ".toml")
# The folder holding the code packages: the checkout's root, or site-packages for an installed copy.
CODE_ROOT = Path(__file__).resolve().parents[2]


def sources_sha256(root: Path = CODE_ROOT) -> str:
    """sha256 of the .py and .toml files under root's code folders (see the module docstring)."""
    files = sorted((path.relative_to(root).as_posix(), path) for package in CODE_PACKAGES
                   for path in (root / package).rglob("*")
                   if path.suffix in SOURCE_SUFFIXES and path.is_file() and "__pycache__" not in path.parts)
    digest = hashlib.sha256()
    for relative, path in files:
        data = path.read_bytes()
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def package_version(root: Path = CODE_ROOT) -> str | None:
    """The version of the code that runs: a checkout's own pyproject.toml (another copy of the package may be
    installed in the same environment, with another version), else the installed distribution's."""
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
        if project.get("name") == DISTRIBUTION and isinstance(project.get("version"), str):
            return project["version"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def git_state(root: Path = CODE_ROOT) -> dict:
    """{"git": commit, "dirty": bool} when root is a git checkout that tracks this code, else both None.

    "Tracks this code" is checked: an installed copy can sit inside some other repository (a virtual
    environment in a project's folder), whose commit says nothing about this code.
    """
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)

    try:
        tracked = git("ls-files", "--error-unmatch", "--", "benchmarks/__init__.py")
        if tracked.returncode != 0:
            return {"git": None, "dirty": None}
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", *CODE_PACKAGES)
    except (OSError, subprocess.SubprocessError):
        return {"git": None, "dirty": None}
    if commit.returncode != 0 or status.returncode != 0:
        return {"git": None, "dirty": None}
    return {"git": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> dict:
    """The code fingerprint of this process's code (the module docstring); computed once."""
    return {"version": package_version(), **git_state(), "sources_sha256": sources_sha256()}


def code_key(code: dict) -> str:
    """What tells two records' code apart: the sources hash (the commit and dirty flag where it is absent)."""
    return code.get("sources_sha256") or f"{code.get('git')}{'-dirty' if code.get('dirty') else ''}"


def code_label(code: dict | None) -> str:
    """A fingerprint in a few words, for tables and reports: "0.1.0, git 0c408a9f (dirty), sources 1a2b3c4d5e6f"."""
    if not code:
        return "no code fingerprint (an older record)"
    parts = [str(code.get("version") or "version unknown")]
    if code.get("git"):
        parts.append(f"git {code['git'][:8]}" + (" (dirty)" if code.get("dirty") else ""))
    if code.get("sources_sha256"):
        parts.append(f"sources {code['sources_sha256'][:12]}")
    return ", ".join(parts)
