"""JTT, Just Train Twice (Liu et al., ICML 2021): upsample what an early-stopped ERM model gets wrong.

Algorithm:
  1. identification model: ERM through the harness's trainer (benchmarks.kit.proxies.train_proxy),
     so it is metered and charged as selection, cached, and resumable after a preemption (a partial
     checkpoint after every epoch, or mid-epoch on Slurm's warning signal; `prepare` restarts and
     picks it up);
  2. error set E = the training examples it misclassifies at epoch T (`stage1_epochs`), read by the
     rule `error_set` names:
     - "train-log" (default, the official code's rule): the predictions the model makes on each
       example WHILE it trains through epoch T, i.e. in train mode, on the augmented batch, before
       that batch's update (the trainer's StepInfo.correct, recorded by `EpochErrorLog`). The
       official anniesch/jtt train.py logs them in every training epoch (output_train_epoch_<e>.csv,
       epochs counted from 0) and process_training.py takes the file of --final_epoch T: the epoch
       that starts after T full epochs of training. So stage 1 trains T + 1 epochs and reads the
       last one (0-based epoch T; the paper's Waterbirds T = 60 reads the 61st epoch);
     - "eval-pass": one forward pass over the training set after T epochs, in eval mode, on
       un-augmented inputs (the project's earlier rule; stage 1 trains T epochs);
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
- stage1_epochs = -1 means 20% of the protocol's epochs: the paper's Waterbirds point (60 of 300);
  under "train-log" at most the protocol's last epoch (T <= epochs - 1, since epoch T is trained).
  Stage 1 follows the protocol's schedule and stops after epoch T (a snapshot of an ERM run, as the
  official code takes epoch T of a 300-epoch ERM run); with a constant schedule (Waterbirds) that is
  exactly ERM. The stage-1 model is the shared proxy of benchmarks/kit/proxies.py
  (ctx.new_model("score", 0)), so its cached run serves every method that needs the same proxy;
  the train-log error set is cached as well (per protocol, T and seed), charged what it cost.
- "train-log" reads each example once: stage 1 visits every training example once per epoch. An
  example's prediction comes from the model of the step that trained it, so E mixes the models of
  one epoch, as the official log does.
- With the ERM learning rate on Waterbirds, stage 1 fits the training set and E comes out empty
  (anniesch/jtt issue 6): the protocol's lr 1e-5 and weight decay 1.0 are JTT's, for both stages;
  the ERM baseline (`full`) runs with --set lr=0.001 --set weight_decay=0.0001. An empty E is said
  in the log and the record (error_set_size 0): stage 2 is then plain ERM.
- Cost: stage 1 (T + 1 epochs under "train-log"; T epochs and the prediction pass under
  "eval-pass") is selection compute; stage 2's epochs are
  N + lambda_up * |E| examples long under budget = "epochs", so JTT usually costs MORE than ERM
  (compute fraction > 1). Under budget = "iterations" an epoch stays N examples drawn from the
  upsampled list.
- Tuning (a sweep's [tuning] table; the paper tunes T, lambda_up, the learning rate and the weight
  decay per dataset on validation worst-group accuracy): T in {1, 2, 3} (stage1_epochs is the
  paper's T: epochs of ERM before E is read, under either rule), lambda_up in {20, 50, 100}, and
  the protocol's learning rate and weight decay (log-uniform, shared by both stages: the weight
  decay is the identification model's regularisation, which decides how much of the minority it
  misclassifies), from the same ranges as ERM's and Group DRO's. T in {1, 2, 3} is a CPU-scale
  space (spurious-fashion's 10 epochs; a protocol needs at least 4 epochs for T = 3 under
  train-log): a paper-scale sweep fixes stage1_epochs with its block's grid (Waterbirds' T = 60).
"""

from __future__ import annotations

import torch

from benchmarks.api import EpochPlan, Method, Param, Protocol, RunContext, Space, StepInfo, Traits, register
from benchmarks.errors import BenchError
from benchmarks.kit.proxies import cache_file, cache_key, cached_artefact, per_example_pass, train_proxy

STAGE1_SHARE = 0.2  # stage1_epochs = -1: the paper's Waterbirds point, epoch 60 of 300
ERROR_SET_RULES = ("train-log", "eval-pass")


def error_set(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the examples whose prediction differs from their label (the misclassified)."""
    return (predictions != labels).nonzero().flatten()


def upsampled_indices(n: int, errors: torch.Tensor, lambda_up: int) -> torch.Tensor:
    """Every index 0..n-1 once, plus lambda_up extra copies of each error index (1 + lambda_up in all)."""
    return torch.cat([torch.arange(n), errors.repeat(lambda_up)])


def resolve_stage1_epochs(value: int, protocol: Protocol, rule: str = "eval-pass") -> int:
    """-1 -> 20% of the protocol's epochs (at least 1); an explicit T must lie within the protocol's.

    Under "train-log" epoch T (0-based) is trained and read, so T <= epochs - 1 (-1 is capped there).
    """
    last = protocol.epochs - 1 if rule == "train-log" else protocol.epochs
    epochs = min(max(1, round(STAGE1_SHARE * protocol.epochs)), last) if value == -1 else value
    first = 0 if rule == "train-log" else 1
    if not first <= epochs <= last:
        raise BenchError(f"jtt: stage1_epochs={epochs} must lie in [{first}, {last}] for the protocol's "
                         f"{protocol.epochs} epochs (stage 1 follows the protocol's schedule"
                         + ("; error_set='train-log' reads 0-based epoch T, so it trains T + 1 epochs)"
                            if rule == "train-log" else ")"))
    return epochs


class EpochErrorLog(Method):
    """Records, for one 0-based epoch of the stage-1 run it watches, which examples were misclassified
    when trained on (StepInfo.correct: train mode, augmented, before the update)."""

    name = "jtt-error-log"  # names the stage-1 run's partial checkpoint

    def __init__(self, n: int, epoch: int):
        super().__init__()
        self.epoch = epoch
        self.wrong = torch.zeros(n, dtype=torch.bool)
        self.seen = torch.zeros(n, dtype=torch.bool)

    def observe(self, info: StepInfo) -> None:
        if info.epoch != self.epoch:
            return
        if info.correct is None:
            raise ValueError("jtt: the stage-1 steps carry no predictions (an objective without logits)")
        index = info.index
        if self.wrong.device != index.device:  # on the training device: no host sync per step
            self.wrong, self.seen = self.wrong.to(index.device), self.seen.to(index.device)
        self.wrong[index] = ~info.correct.to(index.device)
        self.seen[index] = True

    def errors(self) -> torch.Tensor:
        """Sorted indices of the examples misclassified in the logged epoch (CPU)."""
        seen = self.seen.cpu()
        if not bool(seen.all()):
            raise RuntimeError(f"jtt: {int((~seen).sum())} training examples were not visited in epoch "
                               f"{self.epoch + 1} of stage 1")
        return self.wrong.cpu().nonzero().flatten()

    def state_dict(self) -> dict:
        """The epoch logged so far: a stage-1 run stopped mid-epoch (preemption in `prepare`) resumes with it."""
        return {"wrong": self.wrong.cpu().clone(), "seen": self.seen.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.wrong, self.seen = state["wrong"].clone(), state["seen"].clone()


def train_log_errors(ctx: RunContext, epoch: int) -> tuple[torch.Tensor, bool]:
    """The official rule: (error set read off 0-based epoch `epoch` of stage 1 as it trains, came from the cache)."""
    key = cache_key(ctx, kind="jtt-train-log", epoch=epoch, run=0)
    path = cache_file(ctx, "scores", f"jtt-train-log-epoch{epoch}-run0-seed{ctx.seed}")

    def read_the_log() -> dict:
        log = EpochErrorLog(ctx.num_train, epoch)
        train_proxy(ctx, 0, epoch + 1, method=log)  # the default proxy: the model it leaves is cached for others
        return {"errors": log.errors()}

    payload, hit = cached_artefact(ctx, path, key, read_the_log)
    return payload["errors"], hit


def predict_train(model: torch.nn.Module, ctx: RunContext, tag: str) -> torch.Tensor:
    """Predicted class of every training example [N] (CPU), eval mode, un-augmented; metered as selection."""
    return per_example_pass(model, ctx, tag, lambda m, batch: m(batch.x).argmax(1)).cpu()


@register("jtt")
class JTT(Method):
    """JTT: ERM for T epochs, then a fresh model with its misclassified training examples upsampled."""

    traits = Traits(for_groups=True, headline_params=("stage1_epochs", "lambda_up"))
    # Shared by both stages (the module docstring's "Tuning"); the ranges are ERM's and Group DRO's.
    protocol_space = {"lr": Space.range(1e-3, 1e-1, log=True), "weight_decay": Space.range(1e-4, 1e-1, log=True)}
    params = {
        "stage1_epochs": Param(-1, "T, epochs of the stage-1 ERM model; -1 = 20% of the protocol's "
                                   "(the paper's 60 of 300 on Waterbirds)", low=-1, space=(1, 2, 3)),
        "lambda_up": Param(100, "extra copies of each misclassified example (it appears 1 + lambda_up times); "
                                "the paper's Waterbirds value", low=0, space=(20, 50, 100)),
        "error_set": Param("train-log", "how E is read: train-log (the predictions made while training through "
                                        "epoch T, as the official code) or eval-pass (one eval-mode pass after "
                                        "T epochs)", choices=ERROR_SET_RULES),
    }

    @classmethod
    def check_params(cls, params: dict) -> None:
        if params["stage1_epochs"] == 0 and params["error_set"] == "eval-pass":
            raise BenchError("method 'jtt': stage1_epochs must be -1 (20% of the protocol's epochs) or >= 1 with "
                             "error_set='eval-pass', got 0")

    def __init__(self, **params):
        super().__init__(**params)
        self.errors: torch.Tensor | None = None  # the error set, training indices
        self.stats: dict = {}

    def prepare(self, ctx: RunContext) -> None:
        rule = self.hparams["error_set"]
        epochs = resolve_stage1_epochs(self.hparams["stage1_epochs"], ctx.protocol, rule)
        before = ctx.meter.flops["selection"]
        if rule == "train-log":
            self.errors, cached = train_log_errors(ctx, epochs)
        else:
            model, cached = train_proxy(ctx, 0, epochs)  # the default proxy tag: identical whoever trained it first
            predictions = predict_train(model, ctx, "jtt-error-pass")
            self.errors = error_set(predictions, ctx.data.train.labels)
        n, size = ctx.num_train, len(self.errors)
        if size == 0:
            ctx.log("jtt: the stage-1 model classifies every training example correctly, so the error set is "
                    "empty and stage 2 is plain ERM (a higher learning rate or a later T fits too well; see "
                    "methods/jtt.py)")
        self.stats = {"stage1_epochs": epochs, "stage1_trained_epochs": epochs + (rule == "train-log"),
                      "error_set_rule": rule, "stage1_cached": cached, "error_set_size": size,
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
