"""Test-only additions for data-parallel tests, in a module of their own so that saved models that
use them load in the test process too (tests/distributed_support.py runs the CLI with them).
- `test-count-forgetting`: full-data training that counts forgetting events in its own `observe`
  (the main run's per-example outcomes, all-gathered under data parallelism); the counts' digest
  and total go to method_stats.
- `test-failing-prepare`: a method whose prepare raises.
- model `tiny-cnn-rank-bn`: the smoke model whose BatchNorm, in training, normalises each half of the
  batch with that half's statistics and updates its running statistics from the first half only.
  That is exactly what 2-rank DDP with per-rank BatchNorm computes (each rank normalises its shard;
  DDP broadcasts rank 0's buffers before each forward), so one process with this model must match a
  2-rank run of tiny-cnn: it isolates per-rank BatchNorm statistics as the source of any difference.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from benchmarks.api import Method
from benchmarks.core.distributed import shard_of
from benchmarks.core.models import ConvNet, register_model
from benchmarks.core.registry import register


@register("test-count-forgetting")
class CountForgetting(Method):
    """Test-only: counts forgetting events of the main run (every rank sees the whole batch)."""

    def __init__(self, **params):
        super().__init__(**params)
        self.events = self.last = None

    def observe(self, info):
        n = self.ctx.num_train
        if self.events is None:
            self.events = torch.zeros(n, dtype=torch.long)
            self.last = torch.zeros(n, dtype=torch.bool)
        index, correct = info.index.cpu(), info.correct.cpu()
        self.events[index] += (self.last[index] & ~correct).long()
        self.last[index] = correct

    def summary(self):
        return {"events": int(self.events.sum()), "presented": int(self.last.numel()),
                "events_sha256": hashlib.sha256(self.events.numpy().tobytes()).hexdigest()[:16]}

    def state_dict(self):
        return {"events": self.events, "last": self.last}

    def load_state_dict(self, state):
        self.events, self.last = state["events"], state["last"]


@register("test-failing-prepare")
class FailingPrepare(Method):
    """Test-only: its prepare (which runs on rank 0 alone) fails."""

    def prepare(self, ctx):
        raise ValueError("the proxy's data is unreadable")


class RankBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm over each of `ranks` contiguous shards of the batch; running statistics from shard 0."""

    ranks = 2

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        parts = []
        for rank in range(self.ranks):
            shard = x[shard_of(len(x), rank, self.ranks)]
            stats = (self.running_mean, self.running_var) if rank == 0 else (None, None)
            if rank == 0:
                self.num_batches_tracked.add_(1)
            parts.append(F.batch_norm(shard, *stats, self.weight, self.bias, True, self.momentum, self.eps))
        return torch.cat(parts)


@register_model
def tiny_cnn_rank_bn(in_chans: int, num_classes: int) -> torch.nn.Module:
    model = ConvNet(in_chans, num_classes, [[8], [16]])
    for stage in model.features:
        for i, layer in enumerate(stage) if isinstance(stage, torch.nn.Sequential) else []:
            if isinstance(layer, torch.nn.BatchNorm2d):
                replacement = RankBatchNorm2d(layer.num_features)
                replacement.load_state_dict(layer.state_dict())
                stage[i] = replacement
    return model
