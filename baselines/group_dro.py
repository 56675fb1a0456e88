"""Group DRO (Sagawa, Koh, Hashimoto, Liang, ICLR 2020): minimise the worst group's expected loss.

An ORACLE reference: it reads the TRAINING group labels (`Traits(reads_train_groups=True)`), which JTT
and ERM never see; `list` and the tables mark it so. It needs data with groups (Waterbirds,
spurious-fashion).

Algorithm (the paper's Algorithm 1, online, as the official code's LossComputer):
each step, with the batch's per-group mean losses L_g (0 for a group absent from the batch),
  q_g <- q_g * exp(eta * (L_g + C / sqrt(n_g)))    then q <- q / sum(q)
and the model's loss is sum_g q_g * L_g with the UPDATED q (gradients flow through L_g only).
q starts uniform; n_g = training examples of group g; C = `adjustment` (0: plain Group DRO; the
paper's generalisation adjustment otherwise; the term only moves q, it adds a constant to the loss).

Sampling (`sampling`): "group-balanced" (default), as every official command (kohpangwei/group_DRO's
README runs all use --reweight_groups): each epoch draws N examples WITH replacement, example i with
probability proportional to 1 / n_{g_i} (torch.utils.data.WeightedRandomSampler there,
`group_balanced_indices` here), so every group fills about 1/G of each batch and small groups are
seen many times per epoch. "uniform": every training example once per epoch, shuffled (ERM's
sampling; the project's earlier default). The draws come from ctx.generator("group-dro-sampling",
epoch): a resumed run draws the same epochs.

Decisions:
- Through the `objective` hook: it returns per-example losses l_i * B * q_{g_i} / b_{g_i} (b_g = the
  batch's count of group g), whose batch mean the trainer takes, which is exactly sum_g q_g L_g.
  The trainer's one optimiser step and the meter stay as they are.
- The weight update is a pure function (`update_group_weights`), tested against a hand computation.
- Strong L2 and early stopping are what made Group DRO work in the paper: they come from the
  protocol (weight decay; checkpoint selection on validation worst-group accuracy), as for JTT.
- q is part of the checkpoint, so a resumed run continues the same weights (`setup` puts it on the device
  and rebuilds the adjustment from the group counts).
- Tuning (a sweep's [tuning] table): eta log-uniform in [0.001, 0.1] around the paper's 0.01, and
  the protocol's learning rate and weight decay (strong L2 is what the paper found it needs), from
  the same ranges as ERM's and JTT's. `adjustment` and `sampling` stay at the official defaults.
- Data parallel: refused (single_process_only). Each rank's objective sees only its shard, so its q
  would move with its own group losses and the ranks' weights would drift apart; spreading it needs
  the global batch's per-group sums and counts (all-reduced) in the update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.api import Batch, EpochPlan, Method, Param, Space, Traits, register
from benchmarks.errors import BenchError


def group_mean_losses(losses: torch.Tensor, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss per group [G], examples per group [G]) of a batch; 0 for a group the batch lacks."""
    counts = torch.bincount(groups, minlength=num_groups).to(losses.dtype)
    sums = torch.zeros(num_groups, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
    return sums / counts.clamp_min(1), counts


def update_group_weights(q: torch.Tensor, group_losses: torch.Tensor, eta: float,
                         adjustment: torch.Tensor | None = None) -> torch.Tensor:
    """One exponentiated-gradient step: q_g * exp(eta * (L_g + adjustment_g)), renormalised."""
    step = group_losses if adjustment is None else group_losses + adjustment
    q = q * torch.exp(eta * step)
    return q / q.sum()


def group_balanced_indices(groups: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n training indices drawn with replacement, index i with probability proportional to 1 / (size of its group).

    Every group present is drawn with probability 1 / (number of groups present), whatever its size.
    """
    sizes = torch.bincount(groups).double()
    return torch.multinomial(1.0 / sizes[groups], n, replacement=True, generator=generator)


SAMPLINGS = ("group-balanced", "uniform")


@register("group-dro")
class GroupDRO(Method):
    """Group DRO (Sagawa et al. 2020): online exponentiated-gradient weights on the training groups' losses."""

    traits = Traits(reads_train_groups=True, for_groups=True, headline_params=("eta",),
                    single_process_only="its group weights would be updated from each rank's own shard and "
                                        "drift apart")
    protocol_space = {"lr": Space.range(1e-3, 1e-1, log=True), "weight_decay": Space.range(1e-4, 1e-1, log=True)}
    params = {
        "eta": Param(0.01, "step size of the group weights' exponentiated-gradient update (the paper's eta_q)",
                     low=0.0, low_open=True, space=Space.range(1e-3, 1e-1, log=True)),
        "adjustment": Param(0.0, "C of the paper's group adjustment C / sqrt(n_g) added to each group's loss "
                                 "in the weight update; 0 = none", low=0.0),
        "sampling": Param("group-balanced", "how an epoch draws its N examples: group-balanced (with replacement, "
                                            "each group equally often, as every official command) or uniform "
                                            "(each example once, shuffled)", choices=SAMPLINGS),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.q: torch.Tensor | None = None  # the group weights (float64, on the device after setup)
        self._adjustment: torch.Tensor | None = None

    def setup(self, ctx) -> None:
        """q uniform on a fresh start (a resume's from its checkpoint), on the device; the adjustment."""
        super().setup(ctx)
        if not ctx.data.num_groups:
            raise BenchError("group-dro needs data with group labels (waterbirds, spurious-fashion)")
        groups = ctx.data.train.groups  # visible: this method declares reads_train_groups
        counts = torch.bincount(groups, minlength=ctx.data.num_groups).double()
        if self.q is None:
            self.q = torch.full((ctx.data.num_groups,), 1.0 / ctx.data.num_groups, dtype=torch.float64)
        self.q = self.q.to(ctx.device)
        c = self.hparams["adjustment"]
        self._adjustment = (c / counts.clamp_min(1).sqrt()).to(ctx.device) if c > 0 else None

    def plan_epoch(self, epoch: int) -> EpochPlan | None:
        if self.hparams["sampling"] == "uniform":
            return None  # every example once; the trainer shuffles
        groups = self.ctx.data.train.groups  # visible: this method declares reads_train_groups
        if groups is None:
            raise BenchError("group-dro needs data with group labels (waterbirds, spurious-fashion)")
        generator = self.ctx.generator("group-dro-sampling", epoch)
        return EpochPlan(group_balanced_indices(groups.cpu(), len(groups), generator))

    def objective(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.group is None:
            raise BenchError("group-dro: the batch carries no group labels (does the training split have groups?)")
        logits = model(batch.x)
        losses = F.cross_entropy(logits.float(), batch.y, reduction="none",
                                 label_smoothing=self.ctx.protocol.label_smoothing)
        group_losses, counts = group_mean_losses(losses.double(), batch.group, len(self.q))
        self.q = update_group_weights(self.q, group_losses.detach(), self.hparams["eta"], self._adjustment)
        per_example = self.q[batch.group] / counts[batch.group] * len(losses)
        return losses * per_example.to(losses.dtype), logits

    def epoch_info(self, epoch: int) -> dict:
        return {"group_weights": [round(v, 6) for v in self.q.tolist()]} if self.q is not None else {}

    def summary(self) -> dict:
        if self.q is None:
            return {}
        q = self.q.tolist()
        return {"group_weights": q, "group_weights_entropy": -sum(v * math.log(v) for v in q if v > 0)}

    def state_dict(self) -> dict:
        return {"q": self.q.cpu().clone() if self.q is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.q = state["q"].clone() if state["q"] is not None else None  # moved to the device by setup
