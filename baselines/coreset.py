"""Geometry-based static coresets (as in DeepCore, Guo, Zhao, Bai 2022) on a proxy's embeddings.

Both train one proxy (run 0 of methods/scores.py, so it is shared with EL2N/CCS at the same epoch
and cached) for `score_epoch` epochs (default -1: 10% of the protocol's epochs), embed every
training example with its penultimate layer (eval mode, un-augmented), and pick
k = round(fraction * N) examples greedily:
- kcenter: k-center greedy (Sener & Savarese 2018): start from a seeded random example, then
  repeatedly add the example farthest from everything chosen so far (Euclidean). A min-distance
  vector is kept on the device; each pick updates it with one matrix-vector product.
- herding: kernel herding on the embeddings (Welling 2009, Chen et al. 2010): repeatedly add the
  example that brings the mean of the chosen embeddings closest to the mean of all; one
  matrix-vector product per pick.
class_balanced (default True, DeepCore's default) runs the greedy within each class with its
class_quotas share. Metered as selection: the proxy training, one forward pass per example for
the embeddings, and the greedy loops (one matrix-vector product over the n candidates of dimension
d per pick, 2 n d FLOPs). No host sync inside the greedy loops. Embeddings of the whole training set are held on
the device (N x d floats: 100 MB for CIFAR-10 with a ResNet-18; too much for ImageNet on most GPUs).
"""

from __future__ import annotations

import torch

from benchmarks.api import Param, Protocol, RunContext, register
from benchmarks.kit.proxies import embedding_pass, train_proxy
from benchmarks.kit.scoring import early_epoch, resolve_score_epoch
from benchmarks.kit.subsets import FRACTION, StaticSubset, class_quotas, subset_size


def kcenter_greedy(x: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Positions of k rows of x [n, d], in pick order: `first`, then each farthest from those chosen."""
    n = len(x)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    if k == 0:
        return chosen
    sq_norms = x.square().sum(1)
    min_dist = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
    pick = torch.tensor([first], device=x.device)
    for t in range(k):
        chosen[t:t + 1] = pick
        if t == k - 1:
            break
        center = x.index_select(0, pick)[0]
        dist = (sq_norms - 2 * (x @ center) + sq_norms.index_select(0, pick)).clamp_min(0)
        min_dist = torch.minimum(min_dist, dist).index_fill_(0, pick, float("-inf"))
        pick = min_dist.argmax().view(1)
    return chosen


def herding(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of k rows of x [n, d], in pick order: each makes the chosen mean closest to the mean."""
    n = len(x)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    target = x.mean(0)
    total = torch.zeros_like(target)
    sq_norms = x.square().sum(1)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    for t in range(k):
        # || target - (total + x_i) / (t + 1) ||^2 is, up to a constant and the factor (t + 1)^-2,
        # || v - x_i ||^2 = ||x_i||^2 - 2 v.x_i + const with v = (t + 1) * target - total.
        v = (t + 1) * target - total
        cost = (sq_norms - 2 * (x @ v)).masked_fill_(taken, float("inf"))
        pick = cost.argmin().view(1)
        chosen[t:t + 1] = pick
        taken.index_fill_(0, pick, True)
        total += x.index_select(0, pick)[0]
    return chosen


class EmbeddingCoreset(StaticSubset):
    """Shared by the geometric coresets: one proxy, its embeddings, a greedy pick per class."""

    params = {
        "fraction": FRACTION,
        "class_balanced": Param(True, "pick within each class, keeping its share (DeepCore's default)"),
        "score_epoch": Param(-1, "proxy epochs before embedding; -1 = 10% of the protocol's", low=-1),
    }

    def greedy(self, x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def groups(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """(members, quota) per class, or all examples at once."""
        k = subset_size(len(labels), self.hparams["fraction"])
        if not self.hparams["class_balanced"]:
            return [(torch.arange(len(labels)), k)]
        return [((labels == cls).nonzero().flatten(), quota) for cls, quota in class_quotas(labels, k).items()]

    def resolved_epoch(self, protocol: Protocol) -> int:
        return resolve_score_epoch(self.hparams["score_epoch"], protocol, early_epoch)

    def prepare(self, ctx: RunContext) -> None:
        epoch = self.resolved_epoch(ctx.protocol)
        before = ctx.meter.flops["selection"]
        model, cached = train_proxy(ctx, 0, epoch)
        embeddings = embedding_pass(model, ctx)
        chosen = []
        for members, quota in self.groups(ctx.data.train.labels):
            generator = ctx.generator(self.name, len(chosen))
            points = embeddings[members.to(embeddings.device)]
            with ctx.meter.measure("selection", (self.name, "greedy", tuple(points.shape), quota)):
                picks = self.greedy(points, quota, generator).cpu()
            chosen.append(members[picks])
        self.subset = torch.cat(chosen).sort().values
        self.stats = {"score_epoch": epoch, "proxy_cached": cached, "kept": len(self.subset),
                      "feature_dim": embeddings.shape[1], "selection_flops": ctx.meter.flops["selection"] - before}


@register("kcenter")
class KCenter(EmbeddingCoreset):
    """k-center greedy on a proxy's penultimate embeddings: cover the embedding space (DeepCore)."""

    def greedy(self, x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        first = int(torch.randint(len(x), (1,), generator=generator)) if len(x) else 0
        return kcenter_greedy(x, k, first)


@register("herding")
class Herding(EmbeddingCoreset):
    """Herding on a proxy's penultimate embeddings: the chosen mean tracks the full mean (DeepCore)."""

    def greedy(self, x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        return herding(x, k)
