"""data_kwargs decode = "gpu": the batch decoded and transformed on the device equals the PIL path's.

On this machine "gpu" decodes on the CPU through the same code; where CUDA is available each test
runs on it too. The JPEGs are ImageNet's sizes (500x375 and 375x500, quality 90, about 120 KB).
"""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T

from benchmarks.data import load_data
from benchmarks.data.device_decode import DeviceTransform, crop_box, read_encoded
from benchmarks.data.image_folder import options, transforms
from benchmarks.errors import BenchError
from benchmarks.tools.imagenet_like import write_image_folder

STD_MIN = 0.224  # ImageNet's smallest channel std: one grey level is at most 1 / (255 * STD_MIN) normalised
GREY = 1 / (255 * STD_MIN)
# Measured on the CPU (torchvision's libjpeg-turbo decodes as PIL's; tensor and PIL antialiased
# bilinear resizes differ by at most one grey level): max 1 grey level; mean 0.002 grey levels for the
# evaluation transform, 0.06 for training crops (small crops enlarged: more rounding disagreements).
# nvjpeg's IDCT and chroma upsampling may differ more (not measured here: no GPU on this machine).
BOUNDS = {"cpu": (2 * GREY, 0.2 * GREY), "cuda": (16 * GREY, 1 * GREY)}  # (max, mean) |difference|
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="no CUDA device"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    # 8 training images (both shapes), 4 in val/ (the test split, ImageNet's convention), 4 classes
    return root, write_image_folder(root, {"train": 8, "val": 4})


def load(root, decode: str, device: str, **extra):
    bundle = load_data("image-folder", None, {"root": str(root), "num_workers": 0, "decode": decode, **extra})
    return bundle.train.to(torch.device(device)), bundle.test.to(torch.device(device))


def unnormalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.485, 0.456, 0.406), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=x.device).view(1, 3, 1, 1)
    return (x * std + mean) * 255


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_batches_equal_the_pil_path(folder, device):
    root, written = folder
    order = torch.tensor([3, 0, 7, 5, 1, 6, 2, 4])  # both shapes, out of file order
    batches = {}
    for decode in ("cpu", "gpu"):
        train, _ = load(root, decode, device)
        batches[decode] = list(train.batches(order, 3))
    for pil, tensor in zip(batches["cpu"], batches["gpu"], strict=True):
        assert tensor.x.shape == pil.x.shape and tensor.x.dtype == torch.float32 and tensor.x.device == pil.x.device
        assert torch.equal(tensor.y, pil.y) and torch.equal(tensor.index, pil.index)
        difference = (tensor.x - pil.x).abs()
        largest, average = BOUNDS[device]
        assert difference.max().item() <= largest, difference.max().item() / GREY
        assert difference.mean().item() <= average, difference.mean().item() / GREY
    assert torch.cat([b.index for b in batches["gpu"]]).cpu().tolist() == order.tolist()
    labels = [int(path.parent.name.removeprefix("class")) for path in written["train"]]
    assert torch.cat([b.y for b in batches["gpu"]]).cpu().tolist() == [labels[i] for i in order.tolist()]


@pytest.mark.parametrize("device", DEVICES)
def test_training_transform_draws_torchvisions_crop_and_flip(folder, device):
    """Given one image's seed, the device transform draws torchvision's box and flip: its output is
    the PIL training transform's (run after torch.manual_seed(seed)) up to the decode bound."""
    from PIL import Image

    root, written = folder
    opts = options({"root": str(root)})
    pil_train, _ = transforms(opts)
    files = written["train"]
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    x = DeviceTransform(opts, train=True)([read_encoded(f) for f in files], torch.device(device), seeds)
    with torch.random.fork_rng(devices=[]):
        expected = []
        for path, seed in zip(files, seeds):
            torch.manual_seed(seed)
            with Image.open(path) as image:
                expected.append(pil_train(image.convert("RGB")))
    difference = (x.cpu() - torch.stack(expected)).abs()
    largest, average = BOUNDS[device]
    assert difference.max().item() <= largest and difference.mean().item() <= average


def test_crop_box_is_torchvisions_get_params():
    image = torch.zeros(3, 375, 500)
    for seed in range(200):  # scale (0.08, 1): some draws miss and redraw; tiny scales hit the fallback
        for scale in ((0.08, 1.0), (0.7, 1.0), (1.0, 1.0)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                expected = T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
            assert crop_box(375, 500, scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(seed)) == tuple(expected)
    # a very wide image takes the fallback (no box of an allowed ratio fits): the central crop
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wide = T.RandomResizedCrop.get_params(torch.zeros(3, 20, 500), [0.9, 1.0], [3 / 4, 4 / 3])
    assert crop_box(20, 500, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)) == tuple(wide) \
        == (0, 236, 20, 27)  # h 20, w round(20 * 4/3), left (500 - 27) // 2


@pytest.mark.parametrize("device", DEVICES)
def test_training_batches_are_normalised_and_reproducible(folder, device):
    root, _ = folder
    train, _ = load(root, "gpu", device)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))

    def epoch(seed: int, shard=None) -> tuple[list, torch.Generator]:
        generator = torch.Generator().manual_seed(seed)
        return list(train.batches(order, 4, augment=["crop", "flip"], generator=generator, shard=shard)), generator

    first, generator = epoch(0)
    again, _ = epoch(0)
    other, _ = epoch(1)
    for batch in first:
        assert batch.x.shape == (4, 3, 224, 224) and batch.x.dtype == torch.float32
        assert batch.x.device.type == device
        pixels = unnormalised(batch.x)  # ToTensor + Normalize of uint8 pixels: integers in 0..255
        assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
        assert (pixels - pixels.round()).abs().max() < 1e-3
    assert all(torch.equal(a.x, b.x) for a, b in zip(first, again))
    assert not all(torch.equal(a.x, b.x) for a, b in zip(first, other))
    assert torch.cat([b.index for b in first]).cpu().tolist() == order.tolist()
    # The loader's generator advances as the PIL path's DataLoader advances it (one draw per pass).
    cpu_train, _ = load(root, "cpu", device)
    pil_generator = torch.Generator().manual_seed(0)
    list(cpu_train.batches(order, 4, augment=["crop", "flip"], generator=pil_generator))
    assert torch.equal(generator.get_state(), pil_generator.get_state())
    # Two ranks' shares of each batch carry one process's draws.
    shares = [epoch(0, shard=(rank, 2))[0] for rank in range(2)]
    for whole, part0, part1 in zip(first, *shares):
        assert torch.equal(torch.cat([part0.index, part1.index]), whole.index)
        assert torch.equal(torch.cat([part0.x, part1.x]), whole.x)


def test_a_png_is_decoded_as_the_pil_path_decodes_it(tmp_path):
    """A file that is not a JPEG (here a PNG named .JPEG, as ImageNet holds one) goes through PIL."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "pics"
    written = write_image_folder(root, {"train": 2, "val": 1}, classes=1)
    pixels = np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(written["train"][0], format="PNG")
    batches = {decode: list(load(root, decode, "cpu")[0].batches(torch.arange(2), 2))[0].x
               for decode in ("cpu", "gpu")}
    assert (batches["gpu"] - batches["cpu"]).abs().max().item() <= BOUNDS["cpu"][0]


@pytest.mark.parametrize("dataset, kwargs", [("image-folder", {"root": "pics"}), ("imagenet", {})])
def test_a_bad_decode_is_one_line(tmp_path, dataset, kwargs):
    write_image_folder(tmp_path / ("pics" if dataset == "image-folder" else "imagenet"),
                       {"train": 1, "val": 1}, classes=1)
    with pytest.raises(BenchError) as error:
        load_data(dataset, str(tmp_path), {**kwargs, "num_workers": 0, "decode": "nvjpeg"})
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"dataset '{dataset}': ")
    assert "data_kwargs 'decode' must be one of cpu, gpu, got 'nvjpeg'" in message


def test_imagenet_dataset_decodes_on_the_device_too(tmp_path):
    write_image_folder(tmp_path / "imagenet", {"train": 4, "val": 2}, classes=2)
    x = {}
    for decode in ("cpu", "gpu"):
        bundle = load_data("imagenet", str(tmp_path), {"num_workers": 0, "decode": decode})
        assert bundle.num_classes == 2 and bundle.train.device_transforms == (decode == "gpu")
        (batch,) = list(bundle.test.batches(torch.arange(2), 2))
        x[decode] = batch.x
    assert (x["gpu"] - x["cpu"]).abs().max().item() <= BOUNDS["cpu"][0]
