"""JPEG decoding and ImageNet's transforms on the training device: `data_kwargs decode = "gpu"`.

Why: a ResNet-50 on one modern GPU trains at about 2,500-3,000 images/s, and the default path
(`decode = "cpu"`: PIL decodes, crops and resizes in DataLoader workers) needs several CPU cores per
GPU to keep up (README, "Data": the measured figure, from `nox -s perf`'s
imagenet_loader_images_per_core). With `decode = "gpu"` the workers only read each file's bytes;
the main process decodes the batch on the training device (`torchvision.io.decode_jpeg` with a list
of files: nvjpeg on CUDA, libjpeg-turbo on the CPU) and runs the same transforms there with
torchvision.transforms.v2's functional ops on uint8 tensors (one image at a time up to the crop,
since sizes differ, then one stacked batch for the float conversion and normalisation). Pick it where
the machine has few cores per GPU; on a CPU run the same code decodes on the CPU (that is how it is
tested), in the main process.

What differs from the PIL path (the default, whose results it does not change):
- the decoder: PIL's libjpeg-turbo against torchvision's (same library on the CPU) or nvjpeg
  (CUDA), whose IDCT and chroma upsampling can differ by a few grey levels;
- the resize: tensor bilinear resizing with antialiasing against PIL's; torchvision matches PIL to
  about one grey level on CPU uint8 images, while on CUDA it resizes in float and rounds;
- the random draws: each image's crop and flip come from its own generator, seeded from one number
  drawn per pass from the loader's generator (the draw the DataLoader makes for its workers' seeds,
  so the generator advances as on the PIL path) plus the image's position in the pass. They are
  the draws of torchvision's RandomResizedCrop and RandomHorizontalFlip, in their order, so an
  image given the same seed gets the same crop box and flip on both paths; and a data-parallel
  rank's share of a batch gets the draws one process would make.
Files that are not JPEGs (PNG, BMP, ...; told by their first bytes, not their names) are decoded by
PIL on the CPU, as on the default path (the same pixels), then moved to the device; a JPEG the
device decoder refuses (CMYK on nvjpeg, say) is decoded on the CPU. Needs torchvision >= 0.19 (the
list form of decode_jpeg); torchvision 0.29 deprecates its decoders in favour of TorchCodec, whose
warning is silenced here.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import torch

from benchmarks.errors import BenchError

DECODES = ("cpu", "gpu")
JPEG_MAGIC = (0xFF, 0xD8, 0xFF)
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range, as the PIL path uses


def decode_setting(kwargs: dict, dataset: str) -> str:
    """data_kwargs 'decode' checked: "cpu" (the default) or "gpu"; one line otherwise."""
    value = kwargs.get("decode", "cpu")
    if value not in DECODES:
        raise BenchError(f"dataset '{dataset}': data_kwargs 'decode' must be one of {', '.join(DECODES)}, "
                         f"got {value!r}")
    if value == "gpu":
        import torchvision

        version = tuple(int(part) for part in torchvision.__version__.split("+")[0].split(".")[:2])
        if version < (0, 19):
            raise BenchError(f"dataset '{dataset}': decode = \"gpu\" needs torchvision >= 0.19 (batched "
                             f"decode_jpeg), found {torchvision.__version__}")
    return value


def read_encoded(path: str | Path) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor: all a worker does under decode = "gpu"."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def collate_encoded(items: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(files' bytes, label, index) items -> (the bytes as a list: their lengths differ, labels, indices)."""
    return ([item[0] for item in items], torch.tensor([item[1] for item in items], dtype=torch.int64),
            torch.tensor([item[2] for item in items], dtype=torch.int64))


def crop_box(height: int, width: int, scale: tuple, ratio: tuple, generator: torch.Generator) -> tuple:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params, drawn from `generator`.

    The same draws in the same order as torchvision's (which reads the global generator), so a
    generator seeded s gives the box that get_params gives after torch.manual_seed(s).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _is_jpeg(encoded: torch.Tensor) -> bool:
    return len(encoded) >= 3 and tuple(encoded[:3].tolist()) == JPEG_MAGIC


def _decode_on_cpu(encoded: torch.Tensor) -> torch.Tensor:
    """Any PIL-readable file -> uint8 [3, H, W] RGB, as the PIL path reads it."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Files' bytes -> uint8 [3, H, W] RGB images on `device`: the JPEGs in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if _is_jpeg(data)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        try:
            decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        except RuntimeError:  # one file the device decoder refuses fails the batch: take them one by one
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(_decode_on_cpu(encoded[i]).to(device))
    for i, image in zip(jpegs, decoded):
        images[i] = image
    for i, image in enumerate(images):
        if image is None:
            images[i] = _decode_on_cpu(encoded[i]).to(device)
    return images


class DeviceTransform:
    """ImageNet's training or evaluation transform on a batch of encoded files, on the device.

    `opts` holds image_size, resize, train_crop ("random-resized" | "center"), crop_scale, flip, mean
    and std, as benchmarks/data/image_folder.py options() gives them. Called with the files' bytes,
    the device and (training) one seed per image; returns float [B, 3, size, size], normalised.
    """

    def __init__(self, opts: dict, train: bool):
        self.size, self.resize = opts["image_size"], opts["resize"]
        self.random_crop = train and opts["train_crop"] == "random-resized"
        self.scale = tuple(opts["crop_scale"])
        self.flip = train and opts["flip"]
        self.train = train
        self.mean, self.std = torch.tensor(opts["mean"]), torch.tensor(opts["std"])

    def one(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One decoded uint8 image -> uint8 [3, size, size] (what the PIL path has before ToTensor)."""
        from torchvision.transforms.v2 import functional as F

        size = [self.size, self.size]
        if self.random_crop:
            top, left, h, w = crop_box(image.shape[-2], image.shape[-1], self.scale, RATIO, generator)
            image = F.resized_crop(image, top, left, h, w, size, antialias=True)
        else:
            image = F.center_crop(F.resize(image, [self.resize], antialias=True), size)
        if self.flip and torch.rand(1, generator=generator) < 0.5:  # RandomHorizontalFlip's draw
            image = image.flip(-1)
        return image

    def __call__(self, encoded: list[torch.Tensor], device: torch.device,
                 seeds: list[int] | None = None) -> torch.Tensor:
        if self.train and seeds is None:
            raise ValueError("a training transform needs one seed per image")
        images = decode(encoded, device)
        generators = [torch.Generator().manual_seed(s) for s in seeds] if self.train else [None] * len(images)
        batch = torch.stack([self.one(image, g) for image, g in zip(images, generators)])
        mean, std = self.mean.to(device).view(1, -1, 1, 1), self.std.to(device).view(1, -1, 1, 1)
        return batch.float().div_(255).sub_(mean).div_(std)  # ToTensor, then Normalize, as the PIL path
