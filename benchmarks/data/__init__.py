"""Dataset loading: where to look, the on-disk formats, and the splits the trainer iterates.

Every dataset looks in the same order: `--data-root`, then `$BENCH_DATA`, then well-known local
copies (Debian's dataset-fashion-mnist), then a download where the dataset allows it. If none works,
one error says where it looked and what to do.

Datasets are found by name in benchmarks/data/registry.py: the built-ins are registered at the end of
this module, plugins' through the entry-point group `data_efficiency_bench.datasets`.

The splits module (which imports benchmarks.api) is imported inside functions only: benchmarks.api
re-exports register_dataset, and importing this package must not need benchmarks.api half-loaded.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.data import image_folder, sources, spurious, waterbirds
from benchmarks.data.registry import dataset_entry, register_dataset
from benchmarks.errors import BenchError

if TYPE_CHECKING:
    from benchmarks.data.splits import StreamingSplit, TensorSplit

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "data-efficiency-bench"


@dataclass
class DataBundle:
    train: TensorSplit | StreamingSplit
    test: TensorSplit | StreamingSplit
    num_classes: int
    val: TensorSplit | StreamingSplit | None = None
    # With train_subset or a held-out split: each training example's index in the full training split.
    train_origin: torch.Tensor | None = None
    holdout: TensorSplit | StreamingSplit | None = None  # carved from the training data (carve_holdout)
    holdout_origin: torch.Tensor | None = None  # its examples' indices in the full training split
    # Groups (Waterbirds, spurious-fashion): how many there are (0 = the data has none), and the number
    # of TRAINING examples in each, counted before the training labels are hidden from methods (the
    # adjusted average accuracy weights each group's accuracy by these).
    num_groups: int = 0
    train_group_counts: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple:
        return self.train.input_shape

    def eval_splits(self) -> dict:
        splits = {"test": self.test}
        if self.val is not None:
            splits["val"] = self.val
        return splits


def search_roots(data_root: str | None) -> list[Path]:
    roots = []
    if data_root:
        if not Path(data_root).is_dir():  # a typo would otherwise fall through to other copies silently
            raise BenchError(f"--data-root '{data_root}' is not a folder (give an existing folder holding the "
                             "datasets, or leave it out to use $BENCH_DATA and the usual places)")
        roots.append(Path(data_root))
    if os.environ.get("BENCH_DATA"):
        roots.append(Path(os.environ["BENCH_DATA"]))
    roots.append(DEFAULT_CACHE)
    return roots


def _missing(name: str, looked: list[Path], how: str) -> BenchError:
    """One line: where it looked and what to do (the CLI prints BenchError messages as one line)."""
    where = ", ".join(str(p) for p in looked)
    return BenchError(f"dataset '{name}' not found (looked in {where}). {how}")


def _fashion_mnist_candidates(roots: list[Path]) -> list[Path]:
    candidates = []
    for root in roots:
        candidates += [root / "fashion-mnist", root, root / "FashionMNIST" / "raw"]
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    return candidates


def _fashion_mnist(roots: list[Path], kwargs: dict) -> DataBundle:
    candidates = _fashion_mnist_candidates(roots)
    for folder in candidates:
        if sources.has_idx_files(folder):
            return _bundle_from_arrays(sources.read_fashion_mnist(folder), sources.FASHION_MNIST_STATS, 10)
    download_root = roots[0]
    try:
        sources.download_torchvision("FashionMNIST", download_root)
        return _bundle_from_arrays(sources.read_fashion_mnist(download_root / "FashionMNIST" / "raw"),
                                   sources.FASHION_MNIST_STATS, 10)
    except Exception as exc:  # noqa: BLE001 - any download failure ends in the same advice
        raise _missing("fashion-mnist", candidates,
                       "Install Debian's package (apt-get install dataset-fashion-mnist), or put the four IDX "
                       f"files (train-images-idx3-ubyte.gz, ...) under --data-root. Download failed: {exc}") from None


def _cifar(name: str, roots: list[Path], kwargs: dict) -> DataBundle:
    folder_name = sources.CIFAR_FOLDERS[name]
    candidates = [root / folder_name for root in roots]
    for folder in candidates:
        if folder.is_dir():
            return _bundle_from_arrays(sources.read_cifar(folder, name), sources.CIFAR_STATS[name],
                                       sources.CIFAR_CLASSES[name])
    try:
        sources.download_torchvision("CIFAR10" if name == "cifar10" else "CIFAR100", roots[0])
        return _bundle_from_arrays(sources.read_cifar(roots[0] / folder_name, name), sources.CIFAR_STATS[name],
                                   sources.CIFAR_CLASSES[name])
    except Exception as exc:  # noqa: BLE001
        raise _missing(name, candidates,
                       f"Put torchvision's '{folder_name}' folder under --data-root or $BENCH_DATA "
                       f"(python -c \"import torchvision; torchvision.datasets."
                       f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}('DIR', download=True)\"). "
                       f"Download failed: {exc}") from None


def _cifar10(roots: list[Path], kwargs: dict) -> DataBundle:
    return _cifar("cifar10", roots, kwargs)


def _cifar100(roots: list[Path], kwargs: dict) -> DataBundle:
    return _cifar("cifar100", roots, kwargs)


def _imagenet(roots: list[Path], kwargs: dict) -> DataBundle:
    candidates = [root / "imagenet" for root in roots] + list(roots)
    for folder in candidates:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            train, val = sources.read_imagefolder(folder, kwargs)
            return DataBundle(train=train, test=val, num_classes=len(train.dataset.classes))
    raise _missing("imagenet", candidates,
                   "ImageNet cannot be downloaded automatically: put it in ImageFolder layout "
                   "(imagenet/train/<class>/*.JPEG and imagenet/val/<class>/*.JPEG) under --data-root.")


def _bundle_from_arrays(arrays: dict, stats: tuple, num_classes: int, num_groups: int = 0) -> DataBundle:
    """TensorSplits from {split_x, split_y[, split_g]} for train, test and (if present) val."""
    from benchmarks.data.splits import TensorSplit

    mean, std = stats

    def split(name: str) -> TensorSplit | None:
        if f"{name}_x" not in arrays:
            return None
        return TensorSplit(arrays[f"{name}_x"], arrays[f"{name}_y"], mean, std, arrays.get(f"{name}_g"))

    return DataBundle(train=split("train"), test=split("test"), val=split("val"), num_classes=num_classes,
                      num_groups=num_groups)


def _fashion_mnist_arrays(roots: list[Path]) -> dict | None:
    for folder in _fashion_mnist_candidates(roots):
        if sources.has_idx_files(folder):
            return sources.read_fashion_mnist(folder)
    return None


def _spurious_fashion(roots: list[Path], kwargs: dict) -> DataBundle:
    spurious.resolve_kwargs(kwargs)  # bad parameters fail before the data is read
    arrays = _fashion_mnist_arrays(roots)
    if arrays is None:
        _fashion_mnist(roots, {})  # downloads where it can, or raises the one clear error
        arrays = _fashion_mnist_arrays(roots)
    made = spurious.make_spurious_fashion(arrays, kwargs)
    flat = {f"{name}_{part}": tensor for name, (x, y, g) in made["splits"].items()
            for part, tensor in zip("xyg", (x, y, g))}
    return _bundle_from_arrays(flat, made["stats"], 2, spurious.NUM_GROUPS)


def _waterbirds(roots: list[Path], kwargs: dict) -> DataBundle:
    folder = waterbirds.find_folder(roots)
    if folder is None:
        raise _missing("waterbirds", waterbirds.candidate_folders(roots), waterbirds.WHERE_TO_GET)
    splits = waterbirds.read_waterbirds(folder, kwargs)
    return DataBundle(train=splits["train"], val=splits["val"], test=splits["test"], num_classes=2,
                      num_groups=waterbirds.NUM_GROUPS)


def _image_folder(roots: list[Path], kwargs: dict) -> DataBundle:
    splits, num_classes = image_folder.read_image_folder(roots, kwargs)
    return DataBundle(train=splits["train"], test=splits["test"], val=splits.get("val"), num_classes=num_classes)


def _synthetic(roots: list[Path], kwargs: dict) -> DataBundle:
    arrays, num_classes = sources.make_synthetic(**kwargs)
    return _bundle_from_arrays(arrays, ((0.5,) * arrays["train_x"].shape[1],) * 2, num_classes,
                               2 * num_classes if kwargs.get("groups") else 0)


def dataset_has_groups(dataset: str, kwargs: dict | None = None) -> bool:
    """Whether a dataset (with these data_kwargs) carries group labels, known without loading it."""
    return dataset_entry(dataset).groups(kwargs)


def load_data(dataset: str, data_root: str | None = None, kwargs: dict | None = None) -> DataBundle:
    """Load a dataset on the CPU; the trainer moves it to its device."""
    kwargs = dict(kwargs or {})
    loader = dataset_entry(dataset).loader  # an unknown name fails here, listing the registered ones
    try:
        return loader(search_roots(data_root), kwargs)
    except BenchError:
        raise
    except (OSError, EOFError, ValueError, TypeError, KeyError, pickle.UnpicklingError) as exc:
        # A damaged file or bad data_kwargs: one line naming the dataset, not a traceback.
        raise BenchError(f"dataset '{dataset}' could not be read ({type(exc).__name__}: {exc}); "
                         "check the files under --data-root / $BENCH_DATA and the protocol's data_kwargs") from None


def restrict_train(bundle: DataBundle, n: int, seed: int = 0) -> DataBundle:
    """Keep a fixed random n examples of the training split (the same n for every method and seed)."""
    if n <= 0 or n >= len(bundle.train):
        return bundle
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(bundle.train), generator=generator)[:n].sort().values
    return dataclasses.replace(bundle, train=bundle.train.subset(keep), train_origin=keep)


def carve_holdout(bundle: DataBundle, size: int, generator: torch.Generator) -> DataBundle:
    """Move `size` random training examples (drawn from `generator`) into a held-out split.

    The two are disjoint; training indices are re-numbered 0..N-size-1 (the index every batch
    carries), and train_origin / holdout_origin map both back to the full training split.
    """
    n = len(bundle.train)
    if size <= 0:
        return bundle
    if size >= n:
        raise BenchError(f"holdout of {size} examples leaves nothing to train on ({n} training examples)")
    permutation = torch.randperm(n, generator=generator)
    held, kept = permutation[:size].sort().values, permutation[size:].sort().values
    origin = bundle.train_origin if bundle.train_origin is not None else torch.arange(n)
    return dataclasses.replace(bundle, train=bundle.train.subset(kept), train_origin=origin[kept],
                               holdout=bundle.train.subset(held), holdout_origin=origin[held])


def count_train_groups(bundle: DataBundle) -> DataBundle:
    """The bundle with `train_group_counts` set from its training split (as trained on: after
    train_subset and the held-out split). Call before the labels are hidden."""
    if not bundle.num_groups or bundle.train.groups is None:
        return bundle
    counts = torch.bincount(bundle.train.groups, minlength=bundle.num_groups)
    return dataclasses.replace(bundle, train_group_counts=counts)


def hide_train_groups(bundle: DataBundle, method: str) -> DataBundle:
    """The bundle with the group labels of the training split (and of the held-out split carved from
    it) hidden from `method`: reading them raises, batches carry none. Evaluation splits keep theirs."""
    holdout = bundle.holdout.hide_groups(method) if bundle.holdout is not None else None
    return dataclasses.replace(bundle, train=bundle.train.hide_groups(method), holdout=holdout)


register_dataset("synthetic", _synthetic, has_groups=lambda kwargs: bool(kwargs.get("groups", False)),
                 description="generated class prototypes plus noise (tests; groups = true adds a spurious place)")
register_dataset("fashion-mnist", _fashion_mnist, description="Fashion-MNIST, 28x28 grey, 10 classes")
register_dataset("spurious-fashion", _spurious_fashion, has_groups=True,
                 description="Fashion-MNIST with a coloured background correlated with the label (groups)")
register_dataset("waterbirds", _waterbirds, has_groups=True, description="Waterbirds (groups), streamed from disk")
register_dataset("cifar10", _cifar10, description="CIFAR-10, 32x32 colour, 10 classes")
register_dataset("cifar100", _cifar100, description="CIFAR-100, 32x32 colour, 100 classes")
register_dataset("imagenet", _imagenet, description="ImageNet-1k in ImageFolder layout, streamed from disk")
register_dataset(image_folder.NAME, _image_folder,
                 description="your own images: data_kwargs root = FOLDER holding train/<class>/*, val/, test/")
