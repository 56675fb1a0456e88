"""A corpus of bad input, across every subcommand, protocol files, sweep specs, manifests and data folders.

Each case must end with exit status 2 and ONE line (stdout and stderr together) that starts with
"error:" and names what is wrong, no traceback, and nothing written (the folder the command runs in,
where every default path points, is compared file by file before and after).

To add a case: append a Case to CASES. `argv` may use {tmp} (the case's folder); `setup` writes the
files the case needs before the "before" snapshot. A new subcommand needs at least one case
(test_every_subcommand_has_cases says so).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks.cli import build_parser, main
from slurm_support import REPO

SMOKE = (REPO / "benchmarks" / "protocols" / "smoke.toml").read_text()
SPEC = """
name = "t"
protocol = "smoke"
seeds = [0]
overrides = { epochs = 1 }
[[methods]]
name = "uniform"
grid = { fraction = [0.3, 0.5] }
"""


def write(path: str, text: str | bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        target = tmp / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text if isinstance(text, bytes) else text.encode())

    return setup


def protocol_file(old: str, new: str) -> Callable[[Path], None]:
    assert old in SMOKE
    return write("p.toml", SMOKE.replace(old, new))


def spec_file(old: str, new: str) -> Callable[[Path], None]:
    assert old in SPEC
    return write("spec.toml", SPEC.replace(old, new))


GOOD_LINE = {"run_id": "r0", "protocol": "smoke", "method": "full", "params": {}, "seed": 0, "overrides": {},
             "group": "t", "out": "results", "save_model": False, "data_root": None}
MANIFEST = "results/sweeps/t/manifest.jsonl"


def manifest(*lines: str) -> Callable[[Path], None]:
    return write(MANIFEST, "".join(line + "\n" for line in lines))


def truncated_fashion_mnist(tmp: Path) -> None:
    """The four IDX files of Fashion-MNIST, whose image file holds fewer bytes than its header says."""
    folder = tmp / "fm"
    folder.mkdir()
    for name, dims in (("train-images-idx3-ubyte", (60000, 28, 28)), ("t10k-images-idx3-ubyte", (10000, 28, 28)),
                       ("train-labels-idx1-ubyte", (60000,)), ("t10k-labels-idx1-ubyte", (10000,))):
        header = struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(">" + "I" * len(dims), *dims)
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + b"\0" * 100))


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for step in setups:
            step(tmp)

    return setup


def mkdir(path: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / path).mkdir(parents=True)


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str  # a part of the one line: what was wrong
    setup: Callable[[Path], None] | None = None
    needs_no_gpu: bool = False


RUN = ["run", "--protocol", "smoke", "--method"]
CASES = [
    # the command line itself (argparse)
    Case("unknown-subcommand", ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("list-unknown-option", ["list", "--bogus"], "unrecognized arguments: --bogus"),
    Case("run-seed-not-a-number", RUN + ["full", "--seed", "abc"], "invalid int value: 'abc'"),
    Case("run-missing-method", ["run", "--protocol", "smoke"], "the following arguments are required: --method"),
    # run: names, parameters, overrides, device, results folder
    Case("run-unknown-method", RUN + ["nosuch"], "unknown method 'nosuch'"),
    Case("run-unknown-protocol", ["run", "--protocol", "nosuch", "--method", "full"], "unknown protocol 'nosuch'"),
    Case("run-param-nan", RUN + ["uniform", "--param", "fraction=nan"], "'fraction' must be a finite number"),
    Case("run-param-out-of-range", RUN + ["uniform", "--param", "fraction=2"], "out of range"),
    Case("run-param-without-value", RUN + ["uniform", "--param", "fraction"], "must look like key=value"),
    Case("run-param-unknown", RUN + ["uniform", "--param", "bogus=1"], "has no parameter 'bogus'"),
    Case("run-param-wrong-type", RUN + ["uniform", "--param", "fraction='half'"], "must be float"),
    Case("run-set-epochs-zero", RUN + ["full", "--set", "epochs=0"], "'epochs' must be >= 1"),
    Case("run-set-lr-inf", RUN + ["full", "--set", "lr=inf"], "'lr' must be a finite number"),
    Case("run-set-unknown-key", RUN + ["full", "--set", "nosuch=1"], "unknown protocol key 'nosuch'"),
    Case("run-model-kwarg-unknown", RUN + ["full", "--set", "model_kwargs={width=3}"],
         "model 'tiny-cnn' takes no model_kwargs 'width' (it takes: norm)"),
    Case("run-model-kwarg-set-elsewhere", RUN + ["full", "--set", "model_kwargs={num_classes=3}"],
         "model_kwargs 'num_classes' is set by the data"),
    Case("run-augment-p-not-a-number", RUN + ["full", "--set", "augment=[{name='flip', p=[0.1, 0.2]}]"],
         "parameter 'p' must be a number"),
    Case("run-augment-padding-fraction", RUN + ["full", "--set", "augment=[{name='crop', padding=2.5}]"],
         "parameter 'padding' must be a whole number of pixels"),
    Case("run-view-ratio-zero", RUN + ["full", "--set", "view_augment=[{name='random-resized-crop', ratio=[0, 1]}]"],
         "parameter 'ratio' must be a pair [low, high] with 0 < low"),
    Case("run-view-sigma-zero", RUN + ["full", "--set", "view_augment=[{name='gaussian-blur', sigma=[0, 1]}]"],
         "parameter 'sigma' must be a pair [low, high] with 0 < low"),
    Case("run-device-cuda-without-gpu", RUN + ["full", "--device", "cuda"], "CUDA is not available",
         needs_no_gpu=True),
    Case("run-device-unknown", RUN + ["full", "--device", "banana"], "--device 'banana' is not a device"),
    Case("run-out-is-a-file", RUN + ["full", "--set", "epochs=1", "--out", "{tmp}/afile/sub"], "is a file",
         write("afile", "x")),
    # protocol files
    Case("protocol-not-toml", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"], "not valid TOML",
         write("p.toml", "name = smoke\n")),
    Case("protocol-unknown-key", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"], "unknown key 'epoch'",
         protocol_file("epochs = 3", "epoch = 3")),
    Case("protocol-missing-key", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"], "missing key 'epochs'",
         protocol_file("epochs = 3\n", "")),
    Case("protocol-wrong-type", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"], "'epochs' must be int",
         protocol_file("epochs = 3", 'epochs = "three"')),
    Case("protocol-bad-budget", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"], "'budget' must be one of",
         protocol_file('budget = "epochs"', 'budget = "steps"')),
    Case("protocol-unknown-dataset", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"],
         "unknown dataset 'imagenette'", protocol_file('dataset = "synthetic"', 'dataset = "imagenette"')),
    Case("protocol-bad-data-kwargs", ["run", "--protocol", "{tmp}/p.toml", "--method", "full"],
         "dataset 'synthetic' could not be read", protocol_file("size = 8 }", "size = 8, colour = true }")),
    # data folders
    Case("data-root-missing", ["run", "--protocol", "fashion-mnist", "--method", "full", "--data-root", "{tmp}/nope"],
         "--data-root '{tmp}/nope' is not a folder"),
    Case("data-truncated-idx", ["run", "--protocol", "fashion-mnist", "--method", "full", "--data-root", "{tmp}/fm"],
         "truncated IDX file", truncated_fashion_mnist),
    Case("data-cifar-missing", ["run", "--protocol", "cifar10-fast", "--method", "full", "--data-root", "{tmp}/empty"],
         "dataset 'cifar10' not found", mkdir("empty")),
    Case("data-cifar-damaged", ["run", "--protocol", "cifar10-fast", "--method", "full", "--data-root", "{tmp}/c"],
         "dataset 'cifar10' could not be read", write("c/cifar-10-batches-py/data_batch_1", b"not a pickle")),
    # bench
    Case("bench-unknown-method", ["bench", "--protocol", "smoke", "--methods", "full,nosuch"], "unknown method 'nosuch'"),
    Case("bench-bad-seeds", ["bench", "--protocol", "smoke", "--seeds", "0,x"], "--seeds '0,x' must be"),
    Case("bench-param-of-no-method", ["bench", "--protocol", "smoke", "--param", "fractoin=0.5"],
         "--param 'fractoin' is a parameter of no method"),
    Case("bench-bad-name", ["bench", "--protocol", "smoke", "--name", "../x"], "job name '../x'"),
    Case("bench-cifar-quick-without-data",
         ["bench", "--protocol", "cifar10-fast", "--quick", "--data-root", "{tmp}/empty"],
         "dataset 'cifar10' not found", mkdir("empty")),
    # sweep specs and options
    Case("sweep-unknown-spec", ["sweep", "nosuch"], "unknown sweep spec 'nosuch'"),
    Case("sweep-grid-not-a-table", ["sweep", "{tmp}/spec.toml"], "'grid' must be a table",
         spec_file("grid = { fraction = [0.3, 0.5] }", "grid = [0.3, 0.5]")),
    Case("sweep-block-slurm-bad-value", ["sweep", "{tmp}/spec.toml"], "'nodes' must be a whole number >= 1",
         spec_file("grid = { fraction = [0.3, 0.5] }", 'grid = { fraction = [0.3, 0.5] }\nslurm = { nodes = "2" }')),
    Case("sweep-spec-not-toml", ["sweep", "{tmp}/spec.toml"], "not valid TOML", write("spec.toml", "[[methods]\n")),
    Case("sweep-spec-unknown-key", ["sweep", "{tmp}/spec.toml"], "unknown key 'seed'",
         spec_file("seeds = [0]", "seeds = [0]\nseed = 1")),
    Case("sweep-spec-no-methods", ["sweep", "{tmp}/spec.toml"], "missing key 'methods'",
         write("spec.toml", 'name = "t"\nprotocol = "smoke"\nseeds = [0]\n')),
    Case("sweep-spec-out-of-range", ["sweep", "{tmp}/spec.toml"], "out of range",
         spec_file("[0.3, 0.5]", "[0.3, 1.5]")),
    Case("sweep-spec-slurm-gpus", ["sweep", "{tmp}/spec.toml"], "'gpus' must be a whole number >= 0",
         spec_file("[[methods]]", "[slurm]\ngpus = -1\n[[methods]]")),
    Case("sweep-spec-protocol-edited-bad", ["sweep", "{tmp}/spec.toml"], "'lr' must be > 0",
         spec_file("overrides = { epochs = 1 }", "overrides = { epochs = 1, lr = -0.1 }")),
    Case("sweep-slurm-without-value", ["sweep", "smoke", "--slurm", "partition"], "--slurm 'partition'"),
    Case("sweep-slurm-empty-value", ["sweep", "smoke", "--slurm", "partition="], "'partition' needs a value"),
    Case("sweep-slurm-unknown-key", ["sweep", "smoke", "--slurm", "queue=gpu"], "--slurm 'queue=gpu'"),
    Case("sweep-slurm-bad-time", ["sweep", "smoke", "--executor", "slurm", "--slurm", "time=soon"],
         "'time' must be a Slurm time"),
    Case("sweep-jobs-zero", ["sweep", "smoke", "--jobs", "0"], "--jobs 0: must be >= 1"),
    Case("sweep-unknown-executor", ["sweep", "smoke", "--executor", "kubernetes"], "invalid choice: 'kubernetes'"),
    Case("sweep-cifar-quick-without-data", ["sweep", "cifar10", "--quick", "--data-root", "{tmp}/empty"],
         "dataset 'cifar10' not found", mkdir("empty")),
    Case("sweep-slurm-cifar-without-data",
         ["sweep", "cifar10", "--quick", "--executor", "slurm", "--data-root", "{tmp}/empty"],
         "dataset 'cifar10' not found", mkdir("empty")),
    # status
    Case("status-spec-file-before-any-sweep", ["status", str(REPO / "benchmarks" / "sweeps" / "smoke.toml")],
         "no manifest for sweep"),
    Case("status-unknown-sweep", ["status", "nosuch"], "no manifest for sweep 'nosuch'"),
    Case("status-corrupt-manifest", ["status", "t"], "line 1: not JSON", manifest(json.dumps(GOOD_LINE), '{"run_id": ')),
    # task (manifests)
    Case("task-corrupt-line", ["task", MANIFEST, "0"], "line 0: not JSON", manifest("{not json")),
    Case("task-line-lacks-keys", ["task", MANIFEST, "0"], "lacks 'method'",
         manifest(json.dumps({k: v for k, v in GOOD_LINE.items() if k != "method"}))),
    Case("task-index-out-of-range", ["task", MANIFEST, "5"], "has 1 lines (0 to 0); no line 5",
         manifest(json.dumps(GOOD_LINE))),
    Case("task-missing-manifest", ["task", "{tmp}/none.jsonl", "0"], "cannot read manifest"),
    Case("task-stale-run-id", ["task", MANIFEST, "0"], "run r0 is now", manifest(json.dumps(GOOD_LINE))),
    # publish
    Case("publish-unknown", ["publish", "nosuch"], "no manifest for sweep 'nosuch'"),
    Case("publish-incomplete", ["publish", "t"], "1 of 1 runs of 't' are not complete", manifest(json.dumps(GOOD_LINE))),
    # tables, plots, replicate
    Case("tables-no-such-runs", ["tables", "--runs", "{tmp}/nope"], "no such folder"),
    Case("tables-no-such-records", ["tables", "--records", "{tmp}/nope"], "--records '{tmp}/nope': no such folder"),
    Case("tables-tolerance-nan", ["tables", "--target-tolerance", "nan"], "--target-tolerance nan"),
    Case("plots-without-out", ["plots"], "the following arguments are required: --out"),
    Case("plots-no-such-runs", ["plots", "--runs", "{tmp}/nope", "--out", "{tmp}/p"], "no such folder"),
    Case("replicate-runs-absent-points-to-published",
         ["replicate", "--runs", "{tmp}/r", "--papers", str(REPO / "results" / "paper")],
         "published records are read with --records {tmp}/r/records", mkdir("r/records")),
    Case("replicate-no-papers", ["replicate", "--papers", "{tmp}/none"], "no paper files"),
    # reproduce
    Case("reproduce-unknown-target", ["reproduce", "nosuchrun", "--records", "{tmp}/records"],
         "'nosuchrun' is not a record file, a folder, a run id", mkdir("records")),
    Case("reproduce-damaged-record", ["reproduce", "{tmp}/bad.json"], "bad.json", write("bad.json", "{not json")),
    Case("replicate-bad-paper", ["replicate", "--papers", "{tmp}/papers"], "not readable TOML",
         write("papers/x.toml", "[[entry]\n")),
    # toy
    Case("toy-zero-steps", ["toy", "--steps", "0", "--out", "{tmp}/toy"], "--steps must be >= 1"),
    Case("toy-lr-nan", ["toy", "--lr", "nan", "--out", "{tmp}/toy"], "--lr must be a finite number > 0"),
    # scores
    Case("scores-unknown-score", ["scores", "--protocol", "smoke", "--score", "nosuch", "--out", "s.csv"],
         "unknown score 'nosuch'"),
    Case("scores-zero-runs", ["scores", "--protocol", "smoke", "--score", "el2n", "--score-runs", "0", "--out", "s.csv"],
         "--score-runs must be >= 1"),
]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under the folder with its type, size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def check_case(case: Case, tmp: Path, run: Callable[[list[str]], tuple[int, str]]) -> None:
    if case.needs_no_gpu and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if case.setup:
        case.setup(tmp)
    before = snapshot(tmp)
    argv = [arg.replace("{tmp}", str(tmp)) for arg in case.argv]
    code, output = run(argv)
    lines = output.strip().splitlines()
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert case.expect.replace("{tmp}", str(tmp)) in lines[0], output
    assert "Traceback" not in output
    assert snapshot(tmp) == before, "the command wrote files"


def in_process(capsys) -> Callable[[list[str]], tuple[int, str]]:
    def run(argv: list[str]) -> tuple[int, str]:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    """An empty folder to run in (every default path, such as --out results, lands there), no $BENCH_DATA."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, case_dir, capsys):
    check_case(case, case_dir, in_process(capsys))


def test_the_corpus_is_large_and_covers_every_subcommand():
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    covered = {case.argv[0] for case in CASES}
    assert set(subcommands) - covered == set(), "add bad-input cases for these subcommands"
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("status-spec-file-before-any-sweep",
                                                                "task-corrupt-line", "run-param-nan")],
                         ids=lambda c: c.id)
def test_bad_input_through_python_dash_m(case, case_dir):
    """The same answers from a real `python -m benchmarks` process (exit status and output as a shell sees them)."""
    def run(argv: list[str]) -> tuple[int, str]:
        result = subprocess.run([sys.executable, "-m", "benchmarks", *argv], capture_output=True, text=True,
                                cwd=case_dir, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return result.returncode, result.stdout + result.stderr

    check_case(case, case_dir, run)
