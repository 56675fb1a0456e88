"""Named, batched, on-device augmentations, seeded from the run's generators (as airbench does).

A pipeline is a list of specs, each a name or a table with a name and parameters, e.g.
    ["crop", "flip"]
    [{name = "random-resized-crop", scale = [0.2, 1.0]}, "flip",
     {name = "color-jitter", p = 0.8}, {name = "grayscale", p = 0.2}, "gaussian-blur", "solarize"]
Images are [B, C, H, W] at pixel scale (0..255): uint8 in, and an op that needs fractions turns
them into float at the same scale, so a crop/flip pipeline stays uint8 and exact. The split's
`normalize` then maps either to the model's input.

Randomness: every draw comes from a CPU torch.Generator (the trainer's per-epoch augmentation
generator, whose state a checkpoint holds), then moves to the device, so a run draws the same
augmentations on any device and after any resume. Each op draws the same number of values per
example whether or not its probability fires, so one op's parameters never shift another's draws.

The registry covers the BYOL recipe (Grill et al. 2020): random-resized-crop, flip, color-jitter,
grayscale, gaussian-blur, solarize, plus the supervised pad-crop. Departures from torchvision, for
batching: random-resized-crop clamps an oversized box instead of retrying 10 times; color-jitter
applies brightness, contrast, saturation, hue in that fixed order (torchvision shuffles it) and
rotates hue in YIQ space; gaussian-blur uses reflect padding and a kernel of about a tenth of the
image side.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.errors import BenchError

Op = Callable[..., torch.Tensor]
_REGISTRY: dict[str, tuple[Op, dict]] = {}


def register_augmentation(name: str, **defaults):
    def decorate(fn: Op) -> Op:
        _REGISTRY[name] = (fn, defaults)
        return fn

    return decorate


def augmentation_names() -> list[str]:
    return sorted(_REGISTRY)


def _draw(generator: torch.Generator, n: int, device, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)).float().to(device)


def _fires(generator: torch.Generator, n: int, p: float, device) -> torch.Tensor:
    return _draw(generator, n, device) < p


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() if images.dtype == torch.uint8 else images


@register_augmentation("crop", padding=4)
def pad_crop(images: torch.Tensor, generator: torch.Generator, padding: int) -> torch.Tensor:
    """Per-example random crop of the image padded by `padding` zero pixels on each side."""
    padding = int(padding)  # a whole number, checked; TOML may spell it 4.0
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    batch_ix = torch.arange(b, device=device)[:, None, None, None]
    chan_ix = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_ix, chan_ix, rows, cols]


@register_augmentation("flip", p=0.5)
def flip(images: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Horizontal flip with probability p."""
    fire = (torch.rand(len(images), generator=generator) < p).to(images.device)
    return torch.where(fire[:, None, None, None], images.flip(-1), images)


@register_augmentation("random-resized-crop", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
def random_resized_crop(images: torch.Tensor, generator: torch.Generator, scale, ratio) -> torch.Tensor:
    """A box of area share ~U(scale) and aspect ratio log-uniform in `ratio`, resized back (bilinear)."""
    b, _, h, w = images.shape
    device = images.device
    area = _draw(generator, b, device, *scale)
    log_ratio = _draw(generator, b, device, math.log(ratio[0]), math.log(ratio[1]))
    box_w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # as shares of the width and height
    box_h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    left = _draw(generator, b, device) * (1 - box_w)
    top = _draw(generator, b, device) * (1 - box_h)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = box_w, 2 * left + box_w - 1
    theta[:, 1, 1], theta[:, 1, 2] = box_h, 2 * top + box_h - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(_as_float(images), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] (ITU-R 601, as torchvision); a 1-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images by `turns` of a full circle, in YIQ space."""
    to_yiq = _RGB_TO_YIQ.to(x.device)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    i, q = yiq[:, 1], yiq[:, 2]
    rotated = torch.stack([yiq[:, 0], cos[:, None, None] * i - sin[:, None, None] * q,
                           sin[:, None, None] * i + cos[:, None, None] * q], 1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), rotated)


@register_augmentation("color-jitter", p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
def color_jitter(images: torch.Tensor, generator: torch.Generator, p, brightness, contrast, saturation,
                 hue) -> torch.Tensor:
    """With probability p: brightness, contrast, saturation (factors ~U(1-s, 1+s)), hue (~U(-h, h) turns)."""
    b = len(images)
    device = images.device
    fire = _fires(generator, b, p, device)[:, None, None, None]
    factors = [_draw(generator, b, device, 1 - s, 1 + s)[:, None, None, None]
               for s in (brightness, contrast, saturation)]
    turns = _draw(generator, b, device, -hue, hue)
    x = _as_float(images)
    out = (x * factors[0]).clamp(0, 255)
    mean = _gray(out).mean((1, 2, 3), keepdim=True)
    out = ((out - mean) * factors[1] + mean).clamp(0, 255)
    if out.shape[1] == 3:  # saturation and hue need colour
        gray = _gray(out)
        out = ((out - gray) * factors[2] + gray).clamp(0, 255)
        if hue > 0:
            out = _rotate_hue(out, turns).clamp(0, 255)
    return torch.where(fire, out, x)


@register_augmentation("grayscale", p=0.2)
def grayscale(images: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    fire = _fires(generator, len(images), p, images.device)[:, None, None, None]
    if images.shape[1] == 1:
        return images
    x = _as_float(images)
    return torch.where(fire, _gray(x).expand_as(x), x)


@register_augmentation("gaussian-blur", p=0.5, sigma=(0.1, 2.0))
def gaussian_blur(images: torch.Tensor, generator: torch.Generator, p: float, sigma) -> torch.Tensor:
    """With probability p, a separable Gaussian blur of sigma ~U(sigma), kernel ~10% of the side, odd."""
    b, c, h, w = images.shape
    device = images.device
    fire = _fires(generator, b, p, device)
    sigmas = _draw(generator, b, device, *sigma)
    radius = max(1, int(0.1 * min(h, w)) // 2)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    identity = (offsets == 0).float().expand_as(kernels)
    kernels = torch.where(fire[:, None], kernels, identity)  # [B, K]
    weight = kernels.repeat_interleave(c, 0)  # one kernel per (example, channel) plane
    x = _as_float(images).reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), weight[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), weight[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


@register_augmentation("solarize", p=0.2, threshold=128)
def solarize(images: torch.Tensor, generator: torch.Generator, p: float, threshold) -> torch.Tensor:
    fire = _fires(generator, len(images), p, images.device)[:, None, None, None]
    x = _as_float(images)
    return torch.where(fire & (x >= threshold), 255 - x, x)


def parse_pipeline(specs: list, where: str = "augmentation", defaults: dict | None = None) -> list[tuple[Op, dict]]:
    """Specs -> [(op, params)], every name and parameter checked (a BenchError names the bad one).

    `defaults` overrides a registry default by name (the protocol's crop_padding for "crop").
    """
    pipeline = []
    for spec in specs:
        if isinstance(spec, str):
            name, given = spec, {}
        elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
            name, given = spec["name"], {k: v for k, v in spec.items() if k != "name"}
        else:
            raise BenchError(f"{where}: each entry must be a name or a table with a 'name', got {spec!r}")
        if name not in _REGISTRY:
            raise BenchError(f"{where}: unknown augmentation '{name}' (known: {', '.join(augmentation_names())})")
        op, registered = _REGISTRY[name]
        unknown = sorted(set(given) - set(registered))
        if unknown:
            raise BenchError(f"{where}: augmentation '{name}' has no parameter '{unknown[0]}' "
                             f"(its parameters: {', '.join(registered) or 'none'})")
        params = {**registered, **(defaults or {}).get(name, {}), **given}  # the given value wins
        for key, value in params.items():
            _check_param(where, name, key, value, pair=isinstance(registered[key], tuple))
        pipeline.append((op, params))
    return pipeline


# Pair parameters whose low end must be above 0: a zero area, aspect ratio (log taken) or blur sigma
# (divided by) has no image.
_POSITIVE_PAIRS = ("scale", "ratio", "sigma")


def _check_param(where: str, name: str, key: str, value, pair: bool) -> None:
    def bad(why: str) -> BenchError:
        return BenchError(f"{where}: augmentation '{name}' parameter '{key}' must be {why}, got {value!r}")

    if pair != isinstance(value, (list, tuple)):
        raise bad("a pair [low, high]" if pair else "a number")
    numbers = value if pair else [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise bad("made of finite numbers")
    if key == "p" and not 0 <= value <= 1:
        raise bad("in [0, 1]")
    if key == "padding" and not (value == int(value) and value >= 0):
        raise bad("a whole number of pixels >= 0")
    if pair and (len(value) != 2 or value[0] > value[1] or value[0] < 0):
        raise bad("a pair [low, high] with 0 <= low <= high")
    if pair and key in _POSITIVE_PAIRS and value[0] <= 0:
        raise bad("a pair [low, high] with 0 < low <= high")


def apply_pipeline(images: torch.Tensor, pipeline: list[tuple[Op, dict]], generator: torch.Generator) -> torch.Tensor:
    for op, params in pipeline:
        images = op(images, generator, **params)
    return images


class Views:
    """Draws augmented, normalised views of a batch's raw images from the epoch's seeded generator."""

    def __init__(self, normalize: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator,
                 default: list, defaults: dict | None = None):
        self.normalize, self.generator = normalize, generator
        self.default, self.defaults = default, defaults or {}
        self._parsed: dict[str, list] = {}

    def draw(self, raw: torch.Tensor, pipeline: list | None = None) -> torch.Tensor:
        specs = self.default if pipeline is None else pipeline
        key = repr(specs)
        if key not in self._parsed:
            self._parsed[key] = parse_pipeline(specs, "view", self.defaults)
        return self.normalize(apply_pipeline(raw, self._parsed[key], self.generator))
