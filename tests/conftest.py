"""Shared fixtures: a quiet logger and helpers to run the smoke protocol into a temporary folder."""

from __future__ import annotations

import os
import tempfile

import pytest

# Runs made by tests log nowhere but their records; the W&B tests set their own mode.
os.environ.setdefault("WANDB_MODE", "disabled")
# The registry catalog (benchmarks/core/catalog.py) is cached in a folder of the test session, which it
# removes, not in the user's ~/.cache: tests clean up what they write.
_CATALOG_DIR = tempfile.TemporaryDirectory(prefix="bench-catalog-")
os.environ["BENCH_CATALOG_DIR"] = _CATALOG_DIR.name

from benchmarks.core.run import RunSpec, execute  # noqa: E402 - after the environment above is set


def quiet(*_args, **_kwargs) -> None:
    pass


def pytest_sessionfinish(session, exitstatus):
    """Tests stop what they start: the Slurm cluster a test brought up is stopped here, pass or fail, and
    the session fails if a daemon is still alive afterwards (the check that none is left behind)."""
    import slurm_support

    if not slurm_support.STARTED_BY_TESTS:
        return
    left = slurm_support.stop_cluster()
    if left:
        print(f"\nERROR: Slurm daemons left running after the tests: {', '.join(left)}")
        session.exitstatus = 1
    else:
        print("\nSlurm cluster started by the tests: stopped (no slurmctld or slurmd left)")


@pytest.fixture
def run_smoke(tmp_path):
    """Run one smoke-protocol run into tmp_path and return its record."""

    def _run(method: str = "full", params: dict | None = None, seed: int = 0, out=None, **overrides):
        spec = RunSpec("smoke", method, params or {}, seed, overrides)
        return execute(spec, out or tmp_path, log=quiet, progress=False)

    return _run
