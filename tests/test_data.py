import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from benchmarks.core.augment import apply_pipeline, parse_pipeline
from benchmarks.data import load_data, restrict_train
from benchmarks.data.sources import read_idx
from benchmarks.errors import BenchError


def write_cifar10(folder, n_per_batch=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:  # torchvision's files are pickled with byte keys
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n_per_batch}, f)
        expected[name] = (data, labels)
    return expected


def test_cifar10_pickle_format(tmp_path):
    expected = write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_data("cifar10", str(tmp_path))
    assert len(data.train) == 30 and len(data.test) == 6 and data.num_classes == 10
    first, labels = expected["data_batch_1"]
    assert torch.equal(data.train.images[0], torch.from_numpy(first[0].reshape(3, 32, 32)))
    assert data.train.labels[:6].tolist() == labels
    test_data, test_labels = expected["test_batch"]
    assert torch.equal(data.test.images[5], torch.from_numpy(test_data[5].reshape(3, 32, 32)))
    assert data.test.labels.tolist() == test_labels


def test_cifar100_pickle_format(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 8), ("test", 4)):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n}, f)
    data = load_data("cifar100", str(tmp_path))
    assert len(data.train) == 8 and data.num_classes == 100
    assert data.train.labels.tolist() == list(range(90, 98))


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_idx_from_data_root(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(2, dtype=np.uint8))
    data = load_data("fashion-mnist", str(tmp_path))
    assert data.input_shape == (1, 28, 28) and len(data.train) == 5
    assert torch.equal(data.train.images[3, 0], torch.from_numpy(images[3]))
    assert read_idx(folder / "train-labels-idx1-ubyte.gz").tolist() == [0, 1, 2, 3, 4]


def test_imagefolder_streams_batches_with_indices(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for cls in ("n01", "n02", "n03"):
            (tmp_path / "imagenet" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "imagenet" / split / cls / f"{i}.JPEG", format="JPEG")
    data = load_data("imagenet", str(tmp_path), {"image_size": 32, "num_workers": 0})
    assert data.num_classes == 3 and len(data.train) == 6 and data.input_shape == (3, 32, 32)
    order = torch.tensor([5, 0, 3])
    batches = list(data.train.batches(order, 2, augment=parse_pipeline(["crop", "flip"]),
                                      weights=torch.tensor([1.0, 2.0, 3.0])))
    assert [b.index.tolist() for b in batches] == [[5, 0], [3]]
    assert batches[0].x.shape == (2, 3, 32, 32)
    assert batches[0].y.tolist() == [2, 0] and batches[1].weight.tolist() == [3.0]


def test_missing_dataset_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "env"))
    monkeypatch.setattr("benchmarks.data.sources.download_torchvision",
                        lambda *a: (_ for _ in ()).throw(OSError("no network")))
    (tmp_path / "given").mkdir()  # a --data-root that does not exist is refused outright (test_bad_input.py)
    with pytest.raises(BenchError) as info:
        load_data("cifar10", str(tmp_path / "given"))
    message = str(info.value)
    assert str(tmp_path / "given") in message and str(tmp_path / "env") in message and "no network" in message
    assert "\n" not in message  # the CLI prints it as one line
    with pytest.raises(BenchError, match="ImageFolder layout"):
        load_data("imagenet", str(tmp_path / "given"))
    with pytest.raises(BenchError, match="unknown dataset"):
        load_data("mnist-3d")


def test_device_augmentation_matches_a_per_example_reference():
    images = torch.randint(0, 256, (16, 2, 6, 5), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(7)
    out = apply_pipeline(images, parse_pipeline([{"name": "crop", "padding": 2}, "flip"]), generator)
    replay = torch.Generator().manual_seed(7)  # the same draws, in the same order, by hand
    dy = torch.randint(0, 5, (16,), generator=replay)
    dx = torch.randint(0, 5, (16,), generator=replay)
    flip = torch.rand(16, generator=replay) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(16):
        crop = padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 5]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_train_subset_is_fixed_and_seed_independent():
    data = load_data("synthetic")
    a = restrict_train(data, 100)
    b = restrict_train(load_data("synthetic"), 100)
    assert len(a.train) == 100 and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.train.images, b.train.images)
