"""Dataset splits that yield batches carrying their original dataset indices.

TensorSplit: a small dataset held as uint8 tensors on the training device; augmentation (the
registry of benchmarks/core/augment.py) runs on the device per batch, as airbench does: no per-example
Python in the hot loop. Its batches also carry the raw images, from which a method draws views.
StreamingSplit: a large dataset (ImageNet, Waterbirds) read from disk by a DataLoader with workers;
with `device_transforms` the workers only read the files' bytes and the transforms decode and
augment the batch on the training device (data_kwargs decode = "gpu", benchmarks/data/device_decode.py).

Group labels (Waterbirds, spurious-fashion): a split may carry `groups` [N] (int64, CPU). The
training split's groups are HIDDEN from every method that does not declare `reads_train_groups`
(an oracle such as Group DRO): reading `split.groups` then raises GroupLabelsHidden, and batches
carry `group = None`. So a method like JTT, whose claim is that it never sees training group
labels, cannot read them by accident; the harness alone reads them for its after-the-fact summaries
(`unhidden_groups`). A split whose groups are visible puts them on each batch (`Batch.group`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from benchmarks.api import Batch
from benchmarks.core.augment import Views, apply_pipeline
from benchmarks.core.distributed import shard_of
from benchmarks.data.device_decode import collate_encoded


class GroupLabelsHidden(RuntimeError):
    """A method read training group labels that it did not declare it reads (Method.reads_train_groups)."""


class _GroupLabels:
    """The optional group labels of a split, hideable from the methods that must not read them."""

    _groups: torch.Tensor | None
    _hidden_from: str | None = None

    @property
    def groups(self) -> torch.Tensor | None:
        if self._hidden_from is not None:
            raise GroupLabelsHidden(
                f"training group labels are hidden from method '{self._hidden_from}': only a method that "
                "declares Traits(reads_train_groups=True) (an oracle reference such as group-dro) may read them")
        return self._groups

    @property
    def groups_visible(self) -> bool:
        """Whether batches carry group labels (the split has them and they are not hidden)."""
        return self._groups is not None and self._hidden_from is None

    def _keep_hidden(self, split):
        split._hidden_from = self._hidden_from
        return split

    def hide_groups(self, method: str):
        """A view of this split whose group labels raise GroupLabelsHidden when read (same data)."""
        if self._groups is None:
            return self
        split = copy.copy(self)
        split._hidden_from = method
        return split


def unhidden_groups(split) -> torch.Tensor | None:
    """The split's group labels even when hidden: for the harness's summaries after training only."""
    return split._groups


class TensorSplit(_GroupLabels):
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
        if groups is not None and len(groups) != len(labels):
            raise ValueError(f"{len(groups)} group labels for {len(labels)} examples")
        self._groups = groups.long().cpu() if groups is not None else None
        self._groups_dev = groups.long().to(images.device) if groups is not None else None
        self.stats = (tuple(mean), tuple(std))
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device) -> TensorSplit:
        return self._keep_hidden(TensorSplit(self.images.to(device), self.labels, *self.stats, self._groups))

    def subset(self, indices: torch.Tensor) -> TensorSplit:
        groups = self._groups[indices] if self._groups is not None else None
        return self._keep_hidden(TensorSplit(self.images[indices.to(self.images.device)], self.labels[indices],
                                             *self.stats, groups))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def batches(self, order: torch.Tensor, batch_size: int, *, augment: list = (),
                weights: torch.Tensor | None = None, generator: torch.Generator | None = None,
                views: Views | None = None, shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Batches of the examples `order` (CPU int64 dataset indices), in that order.

        `augment`: a parsed pipeline (benchmarks.core.augment.parse_pipeline), drawn from `generator`.
        `shard` = (rank, world_size): every batch is built and augmented whole (the same draws as one
        process) and this rank's contiguous share of it is yielded.
        """
        device = self.images.device
        order_dev = order.to(device)
        weights_dev = weights.to(device) if weights is not None else None
        groups = self._groups_dev if self.groups_visible else None
        for start in range(0, len(order), batch_size):
            index = order_dev[start:start + batch_size]
            raw = self.images[index]
            images = apply_pipeline(raw, augment, generator) if augment else raw
            weight = weights_dev[start:start + batch_size] if weights_dev is not None else None
            if shard is None:
                yield Batch(x=self.normalize(images), y=self._labels_dev[index], index=index, weight=weight,
                            raw=raw, views=views, group=groups[index] if groups is not None else None)
                continue
            part = shard_of(len(index), *shard)
            yield Batch(x=self.normalize(images[part]), y=self._labels_dev[index[part]], index=index[part],
                        weight=weight[part] if weight is not None else None, raw=raw, views=views, shard=part,
                        total=len(index), group=groups[index[part]] if groups is not None else None)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return (self.transform(image) if self.transform is not None else image), label, i


class StreamingSplit(_GroupLabels):
    """A split read from disk: `dataset[i]` returns (PIL image, label); transforms run in workers.

    With `device_transforms`, `dataset[i]` returns (the file's bytes, label) and the transforms are
    benchmarks.data.device_decode.DeviceTransform: called in this process on a batch's bytes, they
    decode and transform it on the split's device.
    """

    streaming = True

    def __init__(self, dataset, labels: torch.Tensor, train_transform, eval_transform, input_shape: tuple,
                 num_workers: int, groups: torch.Tensor | None = None, device_transforms: bool = False):
        self.dataset = dataset
        self.device_transforms = device_transforms
        self.labels = labels.long().cpu()
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.input_shape = input_shape
        self.num_workers = num_workers
        if groups is not None and len(groups) != len(labels):
            raise ValueError(f"{len(groups)} group labels for {len(labels)} examples")
        self._groups = groups.long().cpu() if groups is not None else None
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> StreamingSplit:
        self.device = torch.device(device)
        return self

    def subset(self, indices: torch.Tensor) -> StreamingSplit:
        groups = self._groups[indices] if self._groups is not None else None
        split = StreamingSplit(torch.utils.data.Subset(self.dataset, indices.tolist()), self.labels[indices],
                               self.train_transform, self.eval_transform, self.input_shape,
                               self.num_workers, groups, self.device_transforms)
        return self._keep_hidden(split.to(self.device))

    def batches(self, order: torch.Tensor, batch_size: int, *, augment: list = (),
                weights: torch.Tensor | None = None, generator: torch.Generator | None = None,
                views: Views | None = None, shard: tuple[int, int] | None = None) -> Iterator[Batch]:
        """Batches read by workers; `augment` non-empty picks the training transform (the loader's own).

        With `shard` = (rank, world_size) this rank's workers read only its share of each batch (their
        random transforms are the loader's own, so they differ from one process's; with
        device_transforms, each image's draws follow its position in `order`, so they are one process's).
        """
        transform = self.train_transform if augment else self.eval_transform
        steps = [(start, min(start + batch_size, len(order))) for start in range(0, len(order), batch_size)]
        parts = [shard_of(end - start, *shard) if shard else slice(0, end - start) for start, end in steps]
        if self.device_transforms:
            # The one draw the DataLoader would make for its workers' seeds (the workers draw nothing
            # here): it seeds each image's crop and flip, and the generator advances as on the PIL path.
            seed = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
            loader_generator, collate = torch.Generator(), collate_encoded
        else:
            loader_generator, collate = generator, None
        loader = torch.utils.data.DataLoader(
            _Indexed(self.dataset, None if self.device_transforms else transform),
            batch_sampler=[order[start:end][part].tolist() for (start, end), part in zip(steps, parts)],
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda", generator=loader_generator,
            persistent_workers=False, collate_fn=collate)
        weights_dev = weights.to(self.device) if weights is not None else None
        groups = self._groups if self.groups_visible else None
        for ((start, end), part), (x, y, index) in zip(zip(steps, parts), loader):
            if self.device_transforms:
                first = start + part.start
                x = transform(x, self.device, [(seed + first + j) % 2**63 for j in range(len(x))])
            weight = weights_dev[start:end][part] if weights_dev is not None else None
            yield Batch(x=x.to(self.device, non_blocking=True), y=y.to(self.device, non_blocking=True),
                        index=index.to(self.device), weight=weight, shard=part if shard else None,
                        total=end - start if shard else None,
                        group=groups[index].to(self.device) if groups is not None else None)
