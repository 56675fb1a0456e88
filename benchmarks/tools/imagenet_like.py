"""ImageNet-like JPEGs: the loader's measurement (benchmarks/tools/perf.py) and the decode tests read them.

What a loader's cost depends on is the file's size in pixels and in bytes (the entropy decoding),
not what it shows. ImageNet's typical image is 500x375 (or 375x500), stored at about 110 KB; random
pixels would compress far worse and a flat image far better. Natural images have an amplitude
spectrum falling as about 1/f: fields drawn with that spectrum (colour channels correlated), plus a
gradient and a little grain, come out at about 120 KB at JPEG quality 90.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = ((375, 500), (500, 375))  # (height, width): ImageNet's commonest landscape and portrait sizes
QUALITY = 90
SPECTRUM = 0.9  # amplitude ~ 1/f**SPECTRUM: with QUALITY, about 120 KB per 500x375 image


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: correlated 1/f colour fields, a gradient and grain."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.sqrt(fy ** 2 + fx ** 2)
    frequency[0, 0] = 1.0
    amplitude = frequency ** -SPECTRUM
    amplitude[0, 0] = 0.0  # no mean from the field: the gradient and the offset set the brightness
    shape = (height, width // 2 + 1)
    shared = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    channels = []
    for _ in range(3):
        own = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        field = np.fft.irfft2((0.8 * shared + 0.45 * own) * amplitude, s=(height, width))
        channels.append(field / field.std())
    image = np.stack(channels, -1) * 40 + 110
    rows, cols = np.mgrid[0:height, 0:width]
    image += rng.uniform(-60, 60, 3) * (rows / height)[..., None] + rng.uniform(-60, 60, 3) * (cols / width)[..., None]
    image += rng.standard_normal((height, width, 3)) * 3
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, counts: dict[str, int], classes: int = 4, seed: int = 0,
                       shapes: tuple = SHAPES) -> dict[str, list[Path]]:
    """root/<split>/class<k>/<i>.JPEG: counts[split] images per split, dealt round the classes and the
    shapes; returns each split's files in the order an ImageFolder lists them (class, then name)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for split, n in counts.items():
        files = []
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            height, width = shapes[(i // classes) % len(shapes)]
            path = folder / f"{i:05d}.JPEG"
            Image.fromarray(natural_image(rng, height, width)).save(path, "JPEG", quality=QUALITY)
            files.append(path)
        written[split] = sorted(files, key=lambda path: (path.parent.name, path.name))
    return written
