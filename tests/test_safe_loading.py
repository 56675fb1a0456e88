"""Nothing read from disk runs code: checkpoints, proxy partials, saved models (priors) and CIFAR files are
read by loaders that refuse what they do not know, in one line; a run's own checkpoint still resumes to the
same record; and no secret from the environment reaches a record, a log line or W&B's config."""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.core import train
from benchmarks.core.checkpoint import CheckpointRefused, check_storable, load_checkpoint, save_checkpoint
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.record import load_record
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.core.saved_models import load_saved_model
from benchmarks.errors import BenchError
from benchmarks.jobs.sweep import load_sweep, write_manifest
from benchmarks.kit.proxies import cache_file, train_proxy
from conftest import quiet

REPO = Path(__file__).resolve().parent.parent
SMOKE = {"epochs": 2}


class Planted:
    """What a planted file holds: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant(path: Path, marker: Path, entries: dict | None = None) -> bytes:
    """A torch file at `path` whose unpickling would create `marker`; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(entries or {}), "meter": Planted(marker)}, path)
    return path.read_bytes()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=300)


def one_line_refusal(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run stopped with exit status 2 and one line on stderr holding `fragments`; no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def same_record(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"] and a["compute"] == b["compute"]
    assert a["method_stats"] == b["method_stats"]
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a["curve"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b["curve"]]


def killed_after_first_epoch(spec: RunSpec, out: Path, monkeypatch) -> None:
    """Run `spec` into `out` and die in its second epoch like a SIGKILL: no record, the epoch-1 checkpoint stays."""
    original = train.Trainer.run_epoch

    def die_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(train.Trainer, "run_epoch", die_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, out, log=quiet)
    monkeypatch.setattr(train.Trainer, "run_epoch", original)


# -- the plant works: an unsafe load would run it --------------------------------------------------------


def test_a_planted_file_runs_code_when_unpickled_the_old_way(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "planted.pt", marker)
    torch.load(tmp_path / "planted.pt", weights_only=False)  # what run.py did before
    assert marker.exists()


# -- through the command line: one line, exit status 2, nothing run -----------------------------------


def test_a_planted_checkpoint_is_refused_in_one_line_and_left_alone(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "ran"
    rid = RunSpec("smoke", "full", {}, 0, {"epochs": 1}).run_id
    path = ResultsLayout(out).checkpoint(rid)
    planted = plant(path, marker)
    result = cli("run", "--protocol", "smoke", "--method", "full", "--set", "epochs=1", "--out", str(out))
    one_line_refusal(result, str(path), "not trusted", "posix.system", "--force")
    assert not marker.exists()
    assert path.read_bytes() == planted  # nothing overwritten until the user says so
    assert not ResultsLayout(out).record(rid).exists()


def test_a_planted_saved_model_given_as_a_prior_is_refused_in_one_line(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "ran"
    path = ResultsLayout(out).model("planted")
    plant(path, marker, {"info": {}, "build": {}, "state": {}})
    result = cli("run", "--protocol", "smoke-ssl", "--method", "rela", "--param", "prior=run:planted",
                 "--set", "epochs=1", "--out", str(out))
    one_line_refusal(result, str(path), "not trusted")
    assert not marker.exists()


def write_cifar10(folder: Path, planted: Path | None = None) -> None:
    """The CIFAR-10 python files (two images each); with `planted`, data_batch_1 is replaced by a plant."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": name.encode(), b"labels": [1, 2], b"filenames": [b"x.png"] * 2,
                 b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        if planted is not None and name == "data_batch_1":
            entry[b"data"] = Planted(planted)
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)


def test_a_planted_cifar_file_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    write_cifar10(tmp_path / "data" / "cifar-10-batches-py", planted=marker)
    result = cli("run", "--protocol", "cifar10-fast", "--method", "full", "--data-root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out"))
    one_line_refusal(result, "data_batch_1", "posix.system", "download the dataset again")
    assert not marker.exists()


def test_the_cifar_reader_still_reads_files_of_every_pickle_protocol(tmp_path):
    from benchmarks.data.sources import read_cifar

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    expected = read_cifar(folder, "cifar10")
    for protocol in (2, 5):  # the official files are protocol 2 (Python 2); numpy 2 writes _frombuffer at 5
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f)
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f, protocol=protocol)
        again = read_cifar(folder, "cifar10")
        assert all(torch.equal(again[k], expected[k]) for k in expected)
    assert expected["train_y"].tolist() == [1, 2] * 5 and expected["train_x"].shape == (10, 3, 32, 32)


# -- a damaged or foreign checkpoint: one line; --force sets it aside ---------------------------------


def test_a_truncated_checkpoint_stops_the_run_and_force_sets_it_aside(tmp_path, monkeypatch):
    spec = RunSpec("smoke", "full", {}, 1, SMOKE)
    reference = execute(spec, tmp_path / "ref", log=quiet)
    out = tmp_path / "cut"
    killed_after_first_epoch(spec, out, monkeypatch)
    path = ResultsLayout(out).checkpoint(spec.run_id)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointRefused) as refused:
        execute(spec, out, log=quiet)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "truncated" in message and "--force" in message
    assert path.read_bytes() == whole[: len(whole) // 2] and not ResultsLayout(out).record(spec.run_id).exists()
    said = []
    forced = execute(spec, out, log=said.append, force=True)
    assert (path.parent / f"{path.name}.refused").read_bytes() == whole[: len(whole) // 2]  # kept, for a look
    assert any("set aside" in line for line in said) and not any("resumed" in line for line in said)
    same_record(forced, reference)  # started fresh


def test_a_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    first, second = RunSpec("smoke", "full", {}, 1, SMOKE), RunSpec("smoke", "full", {}, 2, SMOKE)
    killed_after_first_epoch(first, tmp_path, monkeypatch)
    layout = ResultsLayout(tmp_path)
    shutil.copy(layout.checkpoint(first.run_id), layout.checkpoint(second.run_id))
    with pytest.raises(CheckpointRefused, match=f"belongs to '{first.run_id}', not to '{second.run_id}'"):
        execute(second, tmp_path, log=quiet)
    resumed = execute(first, tmp_path, log=quiet)  # its own run still resumes from it
    assert resumed["status"] == "complete"


def test_a_checkpoint_whose_state_does_not_fit_the_run_is_one_line(tmp_path, monkeypatch):
    spec = RunSpec("smoke", "full", {}, 1, SMOKE)
    killed_after_first_epoch(spec, tmp_path, monkeypatch)
    path = ResultsLayout(tmp_path).checkpoint(spec.run_id)
    entries = load_checkpoint(path, spec.run_id)
    entries["trainer"]["model"] = {"no.such.weight": torch.zeros(1)}  # what another version of the code might hold
    save_checkpoint(path, entries, owner=spec.run_id)
    with pytest.raises(CheckpointRefused, match="its state does not fit this run") as refused:
        execute(spec, tmp_path, log=quiet)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_record(tmp_path, monkeypatch):
    spec = RunSpec("smoke", "uniform-epoch", {}, 3, SMOKE)
    reference = execute(spec, tmp_path / "ref", log=quiet)
    killed_after_first_epoch(spec, tmp_path / "cut", monkeypatch)
    checkpoint = load_checkpoint(ResultsLayout(tmp_path / "cut").checkpoint(spec.run_id), spec.run_id)
    assert checkpoint["trainer"]["train_state"]["epoch"] == 1
    said = []
    resumed = execute(spec, tmp_path / "cut", log=said.append)
    assert any("resumed at epoch 1" in line for line in said)
    same_record(resumed, reference)


def test_a_planted_proxy_partial_is_not_run_and_the_proxy_trains_from_its_start(tmp_path):
    protocol = apply_overrides(load_protocol("smoke"), {"epochs": 1})
    said, marker = [], tmp_path / "ran"
    ctx = build_context(protocol, 0, cache_dir=tmp_path / "cache", log=said.append)
    plant(cache_file(ctx, "proxies", "epoch1-run0-seed0-plain.partial"), marker)
    model, cached = train_proxy(ctx, 0, 1)
    assert not marker.exists() and not cached
    assert any("proxy partial checkpoint" in line and "not trusted" in line for line in said)
    clean = build_context(protocol, 0, cache_dir=tmp_path / "clean", log=quiet)
    expected, _ = train_proxy(clean, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert ctx.meter.flops == clean.meter.flops


# -- saved models: a state dict and the recipe, rebuilt without touching the run's randomness ----------


def test_a_saved_model_is_rebuilt_from_its_state_dict_without_drawing_from_the_global_rng(tmp_path):
    record = execute(RunSpec("smoke-ssl", "byol", {}, 5, {"epochs": 1}), tmp_path, log=quiet, save=True)
    rid = record["run_id"]
    saved_file = load_checkpoint(ResultsLayout(tmp_path).model(rid), rid)
    state = torch.get_rng_state()
    saved = load_saved_model(rid, tmp_path)
    assert torch.equal(torch.get_rng_state(), state)  # a prior loaded mid-run leaves the run's draws alone
    assert saved.info["run_id"] == rid and saved.backbone is saved.model.get_submodule(saved_file["build"]["backbone"])
    weights = saved.model.state_dict()
    assert weights.keys() == saved_file["state"].keys()
    assert all(torch.equal(weights[k], saved_file["state"][k]) for k in weights)
    assert not saved.model.training
    # The same file under another run's name is refused.
    shutil.copy(ResultsLayout(tmp_path).model(rid), ResultsLayout(tmp_path).model("other"))
    with pytest.raises(CheckpointRefused, match=f"belongs to '{rid}', not to 'other'"):
        load_saved_model("other", tmp_path)


# -- the format itself ----------------------------------------------------------------------------------


def test_what_check_storable_admits_the_safe_loader_reads_back(tmp_path):
    entries = {"none": None, "flag": True, "n": 3, "x": 0.5, "z": 1 + 2j, "s": "text", "b": b"\x00\xff",
               "ba": bytearray(b"ab"), "device": torch.device("cpu"), "dtype": torch.float16,
               "tensor": torch.arange(4), "param": torch.nn.Parameter(torch.ones(2)), "size": torch.Size([2, 3]),
               "list": [1, [2.0]], "tuple": (1, "a"), "set": {1, 2}, "ordered": OrderedDict(a=1),
               "counter": Counter("aab"), "nested": {1: {"k": torch.zeros(1)}}}
    check_storable(entries)
    save_checkpoint(tmp_path / "c.pt", entries, owner="me")
    back = load_checkpoint(tmp_path / "c.pt", "me", tuple(entries))
    assert back.keys() == entries.keys()
    for key, value in entries.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back[key], value)
        else:
            assert back[key] == value and type(back[key]) is type(value), key


@pytest.mark.parametrize("value, named", [(np.zeros(2), "numpy.ndarray"), (np.float64(1.0), "numpy.float64"),
                                          (Path("x"), "Path"), (frozenset({1}), "frozenset")])
def test_a_state_the_safe_loader_could_not_read_fails_when_saved(tmp_path, value, named):
    with pytest.raises(TypeError, match=rf"\['trainer'\]\['method'\]\['scores'\] is a .*{named}"):
        save_checkpoint(tmp_path / "c.pt", {"trainer": {"method": {"scores": value}}}, owner="me")
    assert not (tmp_path / "c.pt").exists()


def test_wrong_entries_and_other_formats_are_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"meter": {}}, owner="me")
    with pytest.raises(CheckpointRefused, match="incomplete: it lacks trainer"):
        load_checkpoint(tmp_path / "c.pt", "me", ("meter", "trainer"))
    torch.save({"meter": {}, "trainer": {}}, tmp_path / "old.pt")  # an older suite's checkpoint: no format
    with pytest.raises(CheckpointRefused, match="not a checkpoint of this format"):
        load_checkpoint(tmp_path / "old.pt", "me")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointRefused, match="damaged, or a pickle that is not a torch file"):
        load_checkpoint(tmp_path / "junk.pt", "me")
    with open(tmp_path / "plain.pt", "wb") as f:  # a plain pickle (not torch's zip): refused all the same
        pickle.dump({"meter": Planted(tmp_path / "ran")}, f)
    with pytest.raises(CheckpointRefused, match="nothing was unpickled"):
        load_checkpoint(tmp_path / "plain.pt", "me")
    assert not (tmp_path / "ran").exists()
    assert load_checkpoint(tmp_path / "absent.pt", "me") is None
    assert issubclass(CheckpointRefused, BenchError)


# -- secrets stay out of records, logs and W&B -----------------------------------------------------------


SENTINEL = "sentinel-0d5e9c41-never-write-me"
SECRETS = {"WANDB_API_KEY": SENTINEL + "x" * 10, "HF_TOKEN": SENTINEL, "GITHUB_TOKEN": SENTINEL,
           "AWS_SECRET_ACCESS_KEY": SENTINEL, "MY_SERVICE_KEY": SENTINEL, "DB_PASSWORD": SENTINEL}


def test_no_secret_from_the_environment_reaches_a_record_a_log_or_wandb(tmp_path):
    out = tmp_path / "out"
    # Offline W&B (a key in the environment would otherwise mean online): its files hold the config it was given.
    result = cli("run", "--protocol", "smoke", "--method", "full", "--set", "epochs=1", "--out", str(out),
                 "--wandb", "offline", env=SECRETS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert SENTINEL not in result.stdout + result.stderr
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.suffix == ".json" for path in files) and any(path.suffix == ".wandb" for path in files)
    leaked = [str(path) for path in files if SENTINEL.encode() in path.read_bytes()]
    assert not leaked
    assert load_record(next((out / "runs").glob("*.json")))["status"] == "complete"


def test_no_secret_from_the_environment_reaches_a_sweep_manifest(tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "t"\nprotocol = "smoke"\nseeds = [0]\n[[methods]]\nname = "full"\n')
    manifest, lines = write_manifest(load_sweep(str(spec)), tmp_path / "out")
    assert len(lines) == 1 and SENTINEL not in manifest.read_text()
