"""Sessions: tests, lint, bench-fashion (the main CPU job), bench-cifar (GPU), tables, perf.

Sessions reuse the machine's torch through --system-site-packages: torch wheels are gigabytes,
and a fresh copy per session would dominate the run time. Anything missing is installed by pip.
"""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
VENV = {"venv_params": ["--system-site-packages"]}


def install(session: nox.Session, extra: str = "") -> None:
    session.install("-e", f".{extra}")


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The test suite (pytest); extra arguments go to pytest."""
    install(session, "[dev]")
    session.run("python", "-m", "pytest", *(session.posargs or ["-q", "--durations=10"]))


@nox.session(**VENV)
def lint(session: nox.Session) -> None:
    install(session, "[dev]")
    session.run("ruff", "check", "benchmarks", "methods", "baselines", "tests", "noxfile.py", external=True)


@nox.session(name="bench-fashion", **VENV)
def bench_fashion(session: nox.Session) -> None:
    """Every registered method at its default settings on real Fashion-MNIST, one seed, then the table.

    Score methods average 2 proxy runs here instead of their paper-scale default of 10, which would
    make this CPU job take hours; the table's selection share shows what scoring cost.
    """
    install(session)
    session.run("python", "-m", "benchmarks", "bench", "--protocol", "fashion-mnist", "--seeds", "0",
                "--param", "score_runs=2", *session.posargs)


@nox.session(name="bench-cifar", **VENV)
def bench_cifar(session: nox.Session) -> None:
    """The CIFAR-10 sweep (GPU scale, benchmarks/sweeps/cifar10.toml), run here by default.

    Options after -- pass through: -- --quick, -- --set epochs=30, -- --executor slurm --slurm partition=gpu.
    """
    install(session)
    session.run("python", "-m", "benchmarks", "sweep", "cifar10", *session.posargs)


@nox.session(**VENV)
def tables(session: nox.Session) -> None:
    """Regenerate results/tables/ from the run records under results/runs/."""
    install(session)
    session.run("python", "-m", "benchmarks", "tables", "--runs", "results", "--out", "results/tables")
    session.run("python", "-m", "benchmarks", "plots", "--runs", "results", "--out", "results/tables/plots")
    session.run("python", "-m", "benchmarks", "replicate", "--runs", "results", "--out",
                "results/tables/replication.md")


@nox.session(**VENV)
def perf(session: nox.Session) -> None:
    """Speed ratios measured side by side on this machine; written to results/perf.json."""
    install(session)
    session.run("python", "-m", "benchmarks.perf", "--out", "results/perf.json", *session.posargs)
