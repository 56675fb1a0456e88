"""End to end on REAL Fashion-MNIST (Debian's dataset-fashion-mnist), on a subset to stay quick."""

import os
from pathlib import Path

import pytest

from benchmarks.core.run import RunSpec, execute
from conftest import quiet

DEBIAN_COPY = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def have_fashion_mnist():
    if not DEBIAN_COPY.is_dir() and not os.environ.get("BENCH_DATA"):
        if os.environ.get("CI"):
            pytest.fail("CI must install dataset-fashion-mnist (see .ci/run)")
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")


def test_real_fashion_mnist_subset_learns(have_fashion_mnist, tmp_path):
    record = execute(RunSpec("fashion-mnist", "full", {}, 0, {"train_subset": 4000, "epochs": 2}), tmp_path,
                     log=quiet, progress=False)
    assert record["status"] == "complete" and record["n_train"] == 4000
    assert record["metrics"]["test_acc"] > 0.6  # chance is 0.1; the 10,000 real test images
    assert record["compute"]["fraction"] == 1.0 and record["curve"][-1]["examples"] == 4000
