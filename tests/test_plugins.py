"""Plugins and the user's own images: entry-point methods and datasets, package discovery, image-folder.

The plugin distributions are installed with pip into a folder of their own (`--target`) that the
CLI subprocesses see through PYTHONPATH, not into the shared virtual environment: an installed
plugin is visible to every process of that environment, and other test runs going on at the same
time must not meet `plugin-demo` in their registry (or a broken plugin's warning in their output).
For importlib.metadata the two are the same: a *.dist-info folder on sys.path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.core import registry
from benchmarks.data import load_data
from benchmarks.data.registry import dataset_entry, list_datasets, register_dataset
from benchmarks.errors import BenchError

REPO = Path(__file__).resolve().parents[1]

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "bench-plugin-demo"
version = "0.1.0"

[project.entry-points."data_efficiency_bench.methods"]
demo = "bench_plugin_demo.methods"

[project.entry-points."data_efficiency_bench.datasets"]
demo = "bench_plugin_demo.data"

[tool.setuptools]
packages = ["bench_plugin_demo"]
"""

PLUGIN_METHODS = '''
"""A method from another package: each epoch, a fresh random share of the training set."""

import torch

from benchmarks.api import EpochPlan, Method, Param, register


@register("plugin-demo")
class KeepRandomShare(Method):
    """Keeps a random round(fraction * N) examples, drawn afresh each epoch."""

    params = {"fraction": Param(0.5, "share of the training set kept each epoch", low=0.0, high=1.0,
                                low_open=True)}

    def plan_epoch(self, epoch):
        n = self.ctx.num_train
        keep = max(1, round(self.hparams["fraction"] * n))
        order = torch.randperm(n, generator=self.ctx.generator("plugin-demo", epoch))
        return EpochPlan(order[:keep].sort().values)
'''

PLUGIN_DATA = '''
"""A dataset from another package: 3 classes of 8x8 grey blobs, held in memory."""

import torch

from benchmarks.api import register_dataset
from benchmarks.data import DataBundle
from benchmarks.data.splits import TensorSplit


def _split(n, generator):
    labels = torch.arange(n) % 3
    images = labels.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (n, 1, 8, 8), generator=generator)
    return TensorSplit(images.to(torch.uint8), labels, (0.5,), (0.25,))


@register_dataset("plugin-blobs")
def blobs(roots, kwargs):
    generator = torch.Generator().manual_seed(0)
    n = kwargs.get("n_train", 90)
    return DataBundle(train=_split(n, generator), test=_split(30, generator), num_classes=3)
'''

# A protocol on the plugin's dataset (tiny: the sweep below runs it in a worker process).
BLOBS_PROTOCOL = """
name = "blobs"
dataset = "plugin-blobs"
data_kwargs = { n_train = 60 }
model = "tiny-cnn"
epochs = 1
batch_size = 16
eval_batch_size = 64
budget = "epochs"
optimizer = "sgd"
lr = 0.05
schedule = "constant"
"""


def _env(site: Path) -> dict:
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def cli(*args: str, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True,
                          cwd=REPO, env=_env(site), timeout=300)


def _record(out: Path, stdout: str) -> dict:
    """The record of the run that `run` reported on its last line ('complete: RUN_ID ...')."""
    run_id = stdout.strip().splitlines()[-1].split()[1]
    (path,) = out.rglob(f"{run_id}.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The demo plugin, built from its pyproject.toml and pip-installed into a folder of its own."""
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (source / "bench_plugin_demo").mkdir()
    (source / "bench_plugin_demo" / "__init__.py").write_text("")
    (source / "bench_plugin_demo" / "methods.py").write_text(PLUGIN_METHODS)
    (source / "bench_plugin_demo" / "data.py").write_text(PLUGIN_DATA)
    site = tmp_path_factory.mktemp("plugin-site")
    # No network: setuptools is already in the environment, and the plugin has no dependencies to fetch.
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                    "-q", "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    assert (site / "bench_plugin_demo-0.1.0.dist-info" / "entry_points.txt").is_file()
    return site


def test_list_shows_the_plugin_method(plugin_site):
    result = cli("list", site=plugin_site)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:1] == ["plugin-demo"] and "Keeps a random" in line for line in lines)
    assert any(line.split()[:1] == ["fraction"] and "share of the training set" in line for line in lines)
    assert "warning" not in result.stderr


def test_run_a_plugin_method_with_its_parameter(plugin_site, tmp_path):
    out = tmp_path / "out"
    result = cli("run", "--protocol", "smoke", "--method", "plugin-demo", "--param", "fraction=0.25",
                 "--set", "epochs=1", "--out", str(out), "--wandb", "off", site=plugin_site)
    assert result.returncode == 0, result.stdout + result.stderr
    record = _record(out, result.stdout)
    assert record["status"] == "complete" and record["method"] == "plugin-demo"
    assert record["params"] == {"fraction": 0.25}
    # smoke trains on 1024 examples: the plugin's plan visits round(0.25 * 1024) of them.
    assert [row["examples"] for row in record["curve"]] == [256]
    assert record["compute"]["fraction"] == pytest.approx(0.25)


def test_sweep_workers_load_plugin_methods_and_datasets(plugin_site, tmp_path):
    protocol = tmp_path / "blobs.toml"
    protocol.write_text(BLOBS_PROTOCOL)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "plug"\nprotocol = "{protocol}"\nseeds = [0]\n'
                    '[[methods]]\nname = "plugin-demo"\ngrid = { fraction = [0.5] }\n')
    out = tmp_path / "out"
    result = cli("sweep", str(spec), "--out", str(out), site=plugin_site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "summary: 1 complete" in result.stdout, result.stdout
    (path,) = [p for p in out.rglob("*.json") if "runs" in p.parts]
    record = json.loads(path.read_text())
    # The worker (a process of its own) ran the plugin's method on the plugin's dataset: 60 examples, half kept.
    assert record["status"] == "complete" and record["method"] == "plugin-demo" and record["n_train"] == 60
    assert [row["examples"] for row in record["curve"]] == [30]


def _fake_distribution(site: Path, name: str, entry_points: str, modules: dict[str, str]) -> None:
    """An installed distribution as pip leaves it, written directly (the broken ones need no build)."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    for module, text in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(text))


@pytest.fixture
def broken_site(tmp_path) -> Path:
    site = tmp_path / "site"
    _fake_distribution(site, "bench-broken", "[data_efficiency_bench.methods]\nbroken = bench_broken\n",
                       {"bench_broken": "import a_module_that_is_not_installed\n"})
    _fake_distribution(site, "bench-clash",
                       "[data_efficiency_bench.methods]\nclash = bench_clash\n"
                       "[data_efficiency_bench.datasets]\nclash-data = bench_clash_data\n",
                       {"bench_clash": """
                            from benchmarks.api import Method, register

                            @register("full")
                            class NotTheRealFull(Method):
                                pass
                            """,
                        "bench_clash_data": """
                            from benchmarks.api import register_dataset

                            register_dataset("cifar10", lambda roots, kwargs: None)
                            """})
    return site


def test_a_broken_plugin_is_one_line_and_the_rest_still_works(broken_site):
    result = cli("list", site=broken_site)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # One line per failing entry point (2 methods, 1 dataset: `list` reads the protocols, which check their
    # datasets), each said once although the registries are consulted many times.
    assert len(lines) == 3, result.stderr
    broken = next(line for line in lines if "bench-broken" in line)
    assert "ModuleNotFoundError" in broken and "a_module_that_is_not_installed" in broken
    clash = next(line for line in lines if "bench-clash" in line)
    assert "method 'full' registered twice" in clash
    assert "(data_efficiency_bench.datasets)" in lines[2] and "dataset 'cifar10' registered twice" in lines[2]
    # The built-in 'full' was kept: the plugin reusing the name is the one that failed.
    assert any(line.split()[:1] == ["full"] and "NotTheRealFull" not in line for line in result.stdout.splitlines())


def test_asking_for_a_missing_plugin_method_names_the_broken_plugin(broken_site, tmp_path):
    result = cli("run", "--protocol", "smoke", "--method", "broken-demo", "--out", str(tmp_path),
                 site=broken_site)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "unknown method 'broken-demo'" in error[0]
    assert "bench-broken 1.0" in error[0] and "a_module_that_is_not_installed" in error[0]


def test_a_dataset_plugin_clashing_with_a_built_in_is_refused(broken_site):
    # The built-in loader stays (it lives in benchmarks.data, the plugin's lambda in bench_clash_data).
    script = ("from benchmarks.data.registry import dataset_entry\n"
              "assert dataset_entry('cifar10').loader.__module__ == 'benchmarks.data'\n"
              "dataset_entry('synthetic')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=_env(broken_site), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bench-clash" in lines[0] and "dataset 'cifar10' registered twice" in lines[0]


# --- discovery and the registries, in process -------------------------------------------------------

def test_every_module_of_the_method_packages_is_discovered():
    import pkgutil

    import baselines
    import methods

    registered = {cls.__module__ for cls in registry.list_methods().values()}
    for package in (methods, baselines):
        modules = {info.name for info in pkgutil.iter_modules(package.__path__, package.__name__ + ".")}
        assert modules and modules <= registered  # each module defines at least one method, and it is registered


def test_adding_a_module_is_enough(tmp_path):
    # A package built like methods/ (its very __init__.py) plus one new module: importing the package
    # registers the new module's method, with no list to edit. In a child process: the registry of
    # this one stays as it was.
    package = tmp_path / "more_methods"
    package.mkdir()
    (package / "__init__.py").write_text((REPO / "methods" / "__init__.py").read_text())
    (package / "mine.py").write_text("from benchmarks.api import Method, register\n"
                                     "@register('discovered-demo')\nclass Mine(Method):\n    pass\n")
    script = ("import more_methods\nfrom benchmarks.core.registry import method_class\n"
              "print(method_class('discovered-demo').__module__)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env=_env(tmp_path), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "more_methods.mine", result.stderr


def test_dataset_registry_lists_the_built_ins_and_refuses_duplicates():
    names = set(list_datasets())
    assert {"synthetic", "fashion-mnist", "spurious-fashion", "cifar10", "cifar100", "imagenet", "waterbirds",
            "image-folder"} <= names
    assert dataset_entry("waterbirds").groups({}) and not dataset_entry("cifar10").groups({})
    assert dataset_entry("synthetic").groups({"groups": True}) and not dataset_entry("synthetic").groups({})
    with pytest.raises(ValueError, match="dataset 'synthetic' registered twice"):
        register_dataset("synthetic", lambda roots, kwargs: None)
    with pytest.raises(BenchError, match=r"unknown dataset 'nope' \(registered: .*image-folder"):
        load_data("nope")


CALLS = []


def _tiny_loader(roots, kwargs):
    CALLS.append((roots, kwargs))
    return load_data("synthetic", None, {"n_train": 40, "n_test": 20})


def test_a_registered_dataset_is_what_load_data_returns(tmp_path):
    from benchmarks.data import dataset_has_groups

    # One module-level loader: registering the same function again is allowed (not a duplicate).
    for _ in range(2):
        register_dataset("test-plugins-tiny", _tiny_loader, has_groups=lambda kwargs: kwargs.get("g", False))
    CALLS.clear()
    bundle = load_data("test-plugins-tiny", str(tmp_path), {"g": True})
    assert len(bundle.train) == 40 and CALLS[0][1] == {"g": True} and CALLS[0][0][0] == tmp_path
    assert dataset_has_groups("test-plugins-tiny", {"g": True}) and not dataset_has_groups("test-plugins-tiny")


# --- image-folder ------------------------------------------------------------------------------------

CLASSES = ("ant", "bee", "cat")


def _image(label: int, i: int) -> np.ndarray:
    """A 16x16 RGB image whose pixels say its class (brightness) and its number (a gradient)."""
    base = np.full((16, 16, 3), 40 + 80 * label, dtype=np.int64)
    base[:, :, 1] += np.arange(16)[None, :] + i
    return np.clip(base, 0, 255).astype(np.uint8)


def write_folder(root: Path, counts: dict[str, int], classes=CLASSES) -> dict[str, list[np.ndarray]]:
    """root/<split>/<class>/<i>.png for each split; returns each split's images in load order."""
    from PIL import Image

    written = {}
    for split, n in counts.items():
        written[split] = []
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                array = _image(CLASSES.index(name) if name in CLASSES else len(CLASSES), i)
                Image.fromarray(array).save(folder / f"{i:02d}.png")
                written[split].append(array)
    return written


def test_image_folder_splits_labels_and_pixels(tmp_path):
    written = write_folder(tmp_path / "pics", {"train": 3, "val": 2, "test": 1})
    options = {"root": "pics", "image_size": 16, "resize": 16, "num_workers": 0}  # relative to --data-root
    bundle = load_data("image-folder", str(tmp_path), options)
    assert bundle.num_classes == 3 and bundle.input_shape == (3, 16, 16)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 6, 3)
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert bundle.test.labels.tolist() == [0, 1, 2]
    # The evaluation transform at the images' own size is ToTensor + Normalize: compare with the files.
    (batch,) = list(bundle.test.batches(torch.arange(3), 8))
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    expected = (torch.from_numpy(np.stack(written["test"])).permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert torch.allclose(batch.x, expected, atol=1e-5)
    assert batch.y.tolist() == [0, 1, 2] and batch.index.tolist() == [0, 1, 2]


def test_image_folder_with_val_only_tests_on_val(tmp_path):
    write_folder(tmp_path / "pics", {"train": 2, "val": 3})
    bundle = load_data("image-folder", None, {"root": str(tmp_path / "pics"), "image_size": 8, "num_workers": 0})
    assert bundle.val is None and len(bundle.test) == 9 and bundle.input_shape == (3, 8, 8)


def test_image_folder_labels_follow_train_classes_when_test_lacks_one(tmp_path):
    write_folder(tmp_path / "pics", {"train": 2})
    write_folder(tmp_path / "pics", {"test": 2}, classes=("bee", "cat"))
    bundle = load_data("image-folder", None, {"root": str(tmp_path / "pics"), "num_workers": 0})
    assert bundle.test.labels.tolist() == [1, 1, 2, 2] and bundle.num_classes == 3


@pytest.mark.parametrize("make, kwargs, message", [
    (lambda root: None, {}, "root 'pics' not found (looked in"),
    (lambda root: (root / "pics" / "train" / "ant").mkdir(parents=True), {}, "holds no images"),
    (lambda root: (root / "pics").mkdir(), {}, "has no train/ folder"),
    (lambda root: write_folder(root / "pics", {"train": 1}), {}, "neither val/ nor test/"),
    (lambda root: (write_folder(root / "pics", {"train": 1}), write_folder(root / "pics", {"test": 1},
                                                                        classes=("ant", "dog"))),
     {}, "is a class that"),
    (lambda root: None, {"image_sise": 32}, "unknown data_kwargs key 'image_sise'"),
    (lambda root: None, {"train_crop": "random"}, "'train_crop' must be one of"),
])
def test_image_folder_bad_input_is_one_line(tmp_path, make, kwargs, message):
    make(tmp_path)
    with pytest.raises(BenchError) as error:
        load_data("image-folder", str(tmp_path), {"root": "pics", "num_workers": 0, **kwargs})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith("dataset 'image-folder': ")


def test_image_folder_protocol_runs_full_and_uniform(tmp_path):
    root = tmp_path / "pics"
    write_folder(root, {"train": 12, "val": 2, "test": 4})
    protocol = tmp_path / "folder.toml"
    protocol.write_text(textwrap.dedent(f"""
        name = "my-images"
        dataset = "image-folder"
        data_kwargs = {{ root = "{root}", image_size = 16, num_workers = 0 }}
        model = "tiny-cnn"
        epochs = 2
        batch_size = 8
        eval_batch_size = 64
        budget = "epochs"
        optimizer = "sgd"
        lr = 0.05
        schedule = "constant"
        augment = ["flip"]
        """))
    from benchmarks.core.run import RunSpec, execute
    from conftest import quiet

    for method, kept in (("full", 36), ("uniform", 18)):
        record = execute(RunSpec(str(protocol), method, {}, 0, {}), tmp_path / "out", log=quiet, progress=False)
        assert record["status"] == "complete" and record["n_train"] == 36
        assert [row["examples"] for row in record["curve"]] == [kept, kept]
        # 12 test images and 6 validation images: the accuracies are counts over exactly those.
        assert _is_count_over(record["metrics"]["test_acc"], 12)
        assert all(_is_count_over(row["val_acc"], 6) for row in record["curve"])


def _is_count_over(accuracy: float, n: int) -> bool:
    return abs(accuracy * n - round(accuracy * n)) < 1e-6
