"""The one training loop. It knows no method by name: methods act only through the hooks.

`fit` trains a model for some epochs and charges its passes to the meter. The run's main training
and a method's proxy training (in `prepare`) both go through it, so both are metered the same way.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .compute import ComputeMeter, forward_flops_per_example
from .data import DataBundle
from .errors import NonFiniteLoss
from .hooks import Batch, EpochPlan, Method, StepInfo
from .models import create_model
from .optim import lr_at, make_optimizer, set_lr
from .protocol import Protocol

NAN_CHECK_EVERY = 25  # steps between finiteness checks of the loss (each check syncs a GPU)

# Set by a signal handler (Slurm's warning signal, SIGTERM): the trainer stops at the next step
# boundary with its mid-epoch state in `Trainer.partial`, so a checkpoint loses no work.
STOP = threading.Event()


class Preempted(Exception):
    """Training stopped on request; the trainer's state is complete up to the last step."""


def derive_seed(seed: int, *tags) -> int:
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class TrainState:
    """Everything that a resumed fit needs besides the model and optimiser."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    seconds: float = 0.0  # training time so far (evaluation excluded)
    curve: list = field(default_factory=list)


@dataclass
class EpochProgress:
    """An epoch under way: its visiting order and how far it got (for a mid-epoch checkpoint)."""

    epoch: int
    order: torch.Tensor
    weights: torch.Tensor | None
    info: dict
    augment_rng: torch.Tensor  # state of the augmentation generator at the next batch
    steps_done: int = 0
    seen: int = 0
    loss_sum: float = 0.0


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

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    def generator(self, *tags) -> torch.Generator:
        """A CPU generator determined by (seed, tags): the same draws on every rank and every resume."""
        return torch.Generator().manual_seed(derive_seed(self.seed, *tags))

    def new_model(self, *tags) -> torch.nn.Module:
        """A freshly initialised model of the protocol, its initialisation determined by (seed, tags)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "model", *tags))
            model = create_model(self.protocol.model, in_chans=self.data.input_shape[0],
                                 num_classes=self.data.num_classes, **self.protocol.model_kwargs)
        return model.to(self.device)

    def model_forward_flops(self, model: torch.nn.Module) -> int:
        return forward_flops_per_example(model, self.data.input_shape, self.device)

    def fit(self, model: torch.nn.Module, method: Method | None = None, *, epochs: int | None = None,
            purpose: str = "selection", evaluate: bool = False, tag: str = "proxy") -> TrainState:
        """Train `model` under the protocol (proxy runs use this from `prepare`); charged to `purpose`."""
        trainer = Trainer(self, model, method or Method(), purpose=purpose, evaluate=evaluate,
                          epochs=epochs, tag=tag)
        return trainer.fit()


def per_example_cross_entropy(protocol: Protocol) -> Callable:
    def objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y, reduction="none",
                               label_smoothing=protocol.label_smoothing)
        return loss, logits

    return objective


def _overrides(method: Method, hook: str) -> bool:
    return getattr(type(method), hook) is not getattr(Method, hook)


class Trainer:
    def __init__(self, ctx: RunContext, model: torch.nn.Module, method: Method, *, purpose: str = "train",
                 evaluate: bool = True, epochs: int | None = None, tag: str = "main",
                 forward_flops: int | None = None):
        self.ctx, self.model, self.method = ctx, model, method
        self.protocol = ctx.protocol
        self.purpose, self.evaluate, self.tag = purpose, evaluate, tag
        self.epochs = epochs or self.protocol.epochs
        self.forward_flops = forward_flops or (ctx.meter.forward_flops if purpose == "train"
                                               else ctx.model_forward_flops(model))
        self.optimizer = make_optimizer(self.protocol, model)
        self.use_amp = self.protocol.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.objective = method.objective or per_example_cross_entropy(self.protocol)
        self.observes = _overrides(method, "observe")
        self.selects = _overrides(method, "select")
        self.state = TrainState()
        self.partial: EpochProgress | None = None

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "method": self.method.state_dict(), "train_state": vars(self.state).copy(),
                "partial": vars(self.partial).copy() if self.partial is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.state = TrainState(**state["train_state"])
        self.partial = EpochProgress(**state["partial"]) if state.get("partial") else None
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # -- the epoch -------------------------------------------------------------------------------
    def epoch_order(self, epoch: int, plan: EpochPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shuffled visiting order of an epoch, with its aligned weights.

        Under the "iterations" budget the main run keeps the full-data example count per epoch by
        cycling through fresh shuffles of the plan.
        """
        generator = self.ctx.generator(self.tag, "order", epoch)
        n_plan = len(plan.indices)
        if n_plan == 0:
            raise ValueError(f"epoch {epoch}: the method planned no examples")
        target = n_plan
        if self.purpose == "train" and self.protocol.budget == "iterations":
            target = self.ctx.num_train
        positions = torch.cat([torch.randperm(n_plan, generator=generator)
                               for _ in range(-(-target // n_plan))])[:target]
        weights = plan.weights[positions] if plan.weights is not None else None
        return plan.indices[positions], weights

    def fit(self, on_epoch_end: Callable[[Trainer], None] | None = None) -> TrainState:
        while self.state.epoch < self.epochs:
            entry = self.run_epoch(self.state.epoch)
            if on_epoch_end is not None:
                on_epoch_end(self)  # (the checkpoint) before the line below: a logged epoch is a saved one
            if not self.ctx.progress:
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()
                         if k in ("train_loss", "test_acc", "val_acc", "seconds", "examples")}
                self.ctx.log(f"[{self.tag}] epoch {entry['epoch']}/{self.epochs} {shown}")
            if STOP.is_set() and self.state.epoch < self.epochs:
                raise Preempted(f"stopped after epoch {self.state.epoch}")
        return self.state

    def _begin_epoch(self, epoch: int) -> EpochProgress:
        plan = self.method.plan_epoch(epoch) or EpochPlan(torch.arange(self.ctx.num_train))
        order, weights = self.epoch_order(epoch, plan)
        return EpochProgress(epoch=epoch, order=order, weights=weights, info=dict(plan.info or {}),
                             augment_rng=self.ctx.generator(self.tag, "augment", epoch).get_state())

    def run_epoch(self, epoch: int) -> dict:
        protocol, ctx, model = self.protocol, self.ctx, self.model
        started = time.perf_counter()
        # A run stopped mid-epoch resumes exactly where it stopped: same order, same augmentation draws.
        progress = self.partial if self.partial is not None and self.partial.epoch == epoch \
            else self._begin_epoch(epoch)
        self.partial = None
        batch_size = protocol.batch_size * self.method.candidate_multiplier
        steps_this_epoch = -(-len(progress.order) // batch_size)
        generator = torch.Generator().set_state(progress.augment_rng)
        first = progress.steps_done * batch_size
        batches = ctx.data.train.batches(
            progress.order[first:], batch_size, augment=protocol.augment, padding=protocol.crop_padding,
            weights=progress.weights[first:] if progress.weights is not None else None, generator=generator)
        bar = _progress(ctx.progress, steps_this_epoch, f"{self.tag} epoch {epoch + 1}/{self.epochs}")
        bar.update(progress.steps_done)
        model.train()
        loss_sum = torch.tensor(progress.loss_sum, device=ctx.device, dtype=torch.float64)
        lr = lr_at(protocol, epoch, self.epochs)
        for i, batch in enumerate(batches, start=progress.steps_done):
            lr = lr_at(protocol, epoch + i / steps_this_epoch, self.epochs)
            set_lr(self.optimizer, lr)
            if self.selects:
                batch = self._select(batch)
            loss = self._step(batch, epoch)
            loss_sum += loss.detach() * len(batch.y)
            progress.seen += len(batch.y)
            if (i + 1) % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
                raise NonFiniteLoss(f"the training loss became {loss_sum.item()} in epoch {epoch + 1} "
                                    f"(by step {i + 1}); lower the learning rate or check the data")
            bar.update(1)
            if STOP.is_set() and i + 1 < steps_this_epoch:
                progress.steps_done, progress.loss_sum = i + 1, loss_sum.item()
                progress.augment_rng = generator.get_state()
                self.partial = progress
                self.state.seconds += time.perf_counter() - started
                bar.close()
                raise Preempted(f"stopped in epoch {epoch + 1} after step {i + 1} of {steps_this_epoch}")
        bar.close()
        train_loss = (loss_sum / max(progress.seen, 1)).item()
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"the training loss became {train_loss} in epoch {epoch + 1}; "
                                "lower the learning rate or check the data")
        self.state.seconds += time.perf_counter() - started
        self.state.epoch = epoch + 1
        entry = {"epoch": epoch + 1, "step": self.state.step, "flops": ctx.meter.total,
                 "seconds": round(self.state.seconds, 3), "train_loss": train_loss, "examples": progress.seen,
                 "lr": lr}  # the last step's learning rate, as used
        entry.update(progress.info)
        entry.update(self.method.epoch_info(epoch))
        if self.evaluate and ((epoch + 1) % protocol.eval_every == 0 or epoch + 1 == self.epochs):
            entry.update(evaluate(model, ctx))
        self.state.curve.append(entry)
        return entry

    def _select(self, batch: Batch) -> Batch:
        selection = self.method.select(batch, self.model)
        if selection is None:
            return batch
        keep = selection.keep.to(batch.x.device)
        weight = selection.weights if selection.weights is not None else (
            batch.weight[keep] if batch.weight is not None else None)
        return Batch(x=batch.x[keep], y=batch.y[keep], index=batch.index[keep], weight=weight)

    def _step(self, batch: Batch, epoch: int) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else nullcontext()
        with autocast:
            losses, logits = self.objective(self.model, batch)
        loss = (losses * batch.weight).mean() if batch.weight is not None else losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.ctx.meter.charge(self.purpose, len(batch.y), backward=True, forward_flops=self.forward_flops)
        self.state.step += 1
        if self.observes:
            self.method.observe(StepInfo(epoch=epoch, step=self.state.step, index=batch.index,
                                         loss=losses.detach(), correct=logits.detach().argmax(1) == batch.y,
                                         logits=logits.detach()))
        return losses.detach().mean()


@torch.no_grad()
def evaluate(model: torch.nn.Module, ctx: RunContext) -> dict:
    """Accuracy (and worst-group accuracy where the split has groups) on each evaluation split."""
    was_training = model.training
    model.eval()
    metrics = {}
    for name, split in ctx.data.eval_splits().items():
        correct = torch.zeros(len(split), dtype=torch.bool)
        for batch in split.batches(torch.arange(len(split)), ctx.protocol.eval_batch_size):
            with torch.autocast("cuda", dtype=torch.float16) if (ctx.protocol.amp and ctx.device.type == "cuda") \
                    else nullcontext():
                logits = model(batch.x)
            correct[batch.index.cpu()] = (logits.argmax(1) == batch.y).cpu()
        ctx.meter.charge("eval", len(split), backward=False)
        metrics[f"{name}_acc"] = correct.float().mean().item()
        if split.groups is not None:
            group_accs = [correct[split.groups == g].float().mean().item() for g in split.groups.unique()]
            metrics[f"{name}_worst_group_acc"] = min(group_accs)
    model.train(was_training)
    return metrics


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
