"""Data-parallel runs (torch.distributed, gloo, two processes on this CPU) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.core.distributed import shard_of
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.saved_models import load_saved_model
from benchmarks.errors import BenchError
from slurm_support import REPO, start_until

SUPPORT = str(REPO / "tests" / "distributed_support.py")
NO_BN = ["--set", "model_kwargs={norm='none'}"]
LONG = ["--set", "data_kwargs={n_train=6000, n_test=512, num_classes=4, size=8}"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                GLOO_SOCKET_IFNAME="lo")


def launch(ranks: int, *args: str) -> list[str]:
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    return [*prefix, SUPPORT, *args, "--wandb", "off"]


def run(ranks: int, out: Path, method: str, *args: str, seed: int = 0) -> dict:
    command = launch(ranks, "run", "--protocol", "smoke", "--method", method, "--seed", str(seed),
                     "--out", str(out), "--save-model", *args)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = list((out / "runs").glob("*.json"))
    return json.loads(path.read_text())


def weights(out: Path, record: dict) -> dict:
    return load_saved_model(record["run_id"], out).model.state_dict()


def same_compute(a: dict, b: dict) -> None:
    keys = ("train_flops", "selection_flops", "eval_flops", "full_flops", "train_examples", "fraction")
    assert {k: a["compute"][k] for k in keys} == {k: b["compute"][k] for k in keys}


@pytest.mark.parametrize("n, world", [(64, 2), (7, 2), (10, 3), (1, 2)])
def test_shards_cover_a_batch_once_in_order(n, world):
    parts = [shard_of(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_two_ranks_equal_one_process_without_batchnorm(tmp_path):
    one = run(1, tmp_path / "one", "full", *NO_BN, "--set", "epochs=2")
    two = run(2, tmp_path / "two", "full", *NO_BN, "--set", "epochs=2")
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["backend"] == "gloo"
    assert two["distributed"]["sync_batchnorm"] is False and one["distributed"]["world_size"] == 1
    same_compute(one, two)
    assert two["metrics"]["test_acc"] == one["metrics"]["test_acc"]
    a, b = weights(tmp_path / "one", one), weights(tmp_path / "two", two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)  # float sums in another order
    assert [r["train_loss"] for r in two["curve"]] == pytest.approx([r["train_loss"] for r in one["curve"]], rel=1e-5)


def test_per_rank_batchnorm_statistics_are_the_only_difference(tmp_path):
    two = run(2, tmp_path / "two", "full", "--set", "epochs=2")
    one = run(1, tmp_path / "one", "full", "--set", "epochs=2")
    import distributed_models  # noqa: F401 - the saved model uses its BatchNorm

    rank_bn = run(1, tmp_path / "rank-bn", "full", "--set", "epochs=2", "--set", "model='tiny-cnn-rank-bn'")
    same_compute(one, two)
    a, b, c = weights(tmp_path / "one", one), weights(tmp_path / "two", two), weights(tmp_path / "rank-bn", rank_bn)
    # With BatchNorm the 2-rank model is not the 1-process model ...
    assert not all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    # ... but it is, to float tolerance, one process that normalises each half batch on its own.
    assert all(torch.allclose(c[k].float(), b[k].float(), atol=1e-5, rtol=1e-4) for k in b)
    assert two["metrics"]["test_acc"] == rank_bn["metrics"]["test_acc"]


def test_sync_batchnorm_on_the_cpu_is_refused_in_one_line(tmp_path):
    command = launch(2, "run", "--protocol", "smoke", "--method", "full", "--out", str(tmp_path),
                     "--set", "sync_batchnorm=true", "--set", "epochs=1")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    assert result.returncode != 0 and "sync_batchnorm needs CUDA" in result.stdout + result.stderr


def test_infobatch_tables_and_plans_are_identical_on_both_ranks(tmp_path):
    two = run(2, tmp_path / "two", "infobatch", *NO_BN, "--set", "epochs=3")
    one = run(1, tmp_path / "one", "infobatch", *NO_BN, "--set", "epochs=3")
    info = two["distributed"]
    assert info["ranks_agree"] and len(set(info["method_state_sha256"])) == 1  # the score tables
    # Each epoch's plan was checked equal across ranks as it was made (the run fails otherwise); it
    # also equals the single process's, whose losses differ only in float rounding.
    assert [r["pruned_share"] for r in two["curve"]] == pytest.approx([r["pruned_share"] for r in one["curve"]],
                                                                      abs=0.01)
    assert two["compute"]["train_flops"] == pytest.approx(one["compute"]["train_flops"], rel=0.01)


def test_forgetting_counts_of_two_ranks_equal_one_process(tmp_path):
    # The score method's proxies run once (prepare on rank 0): its counts are the single process's.
    params = ["--param", "score_runs=1", "--set", "epochs=2"]
    two, one = run(2, tmp_path / "two", "forgetting", *params), run(1, tmp_path / "one", "forgetting", *params)
    assert two["method_stats"] == one["method_stats"] and two["distributed"]["ranks_agree"]
    same_compute(one, two)  # prepare is counted once
    # Counting in the main run's observe sees the all-gathered global batch: the same events.
    two, one = (run(r, tmp_path / f"main{r}", "test-count-forgetting", *NO_BN, "--set", "epochs=3") for r in (2, 1))
    assert two["method_stats"] == one["method_stats"] and two["method_stats"]["events"] > 0


def _start_until(command: list[str], marker: str) -> subprocess.Popen:
    return start_until(command, marker, 300, cwd=REPO, env=_env(), start_new_session=True)


def kill_everything(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL the launcher and every rank, as when a node dies (torchrun starts its workers in sessions
    of their own, so they are found by the run's output folder on their command line)."""
    subprocess.run(["pkill", "-KILL", "-f", str(out)], check=False)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", str(out)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a rank survived SIGKILL"
        time.sleep(0.2)


def test_two_rank_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["run", "--protocol", "smoke", "--method", "uniform-epoch", "--seed", "3", "--set", "epochs=3", *LONG,
            "--save-model"]
    reference = run(2, tmp_path / "ref", "uniform-epoch", "--set", "epochs=3", *LONG, seed=3)
    cut = tmp_path / "cut"
    kill_everything(_start_until(launch(2, *args, "--out", str(cut)), "epoch 1/3"), cut)
    assert not ResultsLayout(cut).record(reference["run_id"]).exists()
    resumed = subprocess.run(launch(2, *args, "--out", str(cut)), capture_output=True, text=True, cwd=REPO,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0 and "resumed at epoch 1" in resumed.stdout, resumed.stdout + resumed.stderr
    record = json.loads(ResultsLayout(cut).record(reference["run_id"]).read_text())
    assert record["metrics"] == reference["metrics"] and record["compute"] == reference["compute"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in record["curve"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in reference["curve"]]


def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path):
    args = ["run", "--protocol", "smoke", "--method", "full", "--set", "epochs=3", *LONG, *NO_BN, "--save-model"]
    reference = run(1, tmp_path / "ref", "full", "--set", "epochs=3", *LONG, *NO_BN)
    cut = tmp_path / "cut"
    kill_everything(_start_until(launch(2, *args, "--out", str(cut)), "epoch 1/3"), cut)
    resumed = subprocess.run(launch(1, *args, "--out", str(cut)), capture_output=True, text=True, cwd=REPO,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0 and "resumed at epoch 1" in resumed.stdout, resumed.stdout + resumed.stderr
    record = json.loads(ResultsLayout(cut).record(reference["run_id"]).read_text())
    assert record["distributed"]["world_size"] == 1  # the rule: a checkpoint holds global state only
    same_compute(record, reference)
    assert record["metrics"]["test_acc"] == pytest.approx(reference["metrics"]["test_acc"], abs=0.01)


def test_online_selection_with_views_is_refused_under_data_parallel():
    from benchmarks.api import Method, Selection, Traits
    from benchmarks.core.protocol import load_protocol
    from benchmarks.core.train import check_distributable

    class SelectsWithViews(Method):
        traits = Traits(augment_batches=False)

        def select(self, batch, model, step):
            return Selection(keep=torch.arange(1))

    with pytest.raises(BenchError, match="selects online and draws its own views"):
        check_distributable(load_protocol("smoke"), SelectsWithViews(), torch.device("cpu"))


def test_one_pass_online_selection_averages_its_gradients_over_the_ranks(tmp_path):
    # GREATS without BatchNorm forms the kept examples' gradient itself (no backward, so no DDP
    # all-reduce): the trainer must average it over the ranks, so it equals the two-pass path, whose
    # backward goes through DDP.
    args = (*NO_BN, "--set", "epochs=1", "--set", "holdout=0.1")
    one_pass = run(2, tmp_path / "one-pass", "greats", *args)
    two_pass = run(2, tmp_path / "two-pass", "greats", *args, "--param", "one_pass=false")
    assert one_pass["method_stats"]["one_pass_steps"] > 0 and one_pass["method_stats"]["two_pass_steps"] == 0
    assert two_pass["method_stats"]["one_pass_steps"] == 0
    a, b = weights(tmp_path / "one-pass", one_pass), weights(tmp_path / "two-pass", two_pass)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_byol_trains_on_two_ranks(tmp_path):
    # Its backbone's classifier head gets no gradient: DDP must be told, or the second step fails.
    command = launch(2, "run", "--protocol", "smoke-ssl", "--method", "byol", "--set", "epochs=1",
                     "--out", str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = list((tmp_path / "runs").glob("*.json"))
    record = json.loads(path.read_text())
    assert record["distributed"]["world_size"] == 2 and record["distributed"]["ranks_agree"]
    assert record["status"] == "complete" and record["metrics"]["test_acc"] > 0.25  # 4 classes


def test_a_failing_prepare_on_rank_0_ends_every_rank_at_once(tmp_path):
    # prepare runs on rank 0 alone: the other ranks must learn of its failure, not wait in the
    # broadcast until the collective timeout (30 minutes).
    command = launch(2, "run", "--protocol", "smoke", "--method", "test-failing-prepare", "--out", str(tmp_path))
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "prepare failed on rank 0: ValueError: the proxy's data is unreadable" in output


@pytest.mark.parametrize("method", ["group-dro", "rela"])
def test_methods_whose_state_comes_from_a_ranks_shard_are_refused_under_data_parallel(method):
    from benchmarks.core.protocol import load_protocol
    from benchmarks.core.registry import create_method
    from benchmarks.core.train import check_distributable

    with pytest.raises(BenchError, match="runs in one process only"):
        check_distributable(load_protocol("smoke"), create_method(method), torch.device("cpu"))


# -- the real one-node Slurm cluster: one array task = one 2-rank run ------------------------------

@pytest.fixture(scope="module")
def cluster():
    from slurm_support import start_cluster

    return start_cluster()


SLURM_SPEC = """
name = "ddp"
protocol = "smoke"
seeds = [4]
overrides = {{ epochs = 3, model_kwargs = {{ norm = "none" }}, data_kwargs = {{ n_train = 6000, n_test = 512, num_classes = 4, size = 8 }} }}
[slurm]
ranks_per_node = 2
parallel = 1
time = "00:10:00"
[[methods]]
name = "{method}"
"""


def test_a_slurm_array_task_runs_two_ranks_and_survives_its_warning_signal(cluster, tmp_path):
    from slurm_support import _run, _wait_gone

    spec = tmp_path / "ddp.toml"
    spec.write_text(SLURM_SPEC.format(method="uniform-epoch"))
    reference = run(2, tmp_path / "ref", "uniform-epoch", "--set", "epochs=3", *LONG, *NO_BN, seed=4)
    out = tmp_path / "results"
    env = dict(_env(), BENCH_PYTHON=sys.executable)
    result = subprocess.run([sys.executable, "-m", "benchmarks", "sweep", str(spec), "--executor", "slurm",
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.split("submitted job array ")[1].split()[0]
    log = out / "sweeps" / "ddp" / "logs" / f"{job}_0.out"
    deadline = time.monotonic() + 240
    while "epoch 1/3" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    _run(["scancel", "--signal=USR1", "--batch", f"{job}_0"])
    _wait_gone(job, timeout=300)
    text = log.read_text()
    assert "distributed run: 2 ranks" in text and "received SIGUSR1" in text, text
    assert f"requeued {job}_0" in text and "resumed at epoch" in text, text
    record = json.loads(ResultsLayout(out).record(reference["run_id"]).read_text())
    assert record["status"] == "complete" and record["distributed"]["world_size"] == 2
    assert record["metrics"] == reference["metrics"] and record["compute"] == reference["compute"]


# -- a step's collectives: few, and what they carry is exact ----------------------------------------

def _gather_packed_on_ranks(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from benchmarks.core.distributed import Dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        d = Dist(rank, world, rank, "gloo")
        rows = 3 - rank  # uneven shares, as shard_of gives for 5 rows
        g = torch.Generator().manual_seed(rank)
        tensors = [torch.randint(0, 2**40, (rows,), generator=g), torch.randn(rows, generator=g),
                   torch.randint(0, 10, (rows,), generator=g), torch.randn(rows, 4, generator=g).half(),
                   torch.rand(rows, generator=g) > 0.5, torch.randn(rows, 2, 3, generator=g).double()]
        tensors[1][0] = float("inf")
        separate = [d.gather_rows(t) for t in tensors]
        known = d.gather_rows_packed(tensors, d.shard_sizes(5))
        unknown = d.gather_rows_packed([*tensors, None], None)
        torch.save({"separate": separate, "known": known, "unknown": unknown}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_packed_gather_equals_one_gather_per_tensor_bit_for_bit(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gather_packed_on_ranks, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["unknown"][-1] is None
        for separate, known, unknown in zip(got["separate"], got["known"], got["unknown"]):
            assert len(separate) == 5
            for packed in (known, unknown):
                assert packed.dtype == separate.dtype and packed.shape == separate.shape
                assert torch.equal(packed.view(torch.uint8) if packed.dtype != torch.bool else packed,
                                   separate.view(torch.uint8) if separate.dtype != torch.bool else separate)


def test_an_observing_step_makes_one_all_gather_and_one_all_reduce(tmp_path):
    # tests/collective_counts.py counts torch.distributed's Python collectives per training step (DDP's
    # gradient all-reduce is its reducer's, not counted). Before packing, a step of an observing method
    # made 9 (two all-gathers for each of index, loss, label, logits, and the stop flag's all-reduce),
    # 10 on a step that checked the loss for finiteness (every 25th).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "collective_counts.py"), str(tmp_path), "run", "--protocol", "smoke",
               "--method", "test-count-forgetting", "--out", str(tmp_path / "res"), "--wandb", "off",
               "--set", "epochs=1", *LONG, *NO_BN]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(steps) == 93  # 94 steps of 64 (6000 examples), less the epoch's last
        assert all(step["calls"] == {"all_gather": 1, "all_reduce": 1} for step in steps), steps
