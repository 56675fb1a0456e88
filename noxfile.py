"""Sessions: tests, lint, bench-fashion (the main CPU job), replicate-fashion, bench-cifar (GPU), tables, perf.

Every session runs in ONE environment, `.venv` at the repository root (BENCH_VENV names another):
torch is gigabytes (its CUDA build takes 5.6 GB), and an environment per session cost a newcomer
23 GB for four sessions. The environment is made on first use with --system-site-packages, so a
torch that the Python running nox already has is reused, not copied; the project is installed into
it once (again when pyproject.toml changes). `.venv/bin/python -m benchmarks ...` is then the CLI.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
ROOT = Path(__file__).resolve().parent
ENV = Path(os.environ.get("BENCH_VENV", ROOT / ".venv"))
SHARED = {"venv_backend": "none"}  # nox makes no environment of its own: every session uses ENV


def python(session: nox.Session) -> str:
    """The shared environment's python: the environment made, and the project installed, if needed."""
    executable = ENV / "bin" / "python"
    if not executable.exists():
        session.log(f"making the shared environment {ENV} (one for every session)")
        session.run(sys.executable, "-m", "venv", "--system-site-packages", str(ENV), external=True)
    stamp = ENV / ".bench-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        session.run(str(executable), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]", external=True)
        stamp.write_text(wanted)
    return str(executable)


def benchmarks(session: nox.Session, *args: str) -> None:
    session.run(python(session), "-m", "benchmarks", *args, external=True)


@nox.session(**SHARED)
def tests(session: nox.Session) -> None:
    """The test suite (pytest); extra arguments go to pytest."""
    session.run(python(session), "-m", "pytest", *(session.posargs or ["-q", "--durations=10"]), external=True)


@nox.session(**SHARED)
def lint(session: nox.Session) -> None:
    session.run(python(session), "-m", "ruff", "check", "benchmarks", "methods", "baselines", "tests", "noxfile.py",
                external=True)


@nox.session(name="bench-fashion", **SHARED)
def bench_fashion(session: nox.Session) -> None:
    """Every registered supervised method at its default settings on real Fashion-MNIST, one seed, then the table.

    On a fixed random 10,000 of the 60,000 training images (--set train_subset=10000), so that the whole
    registry (17 methods) fits well inside an hour on 2 cores (measured from a fresh clone: 21 minutes); on
    all 60,000 the same job takes several hours (GREATS and the proxy-trained scores alone take most of one). `nox -s bench-fashion -- --set
    train_subset=0` runs it on the whole training set. The whole job holds out the same 10% of its training
    examples (--set holdout=0.1), so the methods that need a held-out split (GREATS, RHO-Loss) run too and
    every method trains on the same examples. Every score method averages 2 proxy runs (--param
    score_runs=2: EL2N, GraNd and forgetting default to the paper's 10, AUM and CCS to 1). Two runs at a
    time, one thread each (--jobs 2). Records go to results/runs/, the table to
    results/sweeps/bench-fashion/tables/ (the published tables in results/tables/ are left alone;
    `python -m benchmarks publish bench-fashion` publishes the records).
    """
    benchmarks(session, "bench", "--protocol", "fashion-mnist", "--seeds", "0", "--param", "score_runs=2",
               "--set", "train_subset=10000", "--set", "holdout=0.1", "--jobs", "2", "--name", "bench-fashion",
               *session.posargs)


@nox.session(name="bench-cifar", **SHARED)
def bench_cifar(session: nox.Session) -> None:
    """The CIFAR-10 sweep (GPU scale, benchmarks/sweeps/cifar10.toml), run here by default.

    Options after -- pass through: -- --quick, -- --set epochs=30, -- --executor slurm --slurm partition=gpu.
    """
    benchmarks(session, "sweep", "cifar10", *session.posargs)


@nox.session(**SHARED)
def tables(session: nox.Session) -> None:
    """Rebuild the published tables (results/tables/: Markdown, LaTeX, plots, replication.md) from the
    published records (results/records/) alone, byte for byte (tests/test_published.py checks it)."""
    benchmarks(session, "tables", "--published", *session.posargs)


@nox.session(name="replicate-fashion", **SHARED)
def replicate_fashion(session: nox.Session) -> None:
    """The CPU-scale replication: runs or reuses the records the claims need, then the claims table.

    benchmarks/sweeps/fashion-claims.toml (3 seeds, about 3 h of CPU on 2 cores; complete runs are
    skipped); its records are published (results/records/fashion-claims/) and the published tables
    rebuilt, claims.md among them (results/tables/claims.md). Options after -- go to the sweep; a
    tiny check that leaves results/ alone writes its claims table to OUT/tables/claims.md instead:
    nox -s replicate-fashion -- --out /tmp/claims-check --set epochs=1 --set train_subset=2000
    """
    args = list(session.posargs)
    out = args[args.index("--out") + 1] if "--out" in args else "results"
    sets = [item for flag, value in zip(args, args[1:]) if flag == "--set" for item in (flag, value)]
    benchmarks(session, "sweep", "fashion-claims", *args)
    if out == "results":
        benchmarks(session, "publish", "fashion-claims")
        benchmarks(session, "tables", "--published")
        benchmarks(session, "replicate", "--records", "results/records", "--claims-only")
    else:
        benchmarks(session, "replicate", "--runs", out, "--claims-only", "--claims-out", f"{out}/tables/claims.md",
                   *sets)


# The methods the perf session measures, by option of benchmarks/tools/perf.py (which names no method
# itself). tests/test_perf.py runs this same list at a tiny size, so a broken measurement fails a test.
PERF_METHODS = {
    "--epoch-method": ["infobatch"],
    "--step-method": ["greats"],
    "--cost-method": ["el2n", "grand", "grand-lastlayer", "forgetting", "aum", "ccs", "kcenter", "herding"],
}


@nox.session(**SHARED)
def perf(session: nox.Session) -> None:
    """Speed ratios measured side by side on this machine; written to results/perf.json. Then GREATS's
    product forms (exact, last block, sketch) against a plain step with their fidelity to the exact form,
    written to results/greats-speed.json (benchmarks/tools/greats_speed.py)."""
    methods = [arg for option, names in PERF_METHODS.items() for name in names for arg in (option, name)]
    session.run(python(session), "-m", "benchmarks.tools.perf", "--out", "results/perf.json", *methods,
                *session.posargs, external=True)
    session.run(python(session), "-m", "benchmarks.tools.greats_speed", "--out", "results/greats-speed.json",
                "--merge-into", "results/perf.json", external=True)
