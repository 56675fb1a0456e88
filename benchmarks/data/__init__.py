"""Dataset loading: where to look, the on-disk formats, and the splits the trainer iterates.

Every dataset looks in the same order: `--data-root`, then `$BENCH_DATA`, then well-known local
copies (Debian's dataset-fashion-mnist), then a download where the dataset allows it. If none works,
one error says where it looked and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BenchError
from . import sources
from .splits import StreamingSplit, TensorSplit

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "data-efficiency-bench"


@dataclass
class DataBundle:
    train: TensorSplit | StreamingSplit
    test: TensorSplit | StreamingSplit
    num_classes: int
    val: TensorSplit | StreamingSplit | None = None
    train_origin: torch.Tensor | None = None  # with train_subset: each example's index in the full split

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
        roots.append(Path(data_root))
    if os.environ.get("BENCH_DATA"):
        roots.append(Path(os.environ["BENCH_DATA"]))
    roots.append(DEFAULT_CACHE)
    return roots


def _missing(name: str, looked: list[Path], how: str) -> BenchError:
    where = "\n  ".join(str(p) for p in looked)
    return BenchError(f"dataset '{name}' not found. Looked in:\n  {where}\n{how}")


def _fashion_mnist(roots: list[Path], kwargs: dict) -> DataBundle:
    candidates = []
    for root in roots:
        candidates += [root / "fashion-mnist", root, root / "FashionMNIST" / "raw"]
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
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


def _imagenet(roots: list[Path], kwargs: dict) -> DataBundle:
    candidates = [root / "imagenet" for root in roots] + list(roots)
    for folder in candidates:
        if (folder / "train").is_dir() and (folder / "val").is_dir():
            train, val = sources.read_imagefolder(folder, kwargs)
            return DataBundle(train=train, test=val, num_classes=len(train.dataset.classes))
    raise _missing("imagenet", candidates,
                   "ImageNet cannot be downloaded automatically: put it in ImageFolder layout "
                   "(imagenet/train/<class>/*.JPEG and imagenet/val/<class>/*.JPEG) under --data-root.")


def _bundle_from_arrays(arrays: dict, stats: tuple, num_classes: int) -> DataBundle:
    mean, std = stats
    return DataBundle(
        train=TensorSplit(arrays["train_x"], arrays["train_y"], mean, std),
        test=TensorSplit(arrays["test_x"], arrays["test_y"], mean, std),
        num_classes=num_classes)


def load_data(dataset: str, data_root: str | None = None, kwargs: dict | None = None) -> DataBundle:
    """Load a dataset on the CPU; the trainer moves it to its device."""
    kwargs = dict(kwargs or {})
    roots = search_roots(data_root)
    if dataset == "synthetic":
        arrays, num_classes = sources.make_synthetic(**kwargs)
        return _bundle_from_arrays(arrays, ((0.5,) * arrays["train_x"].shape[1],) * 2, num_classes)
    if dataset == "fashion-mnist":
        return _fashion_mnist(roots, kwargs)
    if dataset in sources.CIFAR_FOLDERS:
        return _cifar(dataset, roots, kwargs)
    if dataset == "imagenet":
        return _imagenet(roots, kwargs)
    raise BenchError(f"unknown dataset '{dataset}' (known: synthetic, fashion-mnist, cifar10, cifar100, imagenet)")


def restrict_train(bundle: DataBundle, n: int, seed: int = 0) -> DataBundle:
    """Keep a fixed random n examples of the training split (the same n for every method and seed)."""
    if n <= 0 or n >= len(bundle.train):
        return bundle
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(bundle.train), generator=generator)[:n].sort().values
    return DataBundle(train=bundle.train.subset(keep), test=bundle.test, num_classes=bundle.num_classes,
                      val=bundle.val, train_origin=keep)
