"""Optimisers and learning-rate schedules of the protocols.

The schedule is a pure function of training progress measured in epochs (fractional, from the
true number of steps of each epoch), not a stateful scheduler with a precomputed length: a method
that changes the epoch length (InfoBatch, a subset) can never leave the schedule stale, and a
resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

from benchmarks.core.protocol import Protocol

ONECYCLE_DIV = 25.0  # initial lr = max_lr / 25, as torch's OneCycleLR
ONECYCLE_FINAL_DIV = 1e4  # final lr = initial lr / 1e4


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    Weight decay and the trust ratio apply to weight matrices/kernels only (not to biases or
    normalisation parameters), as the common CIFAR/ImageNet recipes do.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                                        torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return None


def make_optimizer(protocol: Protocol, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(params, lr=protocol.lr, momentum=protocol.momentum,
                               nesterov=protocol.nesterov and protocol.momentum > 0,
                               weight_decay=protocol.weight_decay)
    if protocol.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=protocol.lr, weight_decay=protocol.weight_decay)
    if protocol.optimizer == "lars":
        return LARS(params, lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)
    raise ValueError(protocol.optimizer)


def lr_at(protocol: Protocol, progress: float, total_epochs: int | None = None) -> float:
    """The learning rate after `progress` epochs of a run of `total_epochs` epochs."""
    total = float(total_epochs or protocol.epochs)
    t = min(max(progress, 0.0), total)
    base = protocol.lr
    if protocol.schedule == "constant":
        lr = base
    elif protocol.schedule == "multistep":
        lr = base * protocol.gamma ** sum(t >= m for m in protocol.milestones)
    elif protocol.schedule == "linear":
        lr = base * (1 - t / total)
    elif protocol.schedule == "cosine":
        lr = base * 0.5 * (1 + math.cos(math.pi * t / total))
    elif protocol.schedule == "onecycle":
        lr = _onecycle(base, t / total, protocol.onecycle_pct_start)
    else:
        raise ValueError(protocol.schedule)
    if protocol.warmup_epochs > 0 and t < protocol.warmup_epochs:
        lr *= t / protocol.warmup_epochs
    return lr


def _onecycle(max_lr: float, fraction: float, pct_start: float) -> float:
    """Cosine warm-up from max_lr/25 to max_lr over pct_start, then cosine annealing to max_lr/25e4."""
    start, end = max_lr / ONECYCLE_DIV, max_lr / ONECYCLE_DIV / ONECYCLE_FINAL_DIV
    if fraction < pct_start:
        phase, low, high = fraction / pct_start, start, max_lr
        return high + (low - high) * 0.5 * (1 + math.cos(math.pi * phase))
    phase = (fraction - pct_start) / (1 - pct_start)
    return end + (max_lr - end) * 0.5 * (1 + math.cos(math.pi * phase))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
