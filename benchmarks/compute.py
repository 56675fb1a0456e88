"""The compute meter: every forward and backward pass a run makes, in FLOPs, by purpose.

Forward FLOPs per example are measured once per model with torch.utils.flop_counter; a backward
pass counts twice its forward. Purposes: "train" (the steps that update the model being
evaluated), "selection" (everything spent to choose data: proxy training, scoring passes,
candidate passes) and "eval" (the protocol's own evaluation passes, equal for every method and
kept out of the compared compute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

PURPOSES = ("train", "selection", "eval")
BACKWARD_OVER_FORWARD = 2


def forward_flops_per_example(model: torch.nn.Module, input_shape: tuple, device: torch.device | str = "cpu") -> int:
    """FLOPs of one example's forward pass (measured on a batch of 2, in eval mode, no grad)."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((2, *input_shape), device=device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return max(1, counter.get_total_flops() // 2)
    finally:
        model.train(was_training)


@dataclass
class ComputeMeter:
    forward_flops: int  # per example, of the model being trained
    flops: dict = field(default_factory=lambda: dict.fromkeys(PURPOSES, 0))
    examples: dict = field(default_factory=lambda: dict.fromkeys(PURPOSES, 0))

    def charge(self, purpose: str, n_examples: int, *, backward: bool, forward_flops: int | None = None) -> None:
        """Charge n_examples forward passes (and their backward passes if `backward`).

        `forward_flops` overrides the per-example cost for another model (a proxy, a prior encoder).
        """
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose '{purpose}'")
        per_example = forward_flops if forward_flops is not None else self.forward_flops
        passes = 1 + (BACKWARD_OVER_FORWARD if backward else 0)
        self.flops[purpose] += int(n_examples) * per_example * passes
        self.examples[purpose] += int(n_examples)

    def charge_flops(self, purpose: str, flops: int) -> None:
        """Charge a cost measured elsewhere (e.g. cached scores that a proxy run computed)."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose '{purpose}'")
        self.flops[purpose] += int(flops)

    @property
    def total(self) -> int:
        """The compared compute: train + selection (evaluation is the same for every method)."""
        return self.flops["train"] + self.flops["selection"]

    def state_dict(self) -> dict:
        return {"forward_flops": self.forward_flops, "flops": dict(self.flops), "examples": dict(self.examples)}

    @classmethod
    def from_state(cls, state: dict) -> ComputeMeter:
        return cls(state["forward_flops"], dict(state["flops"]), dict(state["examples"]))


def full_data_flops(forward_flops: int, n_train: int, epochs: int) -> int:
    """What the full-data run of the protocol costs: every example, every epoch, forward + backward.

    Computed, not run. Under either budget the full-data run visits n_train examples per epoch.
    """
    return forward_flops * (1 + BACKWARD_OVER_FORWARD) * n_train * epochs


def compute_summary(meter: ComputeMeter, full_flops: int) -> dict:
    total = meter.total
    fraction = total / full_flops if full_flops else float("nan")
    return {
        "train_flops": meter.flops["train"],
        "selection_flops": meter.flops["selection"],
        "total_flops": total,
        "eval_flops": meter.flops["eval"],
        "full_flops": full_flops,
        "fraction": fraction,
        "saved": 1 - fraction,
        "selection_share": meter.flops["selection"] / total if total else 0.0,
        "train_examples": meter.examples["train"],
        "forward_flops_per_example": meter.forward_flops,
    }
