"""JTT, Just Train Twice (Liu et al., ICML 2021): upsample what an early-stopped ERM model gets wrong.

Algorithm:
  1. identification model: ERM for T epochs (`stage1_epochs`) through the harness's trainer
     (benchmarks.kit.proxies.train_proxy), so it is metered and charged as selection, cached, and
     resumable after a preemption (a partial checkpoint after every epoch, or mid-epoch on Slurm's
     warning signal; `prepare` restarts and picks it up);
  2. error set E = the training examples it misclassifies at the end of epoch T, predicted in eval
     mode on un-augmented inputs (one metered forward pass over the training set);
  3. final model: a FRESH model (the run's main model, ctx.new_model("main"), never the stage-1 one)
     trained on the training set in which each example of E appears 1 + lambda_up times (the
     official code appends lambda_up extra copies), every epoch.
Use: `python -m benchmarks run --protocol waterbirds --method jtt` (the paper's T = 60, lambda_up = 100
on Waterbirds), `--protocol spurious-fashion --method jtt --param lambda_up=20`.

Decisions and pitfalls:
- Training group labels are never read: the training split hides them from this method (reading
  them raises; benchmarks/data/splits.py), and tests/test_groups.py checks a whole run. The error
  set's group make-up in the record is counted by the harness after training (`example_sets`).
  Group labels are used only on validation, by the protocol's checkpoint selection (as the paper).
- The error set is where the prediction is NOT the label (`!=`): a public reimplementation had the
  comparison flipped and upsampled the correctly classified examples. The test pins it.
- stage1_epochs = -1 means 20% of the protocol's epochs: the paper's Waterbirds point (60 of 300).
  Stage 1 follows the protocol's schedule and stops after T epochs (a snapshot of an ERM run, as
  the official code takes epoch T of a 300-epoch ERM run); with a constant schedule (Waterbirds)
  that is exactly T epochs of ERM. The stage-1 model is the shared proxy of benchmarks/proxies.py
  (ctx.new_model("score", 0)), so its cached run serves every method that needs the same proxy.
- With the ERM learning rate on Waterbirds, stage 1 fits the training set and E comes out empty
  (anniesch/jtt issue 6): the protocol's lr 1e-5 and weight decay 1.0 are JTT's, for both stages;
  the ERM baseline (`full`) runs with --set lr=0.001 --set weight_decay=0.0001. An empty E is said
  in the log and the record (error_set_size 0): stage 2 is then plain ERM.
- Cost: stage 1 (T epochs) and the prediction pass are selection compute; stage 2's epochs are
  N + lambda_up * |E| examples long under budget = "epochs", so JTT usually costs MORE than ERM
  (compute fraction > 1). Under budget = "iterations" an epoch stays N examples drawn from the
  upsampled list.
"""

from __future__ import annotations

import torch

from benchmarks.api import EpochPlan, Method, Param, Protocol, RunContext, Traits, register
from benchmarks.errors import BenchError
from benchmarks.kit.proxies import per_example_pass, train_proxy

STAGE1_SHARE = 0.2  # stage1_epochs = -1: the paper's Waterbirds point, epoch 60 of 300


def error_set(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the examples whose prediction differs from their label (the misclassified)."""
    return (predictions != labels).nonzero().flatten()


def upsampled_indices(n: int, errors: torch.Tensor, lambda_up: int) -> torch.Tensor:
    """Every index 0..n-1 once, plus lambda_up extra copies of each error index (1 + lambda_up in all)."""
    return torch.cat([torch.arange(n), errors.repeat(lambda_up)])


def resolve_stage1_epochs(value: int, protocol: Protocol) -> int:
    """-1 -> 20% of the protocol's epochs (at least 1); an explicit T must lie within the protocol's."""
    epochs = max(1, round(STAGE1_SHARE * protocol.epochs)) if value == -1 else value
    if not 1 <= epochs <= protocol.epochs:
        raise BenchError(f"jtt: stage1_epochs={epochs} must be within the protocol's {protocol.epochs} epochs "
                         "(stage 1 follows the protocol's schedule)")
    return epochs


def predict_train(model: torch.nn.Module, ctx: RunContext, tag: str) -> torch.Tensor:
    """Predicted class of every training example [N] (CPU), eval mode, un-augmented; metered as selection."""
    return per_example_pass(model, ctx, tag, lambda m, batch: m(batch.x).argmax(1)).cpu()


@register("jtt")
class JTT(Method):
    """JTT: ERM for T epochs, then a fresh model with its misclassified training examples upsampled."""

    traits = Traits(for_groups=True, headline_params=("stage1_epochs", "lambda_up"))
    params = {
        "stage1_epochs": Param(-1, "T, epochs of the stage-1 ERM model; -1 = 20% of the protocol's "
                                   "(the paper's 60 of 300 on Waterbirds)", low=-1),
        "lambda_up": Param(100, "extra copies of each misclassified example (it appears 1 + lambda_up times); "
                                "the paper's Waterbirds value", low=0),
    }

    @classmethod
    def check_params(cls, params: dict) -> None:
        if params["stage1_epochs"] == 0:
            raise BenchError("method 'jtt': stage1_epochs must be -1 (20% of the protocol's epochs) or >= 1, got 0")

    def __init__(self, **params):
        super().__init__(**params)
        self.errors: torch.Tensor | None = None  # the error set, training indices
        self.stats: dict = {}

    def prepare(self, ctx: RunContext) -> None:
        epochs = resolve_stage1_epochs(self.hparams["stage1_epochs"], ctx.protocol)
        before = ctx.meter.flops["selection"]
        model, cached = train_proxy(ctx, 0, epochs)  # the default proxy tag: identical whoever trained it first
        predictions = predict_train(model, ctx, "jtt-error-pass")
        self.errors = error_set(predictions, ctx.data.train.labels)
        n, size = ctx.num_train, len(self.errors)
        if size == 0:
            ctx.log("jtt: the stage-1 model classifies every training example correctly, so the error set is "
                    "empty and stage 2 is plain ERM (a higher learning rate or a later T fits too well; see "
                    "methods/jtt.py)")
        self.stats = {"stage1_epochs": epochs, "stage1_cached": cached, "error_set_size": size,
                      "error_set_share": size / n, "stage2_epoch_examples": n + self.hparams["lambda_up"] * size,
                      "selection_flops_stage1": ctx.meter.flops["selection"] - before}

    def plan_epoch(self, epoch: int) -> EpochPlan:
        return EpochPlan(upsampled_indices(self.ctx.num_train, self.errors, self.hparams["lambda_up"]))

    def summary(self) -> dict:
        return dict(self.stats)

    def example_sets(self) -> dict[str, torch.Tensor]:
        return {"error_set": self.errors}

    def state_dict(self) -> dict:
        return {"errors": self.errors.clone() if self.errors is not None else None, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.errors = state["errors"].clone() if state["errors"] is not None else None
        self.stats = dict(state["stats"])
