"""GREATS (Wang et al., NeurIPS 2024, "GREATS: Online Selection of High-Quality Data for LLM Training
in Every Iteration"): keep the candidates whose update most lowers a validation loss, greedily.

Algorithm, every step, from a candidate batch of B = k x `candidate_factor` examples:
  1. g_val = the gradient of the mean loss of `val_batch` examples drawn from a fixed set of
     `val_size` held-out examples (drawn once from ctx.data.holdout);
  2. score_i = eta * g_i . g_val, eta = the step's learning rate (first-order Taylor gain of the
     validation loss from a step on example i);
  3. k times: pick the highest-scoring remaining candidate p, then score_i -= eta^2 * g_i . g_p for
     every remaining i (the second-order interaction with what is already picked, Hessian taken as
     the identity). With `interaction` off, step 3 is a plain top-k of step 2.
The sum of the gains of the picks is f(S) = eta sum_{i in S} g_i . g_val - eta^2 sum_{i<j in S} g_i . g_j,
and each pick is the candidate with the largest marginal gain f(S + i) - f(S) (tests/test_online.py
checks it against exhaustive search). Products come from benchmarks/kit/ghost.py: one forward/backward
over the B candidates and the validation examples together, per-layer ghost or materialised products
(exact, the default), or a fast form: `products = "last"`, `sketch = d` (see Decisions).

Use: python -m benchmarks run --protocol fashion-mnist --method greats --set holdout=0.1

Decisions, and the pitfalls of the reference code they avoid:
- Defaults follow the official code (Jiachen-T-Wang/GREATS): candidate_factor = 2 (its `fracinv`),
  val_size = 5 validation examples (`n_val`), val_batch = 2 drawn per step (`val_batchsize`), the
  scores in its convention (eta x TracIn minus eta^2 x interaction, eta the learning rate, the
  examples' update summed: the trainer's step averages over k, so the exact Taylor weights would be
  eta/k and eta^2/k^2; we keep the paper's, as its code does). What that costs at image-model
  scale: relative to the linear term, the paper's weights make the interaction k times stronger
  than a mean-loss step's Taylor expansion does, which matters when eta is not small (k = 256 and
  eta up to 0.1 on fashion-online; the paper's tables are LLM fine-tuning). Measured on the
  Fashion-MNIST model after 300 plain steps (a step-level diagnostic, not a test; the figures are in
  issue 11's closing note), the greedy then keeps examples whose gradients cancel: the kept subset's
  mean gradient is 0.34-0.60 of a random subset's, and the validation-loss decrease that a step on
  it predicts is 0.4-1.05x a random subset's (top-k's: 3.8-8.3x). With the exact weights the picks
  are almost those of `interaction = False`, which can nearly drop a class that the 5 validation
  examples lack (0-1 shirts kept of 256).
- BatchNorm (every model of the suite has it) couples the examples in train mode, so per-example
  gradients do not exist there. The rule: the products are computed with BatchNorm in EVAL mode,
  from its running statistics (as GraNd scores); then the kept k train in a second, ordinary
  train-mode pass, which the meter charges like any training step.
- One pass where possible: a model without BatchNorm trains on the kept subset's gradient formed
  from the candidate pass's own factors (benchmarks.kit.ghost.subset_gradient, handed to the trainer
  through Selection.gradients), so a step costs one forward/backward over B plus the products. The
  candidate pass then runs in train mode: it IS the training forward of the kept examples.
- The validation gradient uses the training loss (the protocol's label smoothing included), on
  un-augmented held-out images; the validation examples are never trained on.
- Every method of the family draws the same B and trains on the same k (benchmarks/kit/online.py); the
  official code's baselines train on half as many examples per step as GREATS.
- The greedy runs on the CPU in float64 (one B x B transfer per step instead of k small device
  launches); ties go to the earlier candidate.
- The validation batch of a step is drawn from (run seed, step number): a resumed run draws the same.
- Fast product forms, never the default (`products = "all"`, `sketch = 0` is the exact whole-model
  GREATS). Why they exist: the official code computes its products only on LoRA layers, which is why
  it runs near the speed of training; whole-model products on a CNN cost about n^2 x (parameters)
  multiply-adds, more than the training step itself (benchmarks.kit.ghost). Two named approximations,
  measured against the exact form by `fidelity` and benchmarks/tools/greats_speed.py:
  * products = "last": the products cover the classifier and the last block only
    (benchmarks.kit.ghost.last_block), in the spirit of the LoRA-only products. With BatchNorm (two
    passes) only those layers' factors are captured, so the candidate backward stops at the last block
    (no input-gradient convolutions below it); one pass still captures every layer (the training
    gradient needs them) and restricts the products. On small-cnn the last block holds most of the
    parameters, so it saves little there; on ResNet-18 it is a few percent of the products.
  * sketch = d: every weight's per-example gradient projected to at most d x d numbers by a seeded
    two-sided Gaussian (Kronecker) Johnson-Lindenstrauss sketch computed from the factors
    (benchmarks.kit.ghost.sketch_gradients: unbiased products, exact on a side no longer than d,
    biases and BatchNorm parameters kept exactly), then one matmul of the sketched gradients. The
    projections are drawn from (run seed, step): the same on every rank and after a resume, fresh
    each step so that their errors do not repeat. `form` does not apply to sketched weights.
  Both can be combined; the meter counts them as run, like the exact form. Measured by greats_speed
  (2 loaded CPU cores, 1 thread, medians of 5 alternated repeats; the Fashion-MNIST model after 100
  plain steps, k = 256 of B = 512; fidelity against the exact form on the same 3 candidate batches):
      form          step time / plain step on B   FLOPs / same   kept-set overlap   Spearman   gain / exact's
      all (exact)   2.78                          3.69           1                  1          1
      last          1.72                          2.75           0.88               0.960      0.977
      sketch = 16   2.02                          1.30           0.86               0.981      0.975
      last + 16     1.02                          0.88           0.83               0.882      0.940
  ResNet-18 (CIFAR stem, 32x32, at init, k = 128 of B = 256, 2 repeats, 1 candidate batch):
      all (exact)   2.67                          2.61           1                  1          1
      last          1.02                          1.27           0.89               0.924      1.000
      sketch = 16   1.66                          1.22           0.77               0.890      0.991
      last + 16     0.76                          0.86           0.65               0.889      0.983
  (gain: the exact second-order Taylor gain f(K) of the kept set; on Fashion-MNIST a random k scores
  -0.15 of exact's and the top-k of the first-order scores -13.4; on ResNet-18 0.64 and -8.6.) Wall time trails FLOPs on the CPU: the candidate pass
  with its hooks costs about a plain step on B in time (0.65 s against 0.34 s for a step on k) while
  it is 2/3 of one in FLOPs; only `last` shortens it.
- Where a run's charge goes (record fashion-online, GREATS at defaults: 7.39x full's compute, while
  perf's per-step FLOP ratio is 3.69x). One step = selection (the candidate pass over B + 2
  examples: a forward and a backward to each layer's output, no weight gradients, about 2/3 of a
  training step over them; the products; the greedy, no FLOPs, CPU) + training (the kept k in a
  second, train-mode pass, since the model has BatchNorm: exactly a `full` step). perf's ratio divides
  by a plain step over the B = 2k CANDIDATES; the run is compared with `full`, whose steps train on k,
  and under budget = iterations (the online sweeps) GREATS takes full's number of steps. So the run's
  ratio is the per-step FLOPs over a plain step on k = 2 x 3.69 = 7.39: the same figure, two
  denominators, no extra pass (greats_speed reports both, `flops_over_plain` and `run_over_full`).
  Under budget = epochs a GREATS epoch takes N/B steps and the run's ratio would equal the per-step one.
- Tuning: val_size in {5, 10, 20} (how many held-out examples define "validation": the official
  code's 5 is a handful, and more examples make the gradient it aims at less noisy; the cost per step
  depends on val_batch, not val_size). candidate_factor, the compared axis, is not tuned.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from benchmarks.api import Batch, Param, Selection, Step, register
from benchmarks.errors import BenchError
from benchmarks.kit.ghost import (
    FORMS,
    capture,
    gram_with_validation,
    has_batchnorm,
    last_block,
    restrict,
    sketched_with_validation,
    subset_gradient,
)
from benchmarks.kit.online import CANDIDATE_FACTOR, OnlineSelection, scoring_mode
from benchmarks.kit.pergrad import hooked_layers


def greedy_pick(values: torch.Tensor, interactions: torch.Tensor | None, k: int, eta: float,
                interaction: bool = True) -> torch.Tensor:
    """GREATS's greedy selection: positions of k candidates, in the order picked.

    values[i] = g_i . g_val, interactions[i, j] = g_i . g_j (unused, may be None, without `interaction`).
    A pure function of its inputs.
    """
    gains = eta * values.detach().double().cpu().numpy()
    pairs = interactions.detach().double().cpu().numpy() if interaction else None
    available = np.ones(len(gains), dtype=bool)
    picks = []
    for _ in range(k):
        pick = int(np.argmax(np.where(available, gains, -np.inf)))  # the first of equal maxima
        picks.append(pick)
        available[pick] = False
        if interaction:
            gains -= eta * eta * pairs[:, pick]
    return torch.tensor(picks, dtype=torch.int64)


def set_value(values: torch.Tensor, interactions: torch.Tensor, subset, eta: float,
              interaction: bool = True) -> float:
    """f(S) = eta sum_S g_i . g_val - eta^2 sum_{i<j in S} g_i . g_j: the sum of the greedy's gains."""
    s = torch.as_tensor(list(subset), dtype=torch.int64)
    value = eta * values.double()[s].sum()
    if interaction:
        block = interactions.double()[s][:, s]
        value -= eta * eta * (block.sum() - block.diagonal().sum()) / 2
    return float(value)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (ranks by position; ties, rare for real-valued
    scores, ranked in order)."""
    ranks = [torch.argsort(torch.argsort(v.detach().double().cpu())).double() for v in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra @ rb) / (ra.norm() * rb.norm()).clamp_min(1e-300))


@register("greats")
class Greats(OnlineSelection):
    """Greedy k of B by a 2nd-order validation-loss gain; products with BatchNorm in eval mode, then a train pass.

    BatchNorm rule: per-example gradients are taken with BatchNorm in eval mode (running statistics);
    the kept examples then train in an ordinary train-mode pass (one pass only without BatchNorm).
    """

    traits = OnlineSelection.traits.replace(needs_holdout=True)
    params = {
        "candidate_factor": CANDIDATE_FACTOR,
        "val_size": Param(5, "held-out examples forming the fixed validation set", low=1, space=(5, 10, 20)),
        "val_batch": Param(2, "validation examples drawn from that set each step", low=1),
        "interaction": Param(True, "subtract eta^2 g_i . g_pick after each pick (False: top-k of eta g_i . g_val, "
                                   "and only the B x val_batch products are computed)"),
        "form": Param("auto", "per-layer product form: auto = the cheaper in FLOPs, or force one",
                      choices=FORMS),
        "one_pass": Param(True, "train on the subset gradient formed from the candidate pass when the model "
                                "has no BatchNorm"),
        "products": Param("all", "which parameters the products cover: all (exact GREATS) or last = the "
                                 "classifier and the last block (a fast form, see the docstring)",
                          choices=("all", "last")),
        "sketch": Param(0, "0: exact products; d > 0: products of per-example gradients sketched to at most "
                           "d x d numbers per weight (a fast form, see the docstring)", low=0),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self.validation: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stats = {"one_pass_steps": 0, "two_pass_steps": 0, "ghost_weights": 0, "materialised_weights": 0,
                      "sketched_weights": 0}

    @classmethod
    def check_params(cls, params: dict) -> None:
        if params["val_batch"] > params["val_size"]:
            raise BenchError(f"method 'greats': val_batch={params['val_batch']} exceeds val_size="
                             f"{params['val_size']} (each step draws val_batch of the val_size examples)")

    def prepare(self, ctx) -> None:
        if hooked_layers(ctx.new_model("ghost-probe")) is None:  # fail before training, not at its first step
            raise BenchError(f"method 'greats': model '{ctx.protocol.model}' has trainable layers other than "
                             "nn.Linear, nn.Conv2d and BatchNorm, which the ghost products do not cover")

    def setup(self, ctx) -> None:
        """The fixed validation set, drawn from (run seed) alone: every start (a resume, every rank) draws
        the same, so it is not checkpointed. Before training, so a too small held-out split fails there."""
        super().setup(ctx)
        holdout, size = ctx.data.holdout, self.hparams["val_size"]
        if holdout is None or len(holdout) < size:
            raise BenchError(f"method 'greats' needs at least val_size={size} held-out examples and the "
                             f"protocol holds {0 if holdout is None else len(holdout)}; raise --set holdout=...")
        chosen = torch.randperm(len(holdout), generator=ctx.generator("greats-validation"))[:size]
        batch = next(iter(holdout.batches(chosen, size)))  # un-augmented
        self.validation = (batch.x, batch.y)

    def validation_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.validation
        drawn = torch.randperm(len(y), generator=self.ctx.generator("greats-validation-batch", step))
        drawn = drawn[:self.hparams["val_batch"]].to(y.device)
        return x[drawn], y[drawn]

    def select(self, batch: Batch, model: torch.nn.Module, step: Step) -> Selection | None:
        n, k = len(batch.y), self.kept(batch)
        if k >= n:
            return None
        one_pass = self.hparams["one_pass"] and not has_batchnorm(model)
        # One pass trains on every layer's factors; two passes capture only the layers the products use.
        captured = self.candidate_pass(batch, model, step, one_pass,
                                       None if one_pass or self.hparams["products"] == "all" else last_block(model))
        values, interactions, used = self.products(captured, n, model, step.step)
        keep = self.pick(values, interactions, k, step.lr)
        for form, key in (("ghost", "ghost_weights"), ("materialise", "materialised_weights"),
                          ("sketched", "sketched_weights")):
            self.stats[key] = used.get(form, 0)
        self.stats["one_pass_steps" if one_pass else "two_pass_steps"] += 1
        if not one_pass:
            return Selection(keep=keep)
        keep_dev = keep.to(batch.y.device)
        weights = batch.weight[keep_dev] if batch.weight is not None else None
        return Selection(keep=keep, gradients=subset_gradient(model, captured, keep_dev, weights),
                         losses=captured.losses[keep_dev], logits=captured.logits[keep_dev])

    def pick(self, values: torch.Tensor, interactions: torch.Tensor | None, k: int, lr: float) -> torch.Tensor:
        """The greedy's k positions from this step's products (`greedy_pick` with this instance's `interaction`)."""
        return greedy_pick(values, interactions, k, lr, self.hparams["interaction"])

    def candidate_pass(self, batch: Batch, model: torch.nn.Module, step: Step, one_pass: bool,
                       layers: list | None = None):
        """One forward/backward over the B candidates and this step's validation examples, keeping `layers`'
        factors (all by default). Two passes: BatchNorm from running statistics (eval mode), see the
        module docstring; one pass: the model's training mode, this pass being the training forward."""
        val_x, val_y = self.validation_batch(step.step)
        with (nullcontext() if one_pass else scoring_mode(model)), step.autocast():
            return capture(model, torch.cat([batch.x, val_x.to(batch.x.dtype)]), torch.cat([batch.y, val_y]),
                           self.ctx.protocol.label_smoothing, layers)

    def products(self, captured, n: int, model: torch.nn.Module, step_number: int, exact: bool = False):
        """(g_i . g_val [n], g_i . g_j [n, n] or None, weights per form) of the n candidates of `captured`, in
        this instance's form (`products`, `sketch`), or the exact whole-model form with `exact`."""
        interaction = self.hparams["interaction"]
        if exact:
            return gram_with_validation(captured, n, self.hparams["form"], interaction)
        if self.hparams["products"] == "last":
            captured = restrict(captured, last_block(model))
        if not self.hparams["sketch"]:
            return gram_with_validation(captured, n, self.hparams["form"], interaction)
        generator = self.ctx.generator("greats-sketch", step_number)  # the same sketch on every rank and resume
        return sketched_with_validation(captured, n, self.hparams["sketch"], generator, interaction)

    def fidelity(self, batch: Batch, model: torch.nn.Module, step: Step, reference_seed: int = 0) -> dict:
        """How this instance's product form (`products`, `sketch`) chooses against the exact whole-model form, on
        the SAME candidates and validation examples (one capture of every layer, the module's BatchNorm rule):

        - overlap: |K_fast & K_exact| / k, the kept sets' shared share;
        - spearman: rank correlation of the first-order scores g_i . g_val between the forms;
        - gain_exact, gain_fast: the second-order Taylor estimate the greedy maximises, f(K) (the predicted
          decrease of the validation loss, in the module's convention), evaluated with the EXACT products
          for both kept sets (the greedy is not optimal: the fast set may score a little higher);
          gain_random: the same for k candidates drawn at random (from
          `reference_seed`), and gain_top_k: for the top-k of the exact first-order scores, for scale.
        Also kept_exact, kept_fast: the positions each form keeps. The model is left as it was (no step)."""
        n, k = len(batch.y), self.kept(batch)
        one_pass = self.hparams["one_pass"] and not has_batchnorm(model)
        captured = self.candidate_pass(batch, model, step, one_pass)
        values, interactions, _ = self.products(captured, n, model, step.step, exact=True)
        if interactions is None:  # the gains are measured with the exact second-order term regardless
            _, interactions, _ = gram_with_validation(captured, n, self.hparams["form"], True)
        fast_values, fast_interactions, _ = self.products(captured, n, model, step.step)
        kept = {"exact": self.pick(values, interactions, k, step.lr),
                "fast": self.pick(fast_values, fast_interactions, k, step.lr)}
        random = torch.randperm(n, generator=torch.Generator().manual_seed(reference_seed))[:k]
        top = torch.argsort(values.detach().double().cpu(), descending=True, stable=True)[:k]
        gain = {name: set_value(values, interactions, subset.tolist(), step.lr)
                for name, subset in (*kept.items(), ("random", random), ("top_k", top))}
        return {"overlap": len(set(kept["fast"].tolist()) & set(kept["exact"].tolist())) / k,
                "spearman": spearman(fast_values, values),
                **{f"gain_{name}": value for name, value in gain.items()}, "k": k, "candidates": n,
                "kept_exact": kept["exact"].tolist(), "kept_fast": kept["fast"].tolist()}

    def summary(self) -> dict:
        return dict(self.stats)

    def state_dict(self) -> dict:
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.stats = dict(state["stats"])
