"""The protocol's evaluation of a trained model, metered as eval.

- "accuracy": argmax accuracy of the model on each evaluation split (test, and val where the
  dataset has one). Where the split has groups (Waterbirds, spurious-fashion), also, per split:
  `<split>_group_acc` (per-group accuracy, a list indexed by group; None for a group the split lacks),
  `<split>_worst_group_acc` (the lowest of them), and `<split>_adjusted_avg_acc`: the per-group
  accuracies weighted by the TRAINING group proportions (ctx.data.train_group_counts), renormalised
  over the groups present in the split. On Waterbirds this adjusted average is what the papers call
  "average accuracy"; `<split>_acc` stays the plain average over the split's examples (comparing
  the plain test average with the papers' number is a known reproduction trap).
  Every split also gets `<split>_class_acc`: the accuracy on each class's examples, a list indexed by
  class (None for a class the split lacks), read off the same correct flags (no extra pass).
- "linear-probe": the frozen backbone's penultimate features of the training split and of each
  evaluation split (eval mode, un-augmented), standardised with the training features' mean and
  std; a linear classifier trained on them with Adam (protocol keys probe_epochs, probe_lr,
  probe_batch_size, probe_weight_decay), seeded from the run; the reported accuracy is that of
  the final probe epoch (RELA's code averages the last 3; we report the last, as for training).
A method may replace both with its own `evaluate`. Everything runs under ctx.meter.measure("eval").
Data parallel: accuracy is computed on each rank's share of every split and gathered; a linear
probe or a method's own evaluation runs on rank 0 and its metrics are broadcast (counted once).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from benchmarks.api import Method, overrides
from benchmarks.core.models import embed

if TYPE_CHECKING:
    from benchmarks.core.context import RunContext
    from benchmarks.core.distributed import Dist


def autocast_for(ctx: RunContext):
    """The mixed-precision context of the protocol on this device (none on the CPU)."""
    if ctx.protocol.amp and ctx.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def evaluate_model(model: torch.nn.Module, method: Method, ctx: RunContext, dist: Dist | None = None) -> dict:
    """The method's evaluation if it has one, else the protocol's, on the method's backbone."""
    was_training = model.training
    try:
        if ctx.protocol.evaluation == "accuracy" and not overrides(method, "evaluate"):
            return accuracy(method.backbone(model), ctx, dist)
        metrics = None
        if dist is None or dist.is_main:
            if overrides(method, "evaluate"):
                metrics = method.evaluate(model, ctx)
            if metrics is None:
                backbone = method.backbone(model)
                metrics = linear_probe(backbone, ctx) if ctx.protocol.evaluation == "linear-probe" \
                    else accuracy(backbone, ctx)
        return dist.broadcast(metrics) if dist is not None else metrics
    finally:
        model.train(was_training)


def group_metrics(correct: torch.Tensor, groups: torch.Tensor, num_groups: int,
                  train_counts: torch.Tensor | None) -> dict:
    """Per-group, worst-group and train-proportion-weighted ("adjusted") accuracy of one split.

    `correct` [N] bool, `groups` [N] int64 in [0, num_groups), `train_counts` [num_groups] (or None:
    no adjusted average). A group with no example in the split has accuracy None and no weight.
    """
    group_acc: list[float | None] = []
    for g in range(num_groups):
        members = correct[groups == g]
        group_acc.append(members.double().mean().item() if len(members) else None)
    present = [g for g, acc in enumerate(group_acc) if acc is not None]
    metrics = {"group_acc": group_acc, "worst_group_acc": min(group_acc[g] for g in present)}
    if train_counts is not None:
        weights = train_counts.double()[present]
        if weights.sum() > 0:
            accs = torch.tensor([group_acc[g] for g in present], dtype=torch.float64)
            metrics["adjusted_avg_acc"] = ((weights * accs).sum() / weights.sum()).item()
    return metrics


def class_accuracy(correct: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per-class accuracy of one split: `correct` [N] bool, `labels` [N] int64 in [0, num_classes); a class
    with no example in the split is None (no accuracy to report, rather than a 0 that reads as failure)."""
    labels = labels.cpu()
    hits = torch.bincount(labels[correct.cpu()], minlength=num_classes)
    totals = torch.bincount(labels, minlength=num_classes)
    return [h / t if t else None for h, t in zip(hits.tolist(), totals.tolist())]


@torch.no_grad()
def accuracy(model: torch.nn.Module, ctx: RunContext, dist: Dist | None = None) -> dict:
    """Accuracy on each evaluation split, with the group metrics where the split has groups.

    Data parallel: each rank evaluates its share of a split; the correct flags are gathered.
    """
    model.eval()
    metrics = {}
    for name, split in ctx.data.eval_splits().items():
        order = torch.arange(len(split))
        if dist is not None:
            order = order[dist.shard(len(split))]
        hits, seen = [], []
        for batch in split.batches(order, ctx.protocol.eval_batch_size):
            with ctx.meter.measure("eval", ("eval", tuple(batch.x.shape)), examples=len(batch.y)), autocast_for(ctx):
                logits = model(batch.x)
            hits.append(logits.argmax(1) == batch.y)
            seen.append(batch.index)
        hits, seen = torch.cat(hits), torch.cat(seen)
        if dist is not None:
            hits, seen = dist.gather_rows(hits), dist.gather_rows(seen)
        correct = torch.zeros(len(split), dtype=torch.bool)
        correct[seen.cpu()] = hits.cpu()
        metrics[f"{name}_acc"] = correct.float().mean().item()
        metrics[f"{name}_class_acc"] = class_accuracy(correct, split.labels, ctx.data.num_classes)
        if split.groups is not None:
            num_groups = ctx.data.num_groups or int(split.groups.max()) + 1
            for key, value in group_metrics(correct, split.groups, num_groups, ctx.data.train_group_counts).items():
                metrics[f"{name}_{key}"] = value
    return metrics


@torch.no_grad()
def frozen_features(model: torch.nn.Module, split, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, d], labels [N]) of a split, un-augmented, the model in eval mode; metered as eval."""
    model.eval()
    features, labels = None, torch.empty(len(split), dtype=torch.long, device=ctx.device)
    for batch in split.batches(torch.arange(len(split)), ctx.protocol.eval_batch_size):
        with ctx.meter.measure("eval", ("features", tuple(batch.x.shape)), examples=len(batch.y)), autocast_for(ctx):
            f = embed(model, batch.x).float()
        if features is None:
            features = torch.empty(len(split), f.shape[1], device=ctx.device)
        features[batch.index] = f
        labels[batch.index] = batch.y
    return features, labels


def linear_probe(backbone: torch.nn.Module, ctx: RunContext) -> dict:
    """Test (and val) accuracy of a linear classifier trained on the frozen backbone's features."""
    protocol = ctx.protocol
    train_x, train_y = frozen_features(backbone, ctx.data.train, ctx)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed_for("probe-init"))
        head = torch.nn.Linear(train_x.shape[1], ctx.data.num_classes).to(ctx.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=protocol.probe_lr, weight_decay=protocol.probe_weight_decay)
    x = (train_x - mean) / std
    n, size = len(x), protocol.probe_batch_size
    with torch.enable_grad():
        for epoch in range(protocol.probe_epochs):
            order = torch.randperm(n, generator=ctx.generator("probe-order", epoch)).to(ctx.device)
            for start in range(0, n, size):
                index = order[start:start + size]
                with ctx.meter.measure("eval", ("probe-step", len(index)), examples=len(index)):
                    loss = F.cross_entropy(head(x[index]), train_y[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
    metrics = {}
    with torch.no_grad():
        with ctx.meter.measure("eval", ("probe-eval", tuple(x.shape))):
            metrics["probe_train_acc"] = (head(x).argmax(1) == train_y).float().mean().item()
        for name, split in ctx.data.eval_splits().items():
            features, labels = frozen_features(backbone, split, ctx)
            with ctx.meter.measure("eval", ("probe-eval", tuple(features.shape))):
                predicted = head((features - mean) / std).argmax(1)
            metrics[f"{name}_acc"] = (predicted == labels).float().mean().item()
            metrics[f"{name}_class_acc"] = class_accuracy(predicted == labels, labels, ctx.data.num_classes)
    return metrics
