"""Dataset splits that yield batches carrying their original dataset indices.

TensorSplit: a small dataset held as uint8 tensors on the training device; augmentation (pad-crop,
flip) runs on the device per batch, as airbench does: no per-example Python in the hot loop.
StreamingSplit: a large dataset (ImageNet) read from disk by a DataLoader with workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..hooks import Batch


def random_crop_flip(images: torch.Tensor, augment: list, padding: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Per-example random pad-crop and horizontal flip of a uint8 batch [B, C, H, W], on its device.

    Random numbers come from a CPU generator so that a run is reproducible on any device.
    """
    b, c, h, w = images.shape
    device = images.device
    if "crop" in augment and padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch_ix = torch.arange(b, device=device)[:, None, None, None]
        chan_ix = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch_ix, chan_ix, rows, cols]
    if "flip" in augment:
        flip = (torch.rand(b, generator=generator) < 0.5).to(device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


class TensorSplit:
    """A split held in memory on the device as uint8 images [N, C, H, W] and int64 labels."""

    streaming = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple,
                 groups: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long().cpu()
        self._labels_dev = labels.long().to(images.device)
        self.groups = groups
        self.stats = (tuple(mean), tuple(std))
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.labels, *self.stats, self.groups)

    def subset(self, indices: torch.Tensor) -> TensorSplit:
        groups = self.groups[indices] if self.groups is not None else None
        return TensorSplit(self.images[indices.to(self.images.device)], self.labels[indices], *self.stats, groups)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def batches(self, order: torch.Tensor, batch_size: int, *, augment: list = (), padding: int = 0,
                weights: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Batches of the examples `order` (CPU int64 dataset indices), in that order."""
        device = self.images.device
        order_dev = order.to(device)
        weights_dev = weights.to(device) if weights is not None else None
        for start in range(0, len(order), batch_size):
            index = order_dev[start:start + batch_size]
            images = self.images[index]
            if augment:
                images = random_crop_flip(images, augment, padding, generator)
            yield Batch(x=self.normalize(images), y=self._labels_dev[index], index=index,
                        weight=weights_dev[start:start + batch_size] if weights_dev is not None else None)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.transform(image), label, i


class StreamingSplit:
    """A split read from disk: `dataset[i]` returns (PIL image, label); transforms run in workers."""

    streaming = True

    def __init__(self, dataset, labels: torch.Tensor, train_transform, eval_transform, input_shape: tuple,
                 num_workers: int, groups: torch.Tensor | None = None):
        self.dataset = dataset
        self.labels = labels.long().cpu()
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.input_shape = input_shape
        self.num_workers = num_workers
        self.groups = groups
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> StreamingSplit:
        self.device = torch.device(device)
        return self

    def subset(self, indices: torch.Tensor) -> StreamingSplit:
        groups = self.groups[indices] if self.groups is not None else None
        split = StreamingSplit(torch.utils.data.Subset(self.dataset, indices.tolist()), self.labels[indices],
                               self.train_transform, self.eval_transform, self.input_shape,
                               self.num_workers, groups)
        return split.to(self.device)

    def batches(self, order: torch.Tensor, batch_size: int, *, augment: list = (), padding: int = 0,
                weights: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        transform = self.train_transform if augment else self.eval_transform
        loader = torch.utils.data.DataLoader(
            _Indexed(self.dataset, transform), batch_size=batch_size, sampler=order.tolist(),
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda", generator=generator,
            persistent_workers=False)
        weights_dev = weights.to(self.device) if weights is not None else None
        start = 0
        for x, y, index in loader:
            n = len(y)
            yield Batch(x=x.to(self.device, non_blocking=True), y=y.to(self.device, non_blocking=True),
                        index=index.to(self.device),
                        weight=weights_dev[start:start + n] if weights_dev is not None else None)
            start += n
