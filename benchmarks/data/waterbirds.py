"""Waterbirds (Sagawa et al., ICLR 2020), read from its real on-disk format and streamed from disk.

Two layouts hold the same content and are both accepted:
- group_DRO: a folder `waterbird_complete95_forest2water2/` (the tarball from
  https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz);
- WILDS: `waterbirds_v1.0/` (wilds.get_dataset("waterbirds", download=True)).
Each holds `metadata.csv` with columns img_id, img_filename, y, split, place, place_filename and
the images under the folder at `img_filename` (e.g. 001.Black_footed_Albatross/....jpg).
split 0 = train, 1 = val, 2 = test; y 1 = waterbird; place 0 = land, 1 = water;
group = 2 * y + place (0 landbird on land, 1 landbird on water, 2 waterbird on land,
3 waterbird on water). Train group counts are 3498/184/56/1057.

Transforms, as group_DRO's and JTT's code (get_transform_cub) and WILDS's default:
- evaluation, and training without augmentation (the JTT default): resize to
  int(image_size * resize_scale) square (256 for 224), centre crop image_size, ImageNet mean/std;
- training with augmentation (a protocol whose `augment` is non-empty): RandomResizedCrop(image_size,
  scale (0.7, 1), ratio (3/4, 4/3)) and a horizontal flip, then the same normalisation.
Images are decoded and transformed by DataLoader workers (`num_workers` in data_kwargs).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from benchmarks.data.sources import IMAGENET_STATS
from benchmarks.errors import BenchError

FOLDERS = ("waterbird_complete95_forest2water2", "waterbirds_v1.0", "waterbirds")
COLUMNS = ("img_filename", "y", "split", "place")
SPLITS = {"train": 0, "val": 1, "test": 2}
NUM_GROUPS = 4
WHERE_TO_GET = ("Download https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz "
                "(the group_DRO layout) or WILDS's waterbirds_v1.0 (pip install wilds; "
                "python -c \"import wilds; wilds.get_dataset('waterbirds', root_dir='DIR', download=True)\") "
                "and unpack it under --data-root or $BENCH_DATA.")


def candidate_folders(roots: list[Path]) -> list[Path]:
    return [root / name for root in roots for name in FOLDERS] + list(roots)


def find_folder(roots: list[Path]) -> Path | None:
    for folder in candidate_folders(roots):
        if (folder / "metadata.csv").is_file():
            return folder
    return None


def read_metadata(folder: Path) -> dict:
    """metadata.csv -> {"files": [str], "y", "split", "place": int64 tensors}; one error per bad row."""
    path = folder / "metadata.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchError(f"{path}: missing column '{missing[0]}' (Waterbirds metadata has "
                             f"img_id, img_filename, y, split, place, place_filename)")
        files, values = [], {"y": [], "split": [], "place": []}
        for line, row in enumerate(reader, start=2):
            try:
                parsed = {key: int(float(row[key])) for key in values}
            except (TypeError, ValueError):
                raise BenchError(f"{path}, line {line}: y, split and place must be integers, got "
                                 f"{[row.get(k) for k in values]}") from None
            if parsed["y"] not in (0, 1) or parsed["place"] not in (0, 1) or parsed["split"] not in (0, 1, 2):
                raise BenchError(f"{path}, line {line}: y and place must be 0 or 1 and split 0, 1 or 2, got {parsed}")
            files.append(row["img_filename"])
            for key in values:
                values[key].append(parsed[key])
    return {"files": files, **{key: torch.tensor(v, dtype=torch.long) for key, v in values.items()}}


class WaterbirdsImages(torch.utils.data.Dataset):
    """dataset[i] -> (PIL RGB image, label); decoding happens in the DataLoader's workers."""

    def __init__(self, folder: Path, files: list[str], labels: torch.Tensor):
        self.folder, self.files, self.labels = Path(folder), files, labels.tolist()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.folder / self.files[i]) as image:
            return image.convert("RGB"), self.labels[i]


def transforms(kwargs: dict):
    """(train transform with augmentation, evaluation transform), as the papers' code."""
    from torchvision import transforms as T

    size = int(kwargs.get("image_size", 224))
    resized = int(size * float(kwargs.get("resize_scale", 256 / 224)))
    normalize = T.Normalize(*IMAGENET_STATS)
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.75, 4 / 3)), T.RandomHorizontalFlip(),
                       T.ToTensor(), normalize])
    evaluation = T.Compose([T.Resize((resized, resized)), T.CenterCrop(size), T.ToTensor(), normalize])
    return train, evaluation, size


def read_waterbirds(folder: Path, kwargs: dict) -> dict:
    """{"train", "val", "test": StreamingSplit with groups}, from a folder holding metadata.csv."""
    from benchmarks.data.splits import StreamingSplit

    unknown = sorted(set(kwargs) - {"image_size", "resize_scale", "num_workers"})
    if unknown:
        raise BenchError(f"waterbirds: unknown data_kwargs key '{unknown[0]}' "
                         "(known: image_size, resize_scale, num_workers)")
    meta = read_metadata(folder)
    train_tf, eval_tf, size = transforms(kwargs)
    workers = int(kwargs.get("num_workers", min(8, os.cpu_count() or 1)))
    splits = {}
    for name, code in SPLITS.items():
        rows = (meta["split"] == code).nonzero().flatten()
        if len(rows) == 0:
            raise BenchError(f"{folder / 'metadata.csv'}: no rows with split = {code} ({name})")
        labels = meta["y"][rows]
        dataset = WaterbirdsImages(folder, [meta["files"][i] for i in rows.tolist()], labels)
        splits[name] = StreamingSplit(dataset, labels, train_tf, eval_tf, (3, size, size), workers,
                                      groups=2 * labels + meta["place"][rows])
    missing = [f for f in (meta["files"][0],) if not (folder / f).is_file()]
    if missing:
        raise BenchError(f"waterbirds: {folder / missing[0]} named in metadata.csv does not exist; "
                         "the images must lie under the folder that holds metadata.csv. " + WHERE_TO_GET)
    return splits
