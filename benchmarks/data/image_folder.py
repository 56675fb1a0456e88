"""The user's own images: `dataset = "image-folder"`, `data_kwargs = { root = "..." }`.

Layout (torchvision's ImageFolder, one folder per class):

    root/train/<class>/<image>     required: the training split; its class folders define the classes
    root/val/<class>/<image>       optional
    root/test/<class>/<image>      optional

Which split is which: with test/, test/ is the test split and val/ (if present) the validation
split; with val/ alone, val/ is the test split (ImageNet's convention: the val/ folder is what is
reported) and there is no validation split; with neither, it is an error. val/ and test/ may lack
classes (their labels follow train/'s class list), but may not hold a class that train/ lacks.

A relative root is looked up under --data-root, $BENCH_DATA and the cache folder (the folders
every dataset searches), then the current directory; `~` is expanded.

The images stream from disk through DataLoader workers (benchmarks/data/splits.py StreamingSplit),
decoded with PIL and converted to RGB; the transforms are ImageNet's, sized by `image_size`.
A non-empty protocol `augment` list switches the training transform on (the loader's own, below);
an empty one trains on the evaluation transform.

`decode = "gpu"` (default "cpu"): the workers only read the files' bytes, and the batch is decoded and
transformed on the training device (benchmarks/data/device_decode.py says why, and what differs).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.data.device_decode import DeviceTransform, decode_setting, read_encoded
from benchmarks.data.sources import IMAGENET_STATS
from benchmarks.errors import BenchError

NAME = "image-folder"
# PIL-readable image files (torchvision's IMG_EXTENSIONS); anything else in a class folder is ignored.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAIN_CROPS = ("random-resized", "center")
KNOWN_KWARGS = ("root", "image_size", "resize", "train_crop", "crop_scale", "flip", "mean", "std", "num_workers",
               "decode")
LAYOUT = "root/train/<class>/<image>, plus root/val/<class>/... and/or root/test/<class>/..."


def _error(text: str) -> BenchError:
    return BenchError(f"dataset '{NAME}': {text}")


def find_root(root: str, roots: list[Path]) -> Path:
    """The folder `root` names: as given when absolute, else the first of roots/root, ./root holding train/."""
    given = Path(root).expanduser()
    candidates = [given] if given.is_absolute() else [base / given for base in roots] + [Path.cwd() / given]
    for folder in candidates:
        if (folder / "train").is_dir():
            return folder
    existing = [folder for folder in candidates if folder.is_dir()]
    if existing:
        raise _error(f"{existing[0]} has no train/ folder (expected {LAYOUT})")
    where = ", ".join(str(folder) for folder in candidates)
    raise _error(f"root '{root}' not found (looked in {where}); give an absolute path, or a path relative to "
                 "--data-root or $BENCH_DATA")


def _images_in(folder: Path) -> list[Path]:
    return sorted(Path(entry.path) for entry in os.scandir(folder)
                  if entry.is_file() and entry.name.lower().endswith(EXTENSIONS))


def class_folders(split: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split) if entry.is_dir() and not entry.name.startswith("."))


def list_split(split: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    """Every image of a split folder and its label (the index of its class in `classes`)."""
    index = {name: i for i, name in enumerate(classes)}
    files, labels = [], []
    for name in class_folders(split):
        if name not in index:
            raise _error(f"{split / name} is a class that {split.parent / 'train'} does not have "
                         f"(classes: {', '.join(classes)})")
        images = _images_in(split / name)
        if not images:
            raise _error(f"class folder {split / name} holds no images (extensions: {', '.join(EXTENSIONS)})")
        files += images
        labels += [index[name]] * len(images)
    if not files:
        raise _error(f"{split} holds no class folders (expected {LAYOUT})")
    return files, torch.tensor(labels, dtype=torch.int64)


def read_rgb(path: str):
    """A file as an RGB PIL image (decode = "cpu": the workers decode)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """`dataset[i]` = (read(the i-th file), its label): an RGB PIL image by default, or the file's bytes
    with read = device_decode.read_encoded (decode = "gpu": the training device decodes)."""

    def __init__(self, files: list[Path], labels: torch.Tensor, read=read_rgb):
        self.files, self.labels, self.read = [str(f) for f in files], labels.tolist(), read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.read(self.files[i]), self.labels[i]


def _number(kwargs: dict, key: str, default, kind: type, low: float):
    value = kwargs.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or value < low:
        raise _error(f"data_kwargs '{key}' must be {'a whole number' if kind is int else 'a number'} >= {low}, "
                     f"got {value!r}")
    return value


def _triple(kwargs: dict, key: str, default: tuple) -> tuple:
    value = kwargs.get(key, default)
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise _error(f"data_kwargs '{key}' must be three numbers (one per RGB channel), got {value!r}")
    if key == "std" and not all(v > 0 for v in value):
        raise _error(f"data_kwargs 'std' must be three numbers > 0, got {value!r}")
    return tuple(float(v) for v in value)


def options(kwargs: dict) -> dict:
    """The data_kwargs checked, with defaults filled in (bad values fail before any file is read)."""
    unknown = sorted(set(kwargs) - set(KNOWN_KWARGS))
    if unknown:
        raise _error(f"unknown data_kwargs key '{unknown[0]}' (known: {', '.join(KNOWN_KWARGS)})")
    root = kwargs.get("root")
    if not isinstance(root, str) or not root.strip():
        raise _error("data_kwargs needs root = \"FOLDER\" (the folder holding train/ and val/ and/or test/)")
    size = _number(kwargs, "image_size", 224, int, 1)
    resize = _number(kwargs, "resize", round(size * 256 / 224), int, size)
    crop = kwargs.get("train_crop", "random-resized")
    if crop not in TRAIN_CROPS:
        raise _error(f"data_kwargs 'train_crop' must be one of {', '.join(TRAIN_CROPS)}, got {crop!r}")
    scale = kwargs.get("crop_scale", [0.08, 1.0])
    if (not isinstance(scale, (list, tuple)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0 < scale[0] <= scale[1] <= 1):
        raise _error(f"data_kwargs 'crop_scale' must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
    flip = kwargs.get("flip", True)
    if not isinstance(flip, bool):
        raise _error(f"data_kwargs 'flip' must be true or false, got {flip!r}")
    return {"root": root, "image_size": size, "resize": resize, "train_crop": crop,
            "crop_scale": (float(scale[0]), float(scale[1])), "flip": flip,
            "mean": _triple(kwargs, "mean", IMAGENET_STATS[0]), "std": _triple(kwargs, "std", IMAGENET_STATS[1]),
            "num_workers": _number(kwargs, "num_workers", min(8, os.cpu_count() or 1), int, 0),
            "decode": decode_setting(kwargs, NAME)}


def transforms(opts: dict):
    """(training transform, evaluation transform): ImageNet's, at `image_size`."""
    from torchvision import transforms as T

    size = opts["image_size"]
    normalize = T.Normalize(opts["mean"], opts["std"])
    evaluation = [T.Resize(opts["resize"]), T.CenterCrop(size)]
    train = [T.RandomResizedCrop(size, scale=opts["crop_scale"])] if opts["train_crop"] == "random-resized" \
        else list(evaluation)
    if opts["flip"]:
        train.append(T.RandomHorizontalFlip())
    return T.Compose([*train, T.ToTensor(), normalize]), T.Compose([*evaluation, T.ToTensor(), normalize])


def read_image_folder(roots: list[Path], kwargs: dict) -> tuple[dict, int]:
    """({"train", "test"[, "val"]}: StreamingSplit, number of classes), by the rule in the docstring."""
    from benchmarks.data.splits import StreamingSplit

    opts = options(kwargs)
    folder = find_root(opts["root"], roots)
    classes = class_folders(folder / "train")
    if not classes:
        raise _error(f"{folder / 'train'} holds no class folders (expected {LAYOUT})")
    listed = {"train": list_split(folder / "train", classes)}
    listed.update((name, list_split(folder / name, classes)) for name in ("val", "test") if (folder / name).is_dir())
    if len(listed) == 1:
        raise _error(f"{folder} has train/ but neither val/ nor test/ (expected {LAYOUT})")
    if "test" not in listed:  # val/ alone is the test split (see the module docstring)
        listed["test"] = listed.pop("val")
    on_device = opts["decode"] == "gpu"
    train_tf, eval_tf = (DeviceTransform(opts, True), DeviceTransform(opts, False)) if on_device else transforms(opts)
    shape = (3, opts["image_size"], opts["image_size"])
    read = read_encoded if on_device else read_rgb
    splits = {role: StreamingSplit(ImageFiles(files, labels, read), labels, train_tf, eval_tf, shape, opts["num_workers"],
                                   device_transforms=on_device)
              for role, (files, labels) in listed.items()}
    return splits, len(classes)
