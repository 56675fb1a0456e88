"""The package works outside its checkout: a wheel installed into a fresh environment runs `bench list`, a
smoke run, a Slurm sweep (the array template ships inside the package) and `replicate` (so do the papers'
files), from a folder that is no checkout, and its records carry a code fingerprint with a sources hash
equal to the checkout's (the same code) and no git commit.

The wheel is built from a copy of the package's files (an in-tree build would leave build/ in the
checkout). The fresh environment sees the dependencies (torch ...) of the interpreter running the tests
through a .pth line, which adds that folder to sys.path without running its .pth files: an editable
install of this project there (its import hook) stays out, so `benchmarks` can only come from the wheel.
The environment sits inside a git repository of its own: its commit must not be taken for the code's.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.core.provenance import package_version, sources_sha256

REPO = Path(__file__).resolve().parents[1]
FIXTURE_PAPERS = REPO / "tests" / "fixtures" / "published" / "paper"
pytestmark = pytest.mark.slow  # about 40 s: a wheel, an environment, torch imported by each command

FAKE_SBATCH = """#!/bin/bash
# Stands in for Slurm's sbatch: the script it is given (the last argument but one) must be the template.
args=("$@")
template="${args[-2]}"
grep -q '^#SBATCH --requeue' "$template" || { echo "not the array template: $template" >&2; exit 1; }
echo "$template" >> "$FAKE_SBATCH_LOG"
echo 4242
"""


def sh(command: list, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{command}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh environment with the wheel installed, a working folder, its environment)."""
    root = tmp_path_factory.mktemp("wheel")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                 GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    sh(["git", "init", "-q"], root, clean)  # an unrelated repository around the installation
    (root / "notes.txt").write_text("not the benchmark's code\n")
    sh(["git", "add", "notes.txt"], root, clean)
    sh(["git", "commit", "-q", "-m", "unrelated"], root, clean)

    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("benchmarks", "methods", "baselines"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", source],
       root, clean, timeout=300)
    wheel = next((root / "dist").glob("*.whl"))

    venv = root / "venv"
    sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], root, clean)
    deps = [p for p in site.getsitepackages() if Path(p).is_relative_to(sys.prefix)]
    (next(venv.glob("lib/python*/site-packages")) / "zz-test-dependencies.pth").write_text("\n".join(deps) + "\n")
    sh([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
        "--no-index", wheel], root, clean, timeout=300)

    work = root / "elsewhere"  # no checkout: no benchmarks/, no slurm/, no results/paper here
    work.mkdir()
    fake_bin = root / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(FAKE_SBATCH)
    (fake_bin / "sbatch").chmod(0o755)
    env = dict(clean, PATH=f"{fake_bin}{os.pathsep}{venv / 'bin'}{os.pathsep}{clean.get('PATH', '')}",
               FAKE_SBATCH_LOG=str(root / "sbatch.log"))
    return venv / "bin", work, env


def test_the_installed_package_is_the_wheel(installed):
    bin_dir, work, env = installed
    where = sh([bin_dir / "python", "-c", "import benchmarks, methods; print(benchmarks.__file__, methods.__file__)"],
               work, env).stdout.split()
    venv = bin_dir.parent
    assert all(Path(path).is_relative_to(venv) for path in where), where


def test_list_run_sweep_and_replicate_work_outside_the_checkout(installed):
    bin_dir, work, env = installed
    bench = bin_dir / "bench"  # the console script (benchmarks.cli:main)
    listing = sh([bench, "list"], work, env).stdout
    assert "infobatch" in listing and "spurious-fashion" in listing

    out = work / "res"
    sh([bench, "run", "--protocol", "smoke", "--method", "full", "--set", "epochs=1", "--out", out, "--wandb", "off"],
       work, env)
    (record_path,) = (out / "runs").glob("*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "complete"
    # The same code as this checkout's (the wheel holds exactly its .py and .toml files), and no commit: the
    # installation sits in a git repository that does not track it.
    assert record["code"] == {"version": package_version(REPO), "git": None, "dirty": None,
                              "sources_sha256": sources_sha256(REPO)}
    assert record["env"]["git"] is None

    dry = sh([bench, "sweep", "smoke", "--executor", "slurm", "--dry-run", "--out", out], work, env).stdout
    assert "10 to run" in dry
    submitted = sh([bench, "sweep", "smoke", "--executor", "slurm", "--out", out, "--set", "epochs=1",
                    "--wandb", "off"], work, env).stdout
    assert "submitted job array 4242" in submitted
    (template,) = Path(env["FAKE_SBATCH_LOG"]).read_text().split()
    assert Path(template).is_relative_to(bin_dir.parent) and Path(template).name == "array.sbatch"

    claims = sh([bench, "replicate", "--records", out / "runs", "--claims-only"], work, env).stdout
    assert "uniform-beats-el2n-extreme" in claims  # a claim of the packaged claims.toml
    papers = sh([bench, "replicate", "--records", out / "runs"], work, env).stdout
    assert "Coverage-centric Coreset Selection" in papers and "not run" in papers
    mine = sh([bench, "replicate", "--records", out / "runs", "--papers", FIXTURE_PAPERS], work, env).stdout
    assert "Coverage-centric" not in mine and "| paper |" in mine  # --papers still overrides
