"""Static data pruning by per-example scores: EL2N and GraNd (Paul et al., NeurIPS 2021), CCS.

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
  initialisation), batched (methods/pergrad.py), BatchNorm in eval mode so examples are independent.
- grand-lastlayer: the final linear layer's part only, ||p - onehot(y)|| * sqrt(1 + ||h||^2):
  DeepCore's cheap variant, under its own name so it is never mistaken for GraNd.
- forgetting: methods/forgetting.py.

Selection from the averaged scores (`select_by_scores`), every mode keeping exactly
k = round(fraction * N) examples (benchmarks.subsets.subset_size; per class: class_quotas):
- hardest (default): the k highest scores, after skipping the round(offset * N) very highest
  (Data Diet's offset: the kept window is ranks [offset*N, offset*N + k) from the hardest).
- easiest: the k lowest scores.
- ccs (Zheng et al., ICLR 2023): drop the round(ccs_beta * N) hardest, split the rest into 50
  equal-width score bins, then visit the non-empty bins from the smallest to the largest, each
  taking min(its size, floor(remaining budget / bins left)) examples uniformly at random. This
  water-filling takes exactly k whenever k <= N - round(ccs_beta * N).
Ties in the ranking are broken by a seeded random permutation, never by index order (forgetting
counts tie massively, and an index order can correlate with the class).
`ccs` is registered as CCS over EL2N scores (mode "ccs" by default); every score method accepts
mode="ccs", so CCS over forgetting scores is `--method forgetting --param mode='ccs'`.

Proxy training and its schedule. A proxy follows the protocol's schedule over the protocol's
epochs and stops after `score_epoch` epochs, so "EL2N at epoch 20" is the paper's snapshot of a
200-epoch run at lr 0.1, not a run whose whole schedule is squeezed into 20 epochs (ctx.fit(epochs=k)
would do the latter for a one-cycle or linear schedule). It runs through the harness's Trainer with
purpose "selection", so the meter charges every proxy step as selection compute.
score_epoch = -1 (the default of EL2N, CCS and the coresets) means the paper's point, 10% of the
protocol's epochs: 20 on the 200-epoch CIFAR protocols, 1 on the 8-epoch Fashion-MNIST one.

Cost and the cache. Every run that uses scores is charged their full cost (all proxy training and
scoring passes), as if it had computed them alone: that is the cost of the method. Because a sweep
over fractions would otherwise repeat identical proxy runs, results are cached under ctx.cache_dir
(shared by the runs of a results folder): scores per (protocol name + hash of the protocol fields
that affect them, score kind, score_epoch, proxy run, run seed), and trained proxies per (protocol,
epoch, run, seed), so EL2N, CCS, GraNd at the same epoch and the coresets share proxies. A cache
file holds the FLOPs its contents cost; a hit charges them with meter.charge_flops and the method's
summary says scores_cached: true. Files are written atomically. Proxy files are model state dicts
(45 MB for a ResNet-18): delete <out>/cache/ to reclaim the space.
Charged: proxy training (forward + backward per visited example), an EL2N or embedding pass
(forward), a GraNd pass (forward + backward per example, as the brief and the paper count it; the
per-layer norm arithmetic on top is not counted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.errors import BenchError
from benchmarks.hooks import Method
from benchmarks.protocol import Protocol
from benchmarks.record import atomic_write_bytes
from benchmarks.registry import Param, register
from benchmarks.subsets import StaticSubset, class_quotas, subset_size
from benchmarks.train import RunContext, Trainer

from .pergrad import last_layer_grad_norms, per_example_grad_norms

CACHE_VERSION = 1
CCS_BINS = 50
# Protocol fields that cannot change a proxy run or its scores; every other field is in the cache key.
_NOT_IN_SCORE_KEY = {"description", "eval_batch_size", "eval_every", "selection_rule", "seeds", "budget"}
MODES = ("hardest", "easiest", "ccs")

# -- proxy runs and the cache --------------------------------------------------------------------


def protocol_fingerprint(protocol: Protocol) -> str:
    fields = {k: v for k, v in protocol.as_dict().items() if k not in _NOT_IN_SCORE_KEY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_score_epoch(value: int, protocol: Protocol, auto: Callable[[int], int]) -> int:
    """-1 -> `auto(protocol.epochs)`; anything else must lie within the protocol's epochs."""
    epoch = auto(protocol.epochs) if value == -1 else value
    if not 0 <= epoch <= protocol.epochs:
        raise BenchError(f"score_epoch={epoch} must be within the protocol's {protocol.epochs} epochs "
                         "(the proxy follows the protocol's schedule)")
    return epoch


def early_epoch(epochs: int) -> int:
    """The Data Diet point: 10% of training (epoch 20 of 200), at least one epoch."""
    return max(1, round(0.1 * epochs))


def _cache_file(ctx: RunContext, folder: str, name: str) -> Path | None:
    if ctx.cache_dir is None:
        return None
    protocol = ctx.protocol
    return Path(ctx.cache_dir) / folder / f"{protocol.name}-{protocol_fingerprint(protocol)}" / f"{name}.pt"


def _cache_key(ctx: RunContext, **fields) -> dict:
    return {"version": CACHE_VERSION, "protocol": ctx.protocol.name,
            "fingerprint": protocol_fingerprint(ctx.protocol), "seed": ctx.seed, "n_train": ctx.num_train, **fields}


def _load(path: Path | None, key: dict, log) -> dict | None:
    if path is None or not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, said out loud
        log(f"warning: cache file {path} unreadable ({exc}); recomputing")
        return None
    return payload if payload.get("key") == key else None


def _save(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def proxy_tag(run: int) -> str:
    return f"score-proxy-{run}"


def train_proxy(ctx: RunContext, run: int, epochs: int, method: Method | None = None) -> tuple[torch.nn.Module, bool]:
    """Proxy run `run` after `epochs` epochs of the protocol's schedule; (model, came from the cache).

    Charged to ctx.meter as selection: its training steps, or the cached FLOPs on a hit. With an
    observing `method` (forgetting) it always trains, and the proxy it leaves is cached for others.
    """
    model = ctx.new_model("score", run)
    if epochs == 0:
        return model, False
    key = _cache_key(ctx, kind="proxy", epoch=epochs, run=run)
    path = _cache_file(ctx, "proxies", f"epoch{epochs}-run{run}-seed{ctx.seed}")
    if method is None:
        cached = _load(path, key, ctx.log)
        if cached is not None:
            model.load_state_dict(cached["state"])
            ctx.meter.charge_flops("selection", cached["flops"])
            return model, True
    before = ctx.meter.flops["selection"]
    trainer = Trainer(ctx, model, method or Method(), purpose="selection", evaluate=False,
                      epochs=ctx.protocol.epochs, tag=proxy_tag(run))
    for epoch in range(epochs):  # stop early inside the protocol's schedule (module docstring)
        trainer.run_epoch(epoch)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save(path, {"key": key, "state": state, "flops": ctx.meter.flops["selection"] - before})
    return model, False


# -- scoring passes (pure functions of a model and a split) ---------------------------------------


def _eval_batches(ctx: RunContext, batch_size: int | None = None):
    split = ctx.data.train
    return split.batches(torch.arange(len(split)), batch_size or ctx.protocol.eval_batch_size)


@torch.no_grad()
def el2n_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    model.eval()
    scores = torch.empty(ctx.num_train)
    for batch in _eval_batches(ctx):
        probs = model(batch.x).float().softmax(1)
        error = probs - F.one_hot(batch.y, probs.shape[1]).float()
        scores[batch.index.cpu()] = error.norm(dim=1).cpu()
    return scores


def grand_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    scores = torch.empty(ctx.num_train)
    for batch in _eval_batches(ctx, ctx.protocol.batch_size):
        scores[batch.index.cpu()] = per_example_grad_norms(model, batch.x, batch.y).detach().cpu()
    return scores


@torch.no_grad()
def features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate embeddings (pre-logits) and logits, from one forward pass."""
    features = model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    return features, head(features)


@torch.no_grad()
def grand_lastlayer_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    model.eval()
    scores = torch.empty(ctx.num_train)
    for batch in _eval_batches(ctx):
        features, logits = features_and_logits(model, batch.x)
        scores[batch.index.cpu()] = last_layer_grad_norms(logits, features, batch.y).cpu()
    return scores


@torch.no_grad()
def embedding_pass(model: torch.nn.Module, ctx: RunContext) -> torch.Tensor:
    """Penultimate embeddings of every training example [N, d], on the training device."""
    model.eval()
    out = None
    for batch in _eval_batches(ctx):
        features, _ = features_and_logits(model, batch.x)
        if out is None:
            out = torch.empty(ctx.num_train, features.shape[1], device=features.device)
        out[batch.index] = features.float()
    return out


@dataclass(frozen=True)
class ScoreKind:
    """How one kind of score is computed for proxy run `run` at `epoch`, charging ctx.meter."""

    compute: Callable[[RunContext, int, int], tuple[torch.Tensor, dict]]  # -> (scores [N], extra stats)
    auto_epoch: Callable[[int], int]  # score_epoch = -1 -> this function of the protocol's epochs
    pass_cost: int  # forward-pass equivalents per example of the scoring pass after the proxy training


def at_initialisation(epochs: int) -> int:
    return 0


def _after_proxy(score_pass: Callable, backward: bool) -> Callable:
    """Train (or load) the proxy, then score every example with one pass, charged."""

    def compute(ctx: RunContext, epoch: int, run: int) -> tuple[torch.Tensor, dict]:
        model, proxy_cached = train_proxy(ctx, run, epoch)
        scores = score_pass(model, ctx)
        ctx.meter.charge("selection", ctx.num_train, backward=backward, forward_flops=ctx.model_forward_flops(model))
        return scores, {"proxy_cached": proxy_cached}

    return compute


SCORE_KINDS: dict[str, ScoreKind] = {  # methods/forgetting.py adds "forgetting"
    "el2n": ScoreKind(_after_proxy(el2n_pass, backward=False), early_epoch, 1),
    "grand": ScoreKind(_after_proxy(grand_pass, backward=True), at_initialisation, 3),
    "grand-lastlayer": ScoreKind(_after_proxy(grand_lastlayer_pass, backward=False), at_initialisation, 1),
}


def score_run(ctx: RunContext, kind: str, epoch: int, run: int) -> tuple[torch.Tensor, dict, bool]:
    """One proxy run's scores of every training example: (scores, extra stats, came from the cache)."""
    key = _cache_key(ctx, kind=kind, epoch=epoch, run=run)
    path = _cache_file(ctx, "scores", f"{kind}-epoch{epoch}-run{run}-seed{ctx.seed}")
    cached = _load(path, key, ctx.log)
    if cached is not None:
        ctx.meter.charge_flops("selection", cached["flops"])
        return cached["scores"], cached["extra"], True
    before = ctx.meter.flops["selection"]
    scores, extra = SCORE_KINDS[kind].compute(ctx, epoch, run)
    scores = scores.float().cpu()
    _save(path, {"key": key, "scores": scores, "extra": extra, "flops": ctx.meter.flops["selection"] - before})
    return scores, extra, False


def compute_scores(ctx: RunContext, kind: str, runs: int, epoch: int) -> tuple[torch.Tensor, dict]:
    """Scores averaged over `runs` proxy runs, and {"per_run": [runs, N], "cached": [bool], "extra": [...]}."""
    if kind not in SCORE_KINDS:
        raise BenchError(f"unknown score '{kind}' (known: {', '.join(sorted(SCORE_KINDS))})")
    per_run, cached, extra = [], [], []
    for run in range(runs):
        scores, stats, hit = score_run(ctx, kind, epoch, run)
        ctx.log(f"[scores] {kind} epoch {epoch} run {run + 1}/{runs}" + (" (cached)" if hit else ""))
        per_run.append(scores)
        cached.append(hit)
        extra.append(stats)
    stacked = torch.stack(per_run)
    return stacked.double().mean(0).float(), {"per_run": stacked, "cached": cached, "extra": extra}


# -- selection from scores ------------------------------------------------------------------------


def _ranking(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Positions from the highest score to the lowest, ties in a seeded random order."""
    shuffled = torch.randperm(len(scores), generator=generator)
    return shuffled[torch.argsort(scores[shuffled], descending=True, stable=True)]


def ccs_sample(scores: torch.Tensor, k: int, generator: torch.Generator, bins: int = CCS_BINS) -> torch.Tensor:
    """Coverage-centric sampling of k positions over equal-width score bins, smallest bins first."""
    if k == 0 or len(scores) == 0:
        return torch.empty(0, dtype=torch.long)
    lo, hi = scores.min(), scores.max()
    width = (hi - lo) / bins
    which = ((scores - lo) / width).floor().long().clamp(0, bins - 1) if width > 0 else torch.zeros_like(scores).long()
    members = [(which == b).nonzero().flatten() for b in range(bins)]
    members = sorted((m for m in members if len(m)), key=len)  # stable: equal sizes keep bin order
    chosen, budget = [], k
    for left, member in zip(range(len(members), 0, -1), members):
        take = min(len(member), budget // left)
        chosen.append(member[torch.randperm(len(member), generator=generator)[:take]])
        budget -= take
    return torch.cat(chosen)


def _select_pool(scores: torch.Tensor, k: int, mode: str, offset: float, ccs_beta: float,
                 generator: torch.Generator) -> torch.Tensor:
    n = len(scores)
    ranked = _ranking(scores, generator)
    if mode == "hardest":
        skip = round(offset * n)
        if skip + k > n:
            raise BenchError(f"offset={offset} skips {skip} of {n} examples: too few left to keep {k}")
        return ranked[skip:skip + k]
    if mode == "easiest":
        return ranked[n - k:]
    dropped = round(ccs_beta * n)
    if dropped + k > n:
        raise BenchError(f"ccs_beta={ccs_beta} drops {dropped} of {n} examples: too few left to keep {k}; "
                         "lower ccs_beta (CCS uses beta = 0.3 at 90% pruning)")
    pool = ranked[dropped:]
    return pool[ccs_sample(scores[pool], k, generator)]


def select_by_scores(scores: torch.Tensor, fraction: float, *, mode: str = "hardest", offset: float = 0.0,
                     ccs_beta: float = 0.0, labels: torch.Tensor | None = None,
                     generator: torch.Generator) -> torch.Tensor:
    """Sorted dataset indices of the kept subset: exactly round(fraction * N) of them.

    With `labels`, selection is class balanced: each class keeps its class_quotas share and offset,
    ccs_beta and the bins apply within the class.
    """
    if mode not in MODES:
        raise BenchError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if offset and mode != "hardest":
        raise BenchError(f"offset applies to mode 'hardest' only (mode is '{mode}'; CCS drops ccs_beta)")
    scores = scores.double().cpu()
    k = subset_size(len(scores), fraction)
    if labels is None:
        return _select_pool(scores, k, mode, offset, ccs_beta, generator).sort().values
    chosen = []
    for cls, quota in class_quotas(labels, k).items():
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[_select_pool(scores[members], quota, mode, offset, ccs_beta, generator)])
    return torch.cat(chosen).sort().values


# -- the methods ----------------------------------------------------------------------------------

FRACTION = Param(0.5, "share of the training set kept", low=0.0, high=1.0, low_open=True)
SELECTION_PARAMS = {
    "fraction": FRACTION,
    "mode": Param("hardest", "which scores to keep: the highest, the lowest, or CCS strata", choices=MODES),
    "offset": Param(0.0, "mode hardest: share of the very hardest skipped before keeping (Data Diet)",
                    low=0.0, high=1.0, high_open=True),
    "class_balanced": Param(False, "select within each class, keeping its share of the training set"),
    "ccs_beta": Param(0.3, "mode ccs: share of the hardest dropped before stratified sampling",
                      low=0.0, high=1.0, high_open=True),
}
SCORE_RUNS = Param(10, "independent proxy runs whose scores are averaged (the paper: 10)", low=1)


def _epoch_param(default: int, what: str) -> Param:
    return Param(default, what, low=-1)


class ScoreSelection(StaticSubset):
    """Shared by the score methods: average scores over proxy runs, keep a static subset."""

    score_kind = ""
    params = {}

    @classmethod
    def check_params(cls, params: dict) -> None:
        fraction, mode = params["fraction"], params["mode"]
        if params["offset"] and mode != "hardest":
            raise BenchError(f"method '{cls.name}': offset applies to mode 'hardest' only (mode is '{mode}'; "
                             "CCS drops ccs_beta)")
        skipped, what = {"ccs": (params["ccs_beta"], "ccs_beta"), "hardest": (params["offset"], "offset")}.get(
            mode, (0.0, ""))
        if skipped + fraction > 1 + 1e-9:
            raise BenchError(f"method '{cls.name}': {what}={skipped} skips the hardest {skipped:.0%} and "
                             f"fraction={fraction} keeps {fraction:.0%}: more than the whole training set; lower "
                             f"{what}" + (" (CCS uses 0.3 at 90% pruned, less when keeping more)" if mode == "ccs" else ""))

    def resolved_epoch(self, protocol: Protocol) -> int:
        return resolve_score_epoch(self.hparams["score_epoch"], protocol, SCORE_KINDS[self.score_kind].auto_epoch)

    def prepare(self, ctx: RunContext) -> None:
        h = self.hparams
        epoch = self.resolved_epoch(ctx.protocol)
        labels = ctx.data.train.labels
        self.choose_subset(torch.zeros(len(labels)), labels, torch.Generator())  # bad settings fail before any proxy
        before = ctx.meter.flops["selection"]
        scores, info = compute_scores(ctx, self.score_kind, h["score_runs"], epoch)
        self.subset = self.choose_subset(scores, labels, ctx.generator("score-selection"))
        kept = torch.zeros(len(scores), dtype=torch.bool)
        kept[self.subset] = True
        self.stats = {"score": self.score_kind, "score_epoch": epoch, "score_runs": h["score_runs"],
                      "scores_cached": all(info["cached"]), "cached_runs": sum(info["cached"]),
                      "kept": len(self.subset), "selection_flops": ctx.meter.flops["selection"] - before,
                      "score_mean": scores.mean().item(), "kept_score_mean": scores[kept].mean().item()}
        self.stats.update(self.extra_stats(info["extra"]))

    def choose_subset(self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h = self.hparams
        return select_by_scores(scores, h["fraction"], mode=h["mode"], offset=h["offset"], ccs_beta=h["ccs_beta"],
                                labels=labels if h["class_balanced"] else None, generator=generator)

    def extra_stats(self, extra: list[dict]) -> dict:
        return {}


    def predicted_selection_flops(self, protocol: Protocol, labels: torch.Tensor, forward_flops: int,
                                  feature_dim: int = 0) -> int:
        """What prepare charges, from the formula: runs x (proxy epochs x 3FN + the scoring pass)."""
        epoch = self.resolved_epoch(protocol)
        per_run = forward_flops * len(labels) * (3 * epoch + SCORE_KINDS[self.score_kind].pass_cost)
        return self.hparams["score_runs"] * per_run


def score_params(score_epoch: Param, **defaults) -> dict:
    params = dict(SELECTION_PARAMS, score_runs=SCORE_RUNS, score_epoch=score_epoch)
    for name, value in defaults.items():
        params[name] = dataclasses.replace(params[name], default=value)
    return params


EL2N_EPOCH = _epoch_param(-1, "proxy epochs before scoring; -1 = 10% of the protocol's (the paper: 20 of 200)")
GRAND_EPOCH = _epoch_param(0, "proxy epochs before scoring; 0 = at initialisation (the paper)")


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


@register("ccs")
class CCS(ScoreSelection):
    """Coverage-centric coreset selection (Zheng et al. 2023) over EL2N scores: drop the hardest, stratify."""

    score_kind = "el2n"
    params = score_params(EL2N_EPOCH, mode="ccs")
