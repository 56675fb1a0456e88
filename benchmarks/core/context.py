"""The run context a method reads: the protocol, the data, the device, the meter and seeded randomness.

Its own module (not the trainer's) so that benchmarks.api can re-export it without importing the
trainer, which imports the api. Every import it needs at run time is of modules that never import
the api; the rest are annotations only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.core.models import create_model

if TYPE_CHECKING:
    from benchmarks.core.compute import ComputeMeter
    from benchmarks.core.protocol import Protocol
    from benchmarks.data import DataBundle


def derive_seed(seed: int, *tags) -> int:
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class RunContext:
    """What a method sees: the protocol, the data, the device, the meter and seeded randomness."""

    protocol: Protocol
    data: DataBundle
    device: torch.device
    meter: ComputeMeter
    seed: int
    log: Callable[[str], None] = print
    progress: bool = False
    cache_dir: Path | None = None  # where methods may cache expensive artefacts (scores), shared by runs
    results_dir: Path | None = None  # the run's results folder: models saved by earlier runs are found there
    cached_seconds: float = 0.0  # seconds that cached artefacts cost when they were computed

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    def seed_for(self, *tags) -> int:
        return derive_seed(self.seed, *tags)

    def generator(self, *tags) -> torch.Generator:
        """A CPU generator determined by (seed, tags): the same draws on every rank and every resume."""
        return torch.Generator().manual_seed(self.seed_for(*tags))

    def new_model(self, *tags, **model_kwargs) -> torch.nn.Module:
        """A freshly initialised model of the protocol, its initialisation determined by (seed, tags).

        `model_kwargs` override the protocol's (a method building a backbone without a classifier
        passes num_classes=0 where the model supports it).
        """
        kwargs = dict(in_chans=self.data.input_shape[0], num_classes=self.data.num_classes,
                      pretrained=self.protocol.pretrained, pretrained_file=self.protocol.pretrained_file,
                      **self.protocol.model_kwargs)
        kwargs.update(model_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_for("model", *tags))
            model = create_model(self.protocol.model, **kwargs)
        return model.to(self.device)
