"""The CLI with the test-only method and model of tests/distributed_models.py, for data-parallel tests:
`python tests/distributed_support.py run ...`, in one process or under torchrun."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import distributed_models  # noqa: E402, F401 - registers them

from benchmarks.cli import run_and_exit  # noqa: E402

if __name__ == "__main__":
    run_and_exit(sys.argv[1:])
