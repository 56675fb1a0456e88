"""Static data pruning by per-example scores: EL2N and GraNd (Paul et al., NeurIPS 2021).

A score method trains `score_runs` independent proxy models, scores every training example with
each, averages the scores (keyed by the ORIGINAL dataset index), keeps a static subset chosen from
the averaged scores, and trains the main model on it. Use:
    python -m benchmarks run --protocol datadiet-cifar10 --method el2n --param fraction=0.5
    python -m benchmarks scores --protocol fashion-mnist --score el2n --out el2n.csv   (export)

Scores (each run r: a fresh model ctx.new_model("score", r), trained with the fit tag
"score-proxy-<r>", so runs differ and every score kind shares the same proxy runs):
- el2n: || softmax(f(x)) - onehot(y) ||_2 of the proxy after `score_epoch` epochs, eval mode,
  un-augmented inputs.
- grand: || grad_theta CE(f(x), y) ||_2 over ALL trainable parameters at `score_epoch` (default 0:
  initialisation), batched (benchmarks/kit/pergrad.py), BatchNorm in eval mode so examples are independent.
- grand-lastlayer: the final linear layer's part only, ||p - onehot(y)|| * sqrt(1 + ||h||^2):
  DeepCore's cheap variant, under its own name so it is never mistaken for GraNd.
- forgetting: methods/forgetting.py; aum: methods/aum.py; CCS: methods/ccs.py.

Selection from the averaged scores (hardest, easiest, CCS strata): benchmarks/kit/scoring.py.
Every score method accepts mode="ccs", so CCS over forgetting scores is
`--method forgetting --param mode='ccs'`; the `ccs` method (methods/ccs.py) defaults to AUM.

Proxy training and the cache live in benchmarks/kit/proxies.py (shared with the coresets, JTT and
RHO-Loss), score runs and selection in benchmarks/kit/scoring.py: a proxy follows the protocol's schedule over the protocol's epochs and stops after
`score_epoch` epochs, so "EL2N at epoch 20" is the paper's snapshot of a 200-epoch run at lr 0.1.
score_epoch = -1 (the default of EL2N and the coresets) means the paper's point, 10% of the
protocol's epochs: 20 on the 200-epoch CIFAR protocols, 1 on the 8-epoch Fashion-MNIST one.

Cost. Every run that uses scores is charged their full cost (all proxy training and scoring passes,
measured by the meter as executed: a GraNd pass is its forward, its backward to each layer's output
and the per-layer norm products), as if it had computed them alone: that is the cost of the method.
Scores are cached per (protocol, score kind, score_epoch, proxy run, run seed), trained proxies per
(protocol, epoch, run, seed), so EL2N, GraNd at the same epoch and the coresets share proxies (CCS by EL2N too);
a hit charges the FLOPs the file records and the method's summary says scores_cached: true.
Proxy files are model state dicts (45 MB for a ResNet-18): delete <out>/cache/ to reclaim the space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.api import RunContext, register
from benchmarks.kit.pergrad import last_layer_grad_norms, per_example_grad_norms
from benchmarks.kit.proxies import features_and_logits, per_example_pass, train_batches
from benchmarks.kit.scoring import (
    ScoreKind,
    ScoreSelection,
    after_proxy,
    at_initialisation,
    early_epoch,
    epoch_param,
    register_score_kind,
    score_params,
)

# -- scoring passes over the training set, metered as selection ------------------------------------


def el2n_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    def el2n(model, batch):
        probs = model(batch.x).float().softmax(1)
        return (probs - F.one_hot(batch.y, probs.shape[1]).float()).norm(dim=1)

    return per_example_pass(model, ctx, "el2n-pass", el2n).cpu()


def grand_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    scores = torch.empty(ctx.num_train)
    for batch in train_batches(ctx, ctx.protocol.batch_size):
        with ctx.meter.measure("selection", ("grand-pass", tuple(batch.x.shape)), examples=len(batch.y)):
            norms = per_example_grad_norms(model, batch.x, batch.y)
        scores[batch.index.cpu()] = norms.detach().cpu()
    return scores


def grand_lastlayer_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    def norms(model, batch):
        features, logits = features_and_logits(model, batch.x)
        return last_layer_grad_norms(logits, features, batch.y)

    return per_example_pass(model, ctx, "lastlayer-pass", norms).cpu()


register_score_kind("el2n", ScoreKind(after_proxy(el2n_pass), early_epoch))
register_score_kind("grand", ScoreKind(after_proxy(grand_pass), at_initialisation))
register_score_kind("grand-lastlayer", ScoreKind(after_proxy(grand_lastlayer_pass), at_initialisation))


EL2N_EPOCH = epoch_param(-1, "proxy epochs before scoring; -1 = 10% of the protocol's (the paper: 20 of 200)")
GRAND_EPOCH = epoch_param(0, "proxy epochs before scoring; 0 = at initialisation (the paper)")


@register("el2n")
class EL2N(ScoreSelection):
    """Keep examples by EL2N, ||softmax(f(x)) - y||, of early-trained proxies (Data Diet)."""

    score_kind = "el2n"
    params = score_params(EL2N_EPOCH)


@register("grand")
class GraNd(ScoreSelection):
    """Keep examples by GraNd, the per-example gradient norm over all parameters (Data Diet)."""

    score_kind = "grand"
    params = score_params(GRAND_EPOCH)


@register("grand-lastlayer")
class GraNdLastLayer(ScoreSelection):
    """Keep examples by the last layer's gradient norm ||p - y|| sqrt(1 + ||h||^2) (DeepCore's cheap GraNd)."""

    score_kind = "grand-lastlayer"
    params = score_params(GRAND_EPOCH)
