"""Readers for the real on-disk formats: IDX (MNIST family), CIFAR python pickles, ImageFolder trees."""

from __future__ import annotations

import _compat_pickle
import codecs
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from benchmarks.errors import BenchError

FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder: Path) -> bool:
    return all(_idx_path(folder, stem) for stem in _IDX_NAMES.values())


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's format: magic with dtype code and rank, big-endian dims, then the data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise BenchError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise BenchError(f"{path}: truncated IDX file ({array.size} bytes for shape {dims})")
    return array.reshape(dims)


def read_fashion_mnist(folder: Path) -> dict:
    arrays = {key: read_idx(_idx_path(folder, stem)) for key, stem in _IDX_NAMES.items()}
    return {
        "train_x": torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1),
        "train_y": torch.from_numpy(arrays["train_y"].astype(np.int64)),
        "test_x": torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1),
        "test_y": torch.from_numpy(arrays["test_y"].astype(np.int64)),
    }


def _numpy_core(module: str):
    """numpy's core module by its numpy-2 name, or its numpy-1 name on an older numpy."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


# Everything a CIFAR python file may name (dicts, lists, bytes and ints need no global): the official files
# (pickled by Python 2 with numpy 1) name numpy's array reconstruction, ndarray and dtype; files written again
# by numpy 2 spell the module numpy._core, and pickle protocol 5 rebuilds arrays with _frombuffer; protocol 2
# under Python 3 encodes bytes with _codecs.encode. Nothing here runs code beyond building arrays.
_CIFAR_GLOBALS = {
    **{(f"{prefix}.multiarray", "_reconstruct"): _numpy_core("multiarray")._reconstruct
       for prefix in ("numpy.core", "numpy._core")},
    **{(f"{prefix}.numeric", "_frombuffer"): _numpy_core("numeric")._frombuffer
       for prefix in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{("builtins", t.__name__): t for t in (dict, list, bytes, str, int, float)},
}


class ForeignGlobal(pickle.UnpicklingError):
    """A pickle that names something outside the allowed set (raised before it is built)."""


class CifarUnpickler(pickle.Unpickler):
    """pickle's reader for CIFAR files that builds nothing but what they hold (_CIFAR_GLOBALS): a replaced file
    naming anything else (os.system, a class with side effects) fails before any of it runs."""

    def find_class(self, module: str, name: str):
        # Python 2's module names (__builtin__), mapped as pickle.Unpickler.find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise ForeignGlobal(f"it names {module}.{name}, which no CIFAR file holds")
        return found


def _read_cifar_pickles(paths: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        if not path.is_file():
            raise BenchError(f"CIFAR file missing: {path}")
        with open(path, "rb") as f:
            try:
                entry = CifarUnpickler(f, encoding="bytes").load()
            except ForeignGlobal as exc:  # (a damaged file is load_data's "could not be read")
                raise BenchError(f"CIFAR file {path} refused, not unpickled: {exc} (replaced or tampered with?); "
                                 "download the dataset again") from None
        if not isinstance(entry, dict):
            raise BenchError(f"CIFAR file {path} holds a {type(entry).__name__}, not a CIFAR batch (a dict); "
                             "download the dataset again")
        images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)


def read_cifar(folder: Path, name: str) -> dict:
    """torchvision's on-disk CIFAR: pickled dicts with b'data' (N x 3072 uint8, CHW) and labels."""
    if name == "cifar10":
        train = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test, key = [folder / "test_batch"], b"labels"
    else:
        train, test, key = [folder / "train"], [folder / "test"], b"fine_labels"
    train_x, train_y = _read_cifar_pickles(train, key)
    test_x, test_y = _read_cifar_pickles(test, key)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def make_synthetic(n_train: int = 1024, n_test: int = 512, num_classes: int = 4, size: int = 8,
                   channels: int = 1, noise: float = 60.0, groups: bool = False, correlation: float = 0.9,
                   n_val: int = 256) -> tuple[dict, int]:
    """A fixed, learnable image dataset: one random prototype per class plus pixel noise.

    Generated from a fixed seed so every run and method sees the same data. With `groups`, each
    example also has a binary "place" that brightens (+40) or darkens (-40) the image: in training
    it agrees with the class parity for exactly round(correlation * n_c) examples of class c, in the
    validation split (n_val examples) and the test split for half of them; group = 2 * label + place
    (2 * num_classes groups). A seconds-long stand-in for spurious-correlation data (tests only).
    """
    generator = torch.Generator().manual_seed(1234)
    prototypes = torch.rand(num_classes, channels, size, size, generator=generator) * 255

    def draw(n: int, agreeing: float | None = None) -> tuple:
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        pixels = prototypes[labels] + noise * torch.randn(n, channels, size, size, generator=generator)
        if agreeing is None:
            return pixels.clamp(0, 255).round().to(torch.uint8), labels
        places = 1 - labels % 2
        for c in range(num_classes):
            members = (labels == c).nonzero().flatten()
            chosen = members[torch.randperm(len(members), generator=generator)[:round(agreeing * len(members))]]
            places[chosen] = c % 2
        pixels = pixels + 40.0 * (2 * places - 1).view(-1, 1, 1, 1)
        return pixels.clamp(0, 255).round().to(torch.uint8), labels, 2 * labels + places

    if not groups:
        train_x, train_y = draw(n_train)
        test_x, test_y = draw(n_test)
        return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}, num_classes
    arrays = {}
    for name, n, agreeing in (("train", n_train, correlation), ("val", n_val, 0.5), ("test", n_test, 0.5)):
        arrays[f"{name}_x"], arrays[f"{name}_y"], arrays[f"{name}_g"] = draw(n, agreeing)
    return arrays, num_classes


def read_imagefolder(folder: Path, kwargs: dict):
    """ImageNet-style tree: folder/train/<class>/<image>, folder/val/<class>/<image>.

    decode = "gpu" in kwargs: the workers read the files' bytes and the same transforms run on the
    training device (benchmarks/data/device_decode.py).
    """
    import torchvision
    from torchvision import transforms as T

    from benchmarks.data.device_decode import DeviceTransform, decode_setting, read_encoded
    from benchmarks.data.splits import StreamingSplit

    on_device = decode_setting(kwargs, "imagenet") == "gpu"
    size = int(kwargs.get("image_size", 224))
    resize = int(kwargs.get("resize", round(size * 256 / 224)))
    workers = int(kwargs.get("num_workers", min(8, os.cpu_count() or 1)))
    if on_device:
        opts = {"image_size": size, "resize": resize, "train_crop": "random-resized", "crop_scale": (0.08, 1.0),
                "flip": True, "mean": IMAGENET_STATS[0], "std": IMAGENET_STATS[1]}
        train_tf, eval_tf = DeviceTransform(opts, True), DeviceTransform(opts, False)
    else:
        normalize = T.Normalize(*IMAGENET_STATS)
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        eval_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalize])
    splits = []
    for name in ("train", "val"):
        dataset = torchvision.datasets.ImageFolder(str(folder / name), loader=read_encoded) if on_device \
            else torchvision.datasets.ImageFolder(str(folder / name))
        labels = torch.tensor(dataset.targets, dtype=torch.int64)
        splits.append(StreamingSplit(dataset, labels, train_tf, eval_tf, (3, size, size), workers,
                                     device_transforms=on_device))
    return splits


def download_torchvision(class_name: str, root: Path) -> None:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    getattr(torchvision.datasets, class_name)(str(root), train=True, download=True)
    getattr(torchvision.datasets, class_name)(str(root), train=False, download=True)
