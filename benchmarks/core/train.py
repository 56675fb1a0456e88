"""The one training loop. It knows no method by name: methods act only through the hooks.

`fit` trains a model for some epochs and meters every pass it runs. The run's main training and a
method's proxy training (in `prepare`) both go through it, so both are metered the same way: a
step's forward and backward (the method's objective included, views and target networks too) are
measured once per batch shape with flop_counter and charged to the trainer's purpose; `select` is
charged as selection; `after_step` and `observe` to the purposes they serve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from benchmarks.api import Batch, EpochPlan, Method, Selection, Step, StepInfo, cross_entropy, overrides
from benchmarks.core.augment import Views, parse_pipeline
from benchmarks.core.compute import unmetered
from benchmarks.core.context import RunContext
from benchmarks.core.distributed import Dist
from benchmarks.core.evaluation import autocast_for, evaluate_model
from benchmarks.core.optim import lr_at, make_optimizer, set_lr
from benchmarks.core.protocol import Protocol
from benchmarks.errors import BenchError, NonFiniteLoss

# The evaluation metrics progress lines and the terminal bar show, when a run has them.
SHOWN_METRICS = ("val_acc", "val_worst_group_acc", "test_acc", "test_worst_group_acc")
BAR_TEXT_EVERY = 10  # steps between updates of the terminal bar's text (each reads the loss: a GPU sync)
NAN_CHECK_EVERY = 25  # steps between finiteness checks of the loss (each check syncs a GPU)

# Set by a signal handler (Slurm's warning signal, SIGTERM): the trainer stops at the next step
# boundary with its mid-epoch state in `Trainer.partial`, so a checkpoint loses no work.
STOP = threading.Event()


class Preempted(Exception):
    """Training stopped on request; the trainer's state is complete up to the last step."""


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


def per_example_cross_entropy(protocol: Protocol) -> Callable:
    """The base objective under `protocol` (what Method.objective computes, without a method's context)."""
    def objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy(model, batch, protocol.label_smoothing)

    return objective


def set_up(method: Method, ctx: RunContext) -> None:
    """Call `method.setup(ctx)` as the contract says (benchmarks/api.py): never charged. The meter is
    paused (nothing is measured or charged) and no outer FLOP counter sees it.

    The global RNG is left to the method, as any hook's: setup draws from ctx.generator. (It is not
    forked here: a draw that a method made at this point before setup existed, such as a streaming
    split's loader seeding itself, must stay where it was for a fresh run to give the same result.)"""
    with unmetered(), ctx.meter.paused():
        method.setup(ctx)
    if method.ctx is not ctx:
        raise TypeError(f"{type(method).__name__}.setup must call super().setup(ctx) (it stores self.ctx)")


def check_distributable(protocol: Protocol, method: Method, device: torch.device) -> None:
    """What a data-parallel run cannot do, said before it starts."""
    if protocol.sync_batchnorm and device.type != "cuda":
        raise BenchError("sync_batchnorm needs CUDA: torch's SyncBatchNorm runs on GPUs only "
                         "(drop --set sync_batchnorm=true to keep per-rank BatchNorm statistics)")
    if method.traits.single_process_only:
        raise BenchError(f"method '{method.name}' runs in one process only: {method.traits.single_process_only}")
    if overrides(method, "select") and not method.traits.augment_batches:
        raise BenchError(f"method '{method.name}' selects online and draws its own views: its ranks would draw "
                         "different views; run it in one process")


@contextmanager
def batchnorm_statistics_kept(model: torch.nn.Module):
    """Run a pass in train mode and put every BatchNorm running statistic back as it was afterwards.

    A scoring pass over candidates must not move the statistics that training and evaluation use.
    """
    saved = [(m, m.running_mean.clone(), m.running_var.clone(),
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None]
    try:
        yield
    finally:
        for module, mean, var, tracked in saved:
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            if tracked is not None:
                module.num_batches_tracked.copy_(tracked)


class _Objective(torch.nn.Module):
    """The method's objective as a module, so that DDP sees the forward it must synchronise."""

    def __init__(self, model: torch.nn.Module, objective: Callable):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch):
        return self.objective(self.model, batch)


class Trainer:
    def __init__(self, ctx: RunContext, model: torch.nn.Module, method: Method, *, purpose: str = "train",
                 evaluate: bool = True, epochs: int | None = None, tag: str = "main", dist: Dist | None = None):
        """`dist`: train data-parallel across the process group (the main run only; see distributed.py)."""
        self.ctx, self.method = ctx, method
        self.protocol = ctx.protocol
        self.purpose, self.evaluate, self.tag = purpose, evaluate, tag
        self.epochs = epochs or self.protocol.epochs
        self.dist = dist
        if dist is not None:
            check_distributable(self.protocol, method, ctx.device)
            if self.protocol.sync_batchnorm:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = make_optimizer(self.protocol, model)
        self.use_amp = self.protocol.amp and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        # The base objective runs under this trainer's protocol: a helper method (a proxy's observer)
        # that keeps it needs no context.
        self.objective = method.objective if overrides(method, "objective") \
            else per_example_cross_entropy(self.protocol)
        self.augment = parse_pipeline(self.protocol.augment if method.traits.augment_batches else [],
                                      "augment", self.protocol.augment_defaults())
        self.hooks = {hook: overrides(method, hook) for hook in ("select", "after_step", "observe")}
        self.state = TrainState()
        self.partial: EpochProgress | None = None
        self.step_module = _Objective(model, self.objective)
        if dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(self.step_module, device_ids=device_ids,
                                                       find_unused_parameters=method.traits.unused_parameters)

    def autocast(self):
        return autocast_for(self.ctx)

    def _agreed(self, flag: bool) -> bool:
        """Data parallel: every rank acts on a flag (stop, non-finite loss) if any rank raised it."""
        return self.dist.any(flag) if self.dist is not None else flag

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "method": self.method.state_dict(), "train_state": vars(self.state).copy(),
                "partial": vars(self.partial).copy() if self.partial is not None else None,
                "torch_rng": torch.get_rng_state(),
                # this run's own GPU only: get_rng_state_all() would open a context on every visible
                # GPU, from every rank of a data-parallel run
                "cuda_rng": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.state = TrainState(**state["train_state"])
        self.partial = EpochProgress(**state["partial"]) if state.get("partial") else None
        # RNG states are CPU byte tensors whatever map_location moved the checkpoint to
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.ctx.device)

    # -- the epoch -------------------------------------------------------------------------------
    def epoch_order(self, epoch: int, plan: EpochPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The shuffled visiting order of an epoch, with its aligned weights.

        Under the "iterations" budget the main run keeps the full-data number of steps per epoch
        by cycling through fresh shuffles of the plan: N examples per epoch, or N x m candidates
        for an online method that trains on one in m of them.
        """
        generator = self.ctx.generator(self.tag, "order", epoch)
        n_plan = len(plan.indices)
        if n_plan == 0:
            raise ValueError(f"epoch {epoch}: the method planned no examples")
        target = n_plan
        if self.purpose == "train" and self.protocol.budget == "iterations":
            target = self.ctx.num_train * self.method.candidate_factor()
        positions = torch.cat([torch.randperm(n_plan, generator=generator)
                               for _ in range(-(-target // n_plan))])[:target]
        weights = plan.weights[positions] if plan.weights is not None else None
        return plan.indices[positions], weights

    def fit(self, on_epoch_end: Callable[[Trainer], None] | None = None) -> TrainState:
        started = time.perf_counter()
        while self.state.epoch < self.epochs:
            entry = self.run_epoch(self.state.epoch)
            if on_epoch_end is not None:
                on_epoch_end(self)  # (the checkpoint) before the line below: a logged epoch is a saved one
            # A stop asked for before this point ends the run here; one asked for after the epoch's line
            # (which a watcher may be waiting for) lands in the next epoch, mid-epoch, at a step boundary.
            stop = self._agreed(STOP.is_set()) and self.state.epoch < self.epochs
            if not self.ctx.progress:  # a log file (no terminal bar): one line per epoch
                self.ctx.log(self.epoch_line(entry, time.perf_counter() - started))
            if stop:
                raise Preempted(f"stopped after epoch {self.state.epoch}")
        return self.state

    def epoch_line(self, entry: dict, elapsed: float, last: int | None = None) -> str:
        """One epoch as a log line: loss, the latest evaluation (this epoch's or an earlier one's), the
        examples it trained on and the wall-clock elapsed. `last`: the epoch training stops at, when it
        stops before the schedule's end (a proxy's snapshot)."""
        stop = f" (of {last})" if last is not None and last != self.epochs else ""
        text = (f"[{self.tag}] epoch {entry['epoch']}/{self.epochs}{stop} loss {entry['train_loss']:.4f}, "
                f"{entry['examples']} examples")
        evaluated = self.last_evaluation()
        if evaluated is not None:
            where, metrics = evaluated
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            text += f", {shown}" + ("" if where == entry["epoch"] else f" (epoch {where})")
        return text + f", {elapsed:.0f} s elapsed"

    def bar_text(self, loss: float) -> str:
        evaluated = self.last_evaluation()
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in evaluated[1].items()) if evaluated else ""
        return f"loss {loss:.4f}" + (f", {metrics} (epoch {evaluated[0]})" if evaluated else "")

    def last_evaluation(self) -> tuple[int, dict] | None:
        """(epoch, headline metrics) of the latest evaluated epoch of the curve, or None."""
        for row in reversed(self.state.curve):
            metrics = {k: row[k] for k in SHOWN_METRICS if k in row}
            if metrics:
                return row["epoch"], metrics
        return None

    def _begin_epoch(self, epoch: int) -> EpochProgress:
        plan = self.method.plan_epoch(epoch) or EpochPlan(torch.arange(self.ctx.num_train))
        order, weights = self.epoch_order(epoch, plan)
        if self.dist is not None:  # every rank must visit the same global order: a method's plan is global
            digests = self.dist.gather_objects(hashlib.sha256(order.numpy().tobytes()).hexdigest())
            if len(set(digests)) != 1:
                raise RuntimeError(f"epoch {epoch + 1}: the ranks planned different visiting orders; a method's "
                                   "plan must depend only on its state, the epoch and ctx.generator")
        return EpochProgress(epoch=epoch, order=order, weights=weights, info=dict(plan.info or {}),
                             augment_rng=self.ctx.generator(self.tag, "augment", epoch).get_state())

    def run_epoch(self, epoch: int) -> dict:
        protocol, ctx, model = self.protocol, self.ctx, self.model
        started = time.perf_counter()
        # A run stopped mid-epoch resumes exactly where it stopped: same order, same augmentation draws.
        progress = self.partial if self.partial is not None and self.partial.epoch == epoch \
            else self._begin_epoch(epoch)
        self.partial = None
        batch_size = protocol.batch_size * self.method.candidate_factor()
        steps_this_epoch = -(-len(progress.order) // batch_size)
        generator = torch.Generator().set_state(progress.augment_rng.cpu())
        first = progress.steps_done * batch_size
        batches = self.batches(progress.order[first:], batch_size, generator,
                               progress.weights[first:] if progress.weights is not None else None)
        bar = _progress(ctx.progress, steps_this_epoch, f"{self.tag} epoch {epoch + 1}/{self.epochs}")
        bar.update(progress.steps_done)
        model.train()
        # Data parallel: each rank sums its own shards' losses; a checkpoint holds the global sum, which
        # rank 0 alone carries on after a resume.
        carried = progress.loss_sum if self.dist is None or self.dist.is_main else 0.0
        loss_sum = torch.tensor(carried, device=ctx.device, dtype=torch.float64)
        lr = lr_at(protocol, epoch, self.epochs)
        for i, batch in enumerate(batches, start=progress.steps_done):
            fraction_done = epoch + i / steps_this_epoch
            lr = lr_at(protocol, fraction_done, self.epochs)
            set_lr(self.optimizer, lr)
            step = Step(epoch=epoch, step=self.state.step, lr=lr, progress=fraction_done / self.epochs,
                        autocast=self.autocast)
            selection = None
            if self.hooks["select"]:
                batch, selection = self._select(batch, step)
            loss = self._step(batch, step, selection)
            loss_sum += loss.detach() * len(batch.y)
            examples, non_finite, stop = self._step_agreement(batch, loss_sum, (i + 1) % NAN_CHECK_EVERY == 0)
            progress.seen += examples
            if non_finite:
                raise NonFiniteLoss(f"the training loss became non-finite in epoch {epoch + 1} "
                                    f"(by step {i + 1}); lower the learning rate or check the data")
            bar.update(1)
            if ctx.progress and (i + 1) % BAR_TEXT_EVERY == 0:  # a terminal: the bar shows loss and the last evaluation
                bar.set_postfix_str(self.bar_text(loss_sum.item() / max(progress.seen, 1)))
            if stop and i + 1 < steps_this_epoch:
                progress.steps_done, progress.loss_sum = i + 1, self._global_sum(loss_sum.item())
                progress.augment_rng = generator.get_state()
                self.partial = progress
                self.state.seconds += time.perf_counter() - started
                ctx.meter.sync(self.dist)
                self._share_buffers()
                bar.close()
                raise Preempted(f"stopped in epoch {epoch + 1} after step {i + 1} of {steps_this_epoch}")
        bar.close()
        train_loss = self._global_sum(loss_sum.item()) / max(progress.seen, 1)
        ctx.meter.sync(self.dist)
        self._share_buffers()
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
            entry.update(evaluate_model(model, self.method, ctx, self.dist))
            ctx.meter.sync(self.dist)
        self.state.curve.append(entry)
        return entry

    def _share_buffers(self) -> None:
        """Data parallel: rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does
        before each forward, so evaluation and checkpoints see one model."""
        if self.dist is None:
            return
        import torch.distributed

        for buffer in self.model.buffers():
            torch.distributed.broadcast(buffer, src=0)

    def _global_sum(self, value: float) -> float:
        if self.dist is None:
            return value
        return self.dist.sum_floats([value])[0]

    def _step_agreement(self, batch: Batch, loss_sum: torch.Tensor, check_finite: bool) -> tuple[int, bool, bool]:
        """(examples the global step trained on, non-finite loss, stop), the same on every rank.

        Data parallel: a flag holds if some rank raised it, and a batch that a rank chose itself (online
        selection) counts the ranks' shares; all three are agreed in one all-reduce per step (a flag is
        raised when its sum over the ranks is positive). The finiteness check reads the loss (a GPU
        sync), so it runs only when asked.
        """
        non_finite = check_finite and not torch.isfinite(loss_sum).item()
        stop = STOP.is_set()
        if self.dist is None:
            return len(batch.y), non_finite, stop
        own_count = 0 if batch.total is not None else len(batch.y)
        stops, non_finites, count = self.dist.sum([int(stop), int(non_finite), own_count])
        return (batch.total if batch.total is not None else count), non_finites > 0, stops > 0

    def batches(self, order: torch.Tensor, batch_size: int, generator: torch.Generator,
                weights: torch.Tensor | None = None):
        """Training batches of `order`, augmented (and able to draw views) from `generator`."""
        train = self.ctx.data.train
        views = Views(train.normalize, generator, self.protocol.view_augment, self.protocol.augment_defaults()) \
            if hasattr(train, "normalize") else None
        shard = (self.dist.rank, self.dist.world_size) if self.dist is not None else None
        return train.batches(order, batch_size, augment=self.augment, weights=weights, generator=generator,
                             views=views, shard=shard)

    def forward_backward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The method's objective on the batch and its backward (gradients left for the optimiser).

        Data parallel: DDP averages the ranks' gradients, so a rank's loss is its share of the global
        batch's mean (sum over its rows x world_size / global batch size); a batch that a rank chose
        itself (online selection) counts as its own mean.
        """
        with self.autocast():
            losses, logits = self.step_module(batch)
        weighted = losses * batch.weight if batch.weight is not None else losses
        if self.dist is not None and batch.total is not None:
            loss = weighted.sum() * (self.dist.world_size / batch.total)
        else:
            loss = weighted.mean()
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return losses, logits

    def _select(self, batch: Batch, step: Step) -> tuple[Batch, Selection | None]:
        kept_bn = batchnorm_statistics_kept(self.model) if not self.method.traits.select_updates_batchnorm else nullcontext()
        with self.ctx.meter.measure("selection", (self.tag, "select", tuple(batch.x.shape)),
                                    examples=len(batch.y)), kept_bn:
            selection = self.method.select(batch, self.model, step)
        if selection is None:
            return batch, None
        return batch.take(selection.keep.to(batch.x.device), selection.weights), selection

    def apply_gradients(self, gradients: dict[str, torch.Tensor]) -> None:
        """Leave `gradients` (name -> tensor, every trainable parameter) for the optimiser, as a backward would.

        Data parallel: averaged over the ranks, as DDP's backward averages them (no backward ran here).
        """
        self.optimizer.zero_grad(set_to_none=True)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in gradients:
                raise ValueError(f"the selection's gradients lack trainable parameter '{name}'")
            grad = gradients[name].detach().to(param.dtype)
            param.grad = self.scaler.scale(grad) if self.scaler is not None else grad
        if self.dist is not None:
            self.dist.average_([p.grad for p in self.model.parameters() if p.grad is not None])

    def _step(self, batch: Batch, step: Step, selection: Selection | None = None) -> torch.Tensor:
        meter = self.ctx.meter
        if selection is not None and selection.gradients is not None:
            # One pass: `select` formed the kept examples' gradient from its candidate pass (metered there).
            # Its FLOPs were charged as selection; the examples trained on still count as trained.
            if selection.losses is None:
                raise ValueError("a selection with gradients must carry the kept examples' losses")
            self.apply_gradients(selection.gradients)
            losses, logits = selection.losses, selection.logits
            meter.charge_flops(self.purpose, 0, examples=len(batch.y))
        else:
            key = (self.tag, "step", tuple(batch.x.shape), self.method.cost_variant())
            with meter.measure(self.purpose, key, examples=len(batch.y)):
                losses, logits = self.forward_backward(batch)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.state.step += 1
        if self.hooks["after_step"]:
            with meter.measure(self.purpose, (self.tag, "after_step")):
                self.method.after_step(self.model, dataclasses.replace(step, step=self.state.step))
        if self.hooks["observe"]:
            index, losses_seen, y = batch.index, losses.detach(), batch.y
            logits = logits.detach() if logits is not None else None
            if self.dist is not None:  # every rank's method sees the whole global batch, in rank order
                # one all-gather; a shard of a batch of known size needs no gather of the ranks' row counts
                sizes = self.dist.shard_sizes(batch.total) if batch.total is not None else None
                index, losses_seen, y, logits = self.dist.gather_rows_packed([index, losses_seen, y, logits], sizes)
            info = StepInfo(epoch=step.epoch, step=self.state.step, index=index, loss=losses_seen,
                            correct=logits.argmax(1) == y if logits is not None else None, logits=logits)
            with meter.measure("selection", (self.tag, "observe", tuple(index.shape))):
                self.method.observe(info)
        return losses.detach().mean()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    # leave=True: each epoch's finished bar stays on screen with its last loss (erasing it hid the history)
    return tqdm(total=total, desc=desc, leave=True, file=sys.stderr, dynamic_ncols=True)
