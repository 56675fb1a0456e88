"""Static selection by per-example scores: the machinery every score method shares.

A score method trains `score_runs` independent proxy models (benchmarks/kit/proxies.py), scores every
training example with each (a ScoreKind registered by the method's module: EL2N, GraNd, forgetting,
AUM ...), averages the scores (keyed by the ORIGINAL dataset index), keeps a static subset chosen
from the averaged scores (`select_by_scores`), and trains the main model on it (ScoreSelection).
Each proxy run r is a fresh model ctx.new_model("score", r), so runs differ and every score kind
at the same epoch shares the same proxies through the cache.

Kinds of scores: a pass over the training set after proxy training (EL2N, GraNd: `compute`), or
training dynamics read while the proxy trains (forgetting events, AUM margins: `observer`). All the
observer kinds are recorded by ONE proxy run and each is cached (a proxy's training does not depend
on who watches it), so forgetting and AUM at the same epoch cost one set of proxies between them;
each cached file still records the whole cost, which every method that uses it is charged.
A kind says which end is hard (`higher_is_harder`: EL2N, GraNd, forgetting yes; AUM no, a low
margin is hard); selection ranks by hardness and CCS bins the raw score, as its code does.

Selection from the averaged scores, every mode keeping exactly k = round(fraction * N) examples
(benchmarks.kit.subsets.subset_size; per class: class_quotas):
- hardest (default): the k hardest, after skipping the round(offset * N) very hardest
  (Data Diet's offset: the kept window is ranks [offset*N, offset*N + k) from the hardest).
- easiest: the k easiest.
- ccs (Zheng et al., ICLR 2023; official code haizhongzheng/Coverage-centric-coreset-selection,
  core/data/Coreset.py): drop the int(beta * N) hardest (`ccs_drop_count`), split the rest into 50
  score bins with the official edges (`ccs_strata`: equal width from the minimum to 1.0001 x the
  maximum, bin b = [min + b*step, min + (b+1)*step)), then visit the bins from the smallest to the
  largest, each taking min(its size, floor(remaining budget / bins left)) examples uniformly at
  random. This water-filling takes exactly k whenever k <= N - int(beta * N).
  beta = ccs_beta, or with ccs_beta = -1 (the default) the paper's value for the pruning rate
  (`ccs_paper_beta`).
  Where this differs from the official code, and why: k stays round(fraction * N), the same for
  every method at the same fraction (the official int() can keep one fewer); equal-sized bins are
  visited in bin order (the official torch.argsort is not stable); a pool whose maximum is <= 0
  gets its top edge 0.01% above the maximum (1.0001 x max would fall below it and leave the top
  examples out of every bin); edges are computed in float64.
Ties in the ranking are broken by a seeded random permutation, never by index order (forgetting
counts tie massively, and an index order can correlate with the class).

Scores are cached per (protocol, score kind, score_epoch, proxy run, run seed); a hit charges the
FLOPs and seconds the file records, so a method's cost never depends on what ran before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.api import Method, Param, RunContext, StepInfo
from benchmarks.core.protocol import Protocol
from benchmarks.errors import BenchError
from benchmarks.kit.proxies import (
    Spending,
    cache_file,
    cache_key,
    charge_cached,
    load_cached,
    save_cached,
    train_proxy,
)
from benchmarks.kit.subsets import FRACTION, StaticSubset, class_quotas, subset_size

CCS_BINS = 50
MODES = ("hardest", "easiest", "ccs")


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


def at_initialisation(epochs: int) -> int:
    return 0


# -- kinds of scores and their cached runs --------------------------------------------------------

@dataclass(frozen=True)
class ScoreKind:
    """How one kind of score is computed for proxy run `run` at `epoch`, metered by ctx.meter.

    Exactly one of `compute` (a pass after proxy training: (ctx, epoch, run) -> (scores [N], stats))
    and `observer` (training dynamics: ctx -> a Method whose `observe` sees the proxy's steps, with
    `scores()`, `stats()` and a state for partial checkpoints) is set.
    """

    compute: Callable[[RunContext, int, int], tuple[torch.Tensor, dict]] | None = None
    auto_epoch: Callable[[int], int] = at_initialisation  # score_epoch = -1 -> this function of the protocol's epochs
    higher_is_harder: bool = True  # False: a low score is hard (AUM)
    observer: Callable[[RunContext], Method] | None = None

    def __post_init__(self):
        if (self.compute is None) == (self.observer is None):
            raise ValueError("a ScoreKind has exactly one of compute and observer")


SCORE_KINDS: dict[str, ScoreKind] = {}  # filled by the method modules (register_score_kind)


def register_score_kind(name: str, kind: ScoreKind) -> None:
    if name in SCORE_KINDS and SCORE_KINDS[name] is not kind:
        raise ValueError(f"score kind '{name}' registered twice")
    SCORE_KINDS[name] = kind


def after_proxy(score_pass: Callable[[torch.nn.Module, RunContext], torch.Tensor]) -> Callable:
    """A ScoreKind.compute that trains (or loads) the proxy, then scores every example with one metered pass."""

    def compute(ctx: RunContext, epoch: int, run: int) -> tuple[torch.Tensor, dict]:
        model, proxy_cached = train_proxy(ctx, run, epoch)
        return score_pass(model, ctx), {"proxy_cached": proxy_cached}

    return compute


class DynamicsRecorders(Method):
    """Several training-dynamics observers fed by one proxy run (forgetting events, AUM margins ...)."""

    def __init__(self, observers: dict[str, Method]):
        super().__init__()
        self.observers = observers
        self.name = "dynamics-" + "+".join(sorted(observers))  # names the partial checkpoint

    def observe(self, info: StepInfo) -> None:
        for observer in self.observers.values():
            observer.observe(info)

    def state_dict(self) -> dict:
        return {name: observer.state_dict() for name, observer in self.observers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, observer in self.observers.items():
            observer.load_state_dict(state[name])


def _score_file(ctx: RunContext, kind: str, epoch: int, run: int):
    return (cache_key(ctx, kind=kind, epoch=epoch, run=run),
            cache_file(ctx, "scores", f"{kind}-epoch{epoch}-run{run}-seed{ctx.seed}"))


def _observed_kinds(ctx: RunContext, kind: str, epoch: int, run: int) -> list[str]:
    """The observer kinds one proxy run records: `kind`, and every other one not cached yet (with a cache)."""
    names = [kind]
    if ctx.cache_dir is not None:
        for name, other in sorted(SCORE_KINDS.items()):
            if other.observer is not None and name != kind:
                key, path = _score_file(ctx, name, epoch, run)
                if load_cached(path, key, ctx.log) is None:
                    names.append(name)
    return names


def score_run(ctx: RunContext, kind: str, epoch: int, run: int) -> tuple[torch.Tensor, dict, bool]:
    """One proxy run's scores of every training example: (scores, extra stats, came from the cache)."""
    key, path = _score_file(ctx, kind, epoch, run)
    cached = load_cached(path, key, ctx.log)
    if cached is not None:
        charge_cached(ctx, cached)
        return cached["scores"], cached["extra"], True
    spent = Spending(ctx)
    score_kind = SCORE_KINDS[kind]
    if score_kind.observer is None:
        results = {kind: score_kind.compute(ctx, epoch, run)}
    else:
        observers = {name: SCORE_KINDS[name].observer(ctx) for name in _observed_kinds(ctx, kind, epoch, run)}
        train_proxy(ctx, run, epoch, method=DynamicsRecorders(observers))
        results = {name: (observer.scores(), observer.stats()) for name, observer in observers.items()}
    for name, (scores, extra) in results.items():  # each file holds the whole cost of the run that made it
        name_key, name_path = _score_file(ctx, name, epoch, run)
        save_cached(name_path, spent.payload(key=name_key, scores=scores.float().cpu(), extra=extra))
    scores, extra = results[kind]
    return scores.float().cpu(), extra, False


def compute_scores(ctx: RunContext, kind: str, runs: int, epoch: int) -> tuple[torch.Tensor, dict]:
    """Scores averaged over `runs` proxy runs, and {"per_run": [runs, N], "cached": [bool], "extra": [...]}."""
    if kind not in SCORE_KINDS:
        raise BenchError(f"unknown score '{kind}' (known: {', '.join(sorted(SCORE_KINDS))})")
    per_run, cached, extra = [], [], []
    for run in range(runs):
        ctx.log(f"[scores] {kind}: proxy run {run + 1}/{runs}, scored after {epoch} epoch(s)")
        scores, stats, hit = score_run(ctx, kind, epoch, run)
        ctx.log(f"[scores] {kind} epoch {epoch} run {run + 1}/{runs}" + (" (cached)" if hit else ""))
        per_run.append(scores)
        cached.append(hit)
        extra.append(stats)
    stacked = torch.stack(per_run)
    return stacked.double().mean(0).float(), {"per_run": stacked, "cached": cached, "extra": extra}


# -- selection from scores ------------------------------------------------------------------------

# CCS's hard cutoff rate beta per pruning rate (share of the data REMOVED -> beta), for CIFAR-10,
# Zheng et al. (ICLR 2023), appendix table of hard cutoff rates. The 90% value (beta = 0.3) is the one
# the official README runs (`--coreset-ratio 0.1 --mis-ratio 0.3`) and anchors.md states; the others
# were written from memory of that table and are NOT yet checked against the paper: check them
# (arXiv 2210.15809, appendix B) before citing numbers made with them. The paper tunes beta per
# dataset; the CPU-scale protocols use this CIFAR-10 row (10 classes, the nearest dataset).
CCS_PAPER_BETA = {0.3: 0.0, 0.5: 0.0, 0.7: 0.1, 0.8: 0.1, 0.9: 0.3}
PAPER_BETA = -1.0  # ccs_beta = -1: the paper's value for the pruning rate


def ccs_paper_beta(fraction: float) -> float:
    """The paper's beta for keeping `fraction`: that of the largest tabulated pruning rate <= 1 - fraction.

    (A step function: 95% pruned -> the 90% value; below the smallest tabulated rate -> 0.)
    """
    pruned = 1 - fraction
    rates = [rate for rate in sorted(CCS_PAPER_BETA) if rate <= pruned + 1e-9]
    return CCS_PAPER_BETA[rates[-1]] if rates else 0.0


def resolve_ccs_beta(ccs_beta: float, fraction: float) -> float:
    return ccs_paper_beta(fraction) if ccs_beta == PAPER_BETA else ccs_beta


def ccs_drop_count(beta: float, n: int) -> int:
    """How many of the hardest CCS drops first: int(beta * n), as the official code (`mis_num`)."""
    return int(beta * n)


def ccs_strata(scores: torch.Tensor, bins: int = CCS_BINS) -> torch.Tensor:
    """The official CCS bin of each score: equal width from min to 1.0001 x max, bin b = [lo + b*step, lo + (b+1)*step).

    Every score falls in exactly one bin (the top edge lies above the maximum); see the module docstring
    for a pool whose maximum is <= 0.
    """
    scores = scores.double()
    lo, hi = scores.min(), scores.max()
    top = hi * 1.0001 if hi > 0 else hi + 1e-4 * (hi.abs() if hi != 0 else 1.0)
    step = (top - lo) / bins
    which = torch.full((len(scores),), -1, dtype=torch.long)
    for b in range(bins):  # membership by the official comparisons, not by a division that rounds differently
        inside = (scores >= lo + b * step) & (scores < lo + (b + 1) * step)
        which[inside] = b
    return which


def ccs_sample(scores: torch.Tensor, k: int, generator: torch.Generator, bins: int = CCS_BINS) -> torch.Tensor:
    """Coverage-centric sampling of k positions over the official score bins, smallest bins first."""
    if k == 0 or len(scores) == 0:
        return torch.empty(0, dtype=torch.long)
    which = ccs_strata(scores, bins)
    members = [(which == b).nonzero().flatten() for b in range(bins)]
    members = sorted((m for m in members if len(m)), key=len)  # stable: equal sizes keep bin order
    chosen, budget = [], k
    for left, member in zip(range(len(members), 0, -1), members):
        take = min(len(member), budget // left)
        chosen.append(member[torch.randperm(len(member), generator=generator)[:take]])
        budget -= take
    return torch.cat(chosen)


def _ranking(hardness: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Positions from the hardest to the easiest, ties in a seeded random order."""
    shuffled = torch.randperm(len(hardness), generator=generator)
    return shuffled[torch.argsort(hardness[shuffled], descending=True, stable=True)]


def _select_pool(scores: torch.Tensor, k: int, mode: str, offset: float, ccs_beta: float,
                 generator: torch.Generator, higher_is_harder: bool) -> torch.Tensor:
    n = len(scores)
    ranked = _ranking(scores if higher_is_harder else -scores, generator)
    if mode == "hardest":
        skip = round(offset * n)
        if skip + k > n:
            raise BenchError(f"offset={offset} skips {skip} of {n} examples: too few left to keep {k}")
        return ranked[skip:skip + k]
    if mode == "easiest":
        return ranked[n - k:]
    dropped = ccs_drop_count(ccs_beta, n)
    if dropped + k > n:
        raise BenchError(f"ccs_beta={ccs_beta} drops {dropped} of {n} examples: too few left to keep {k}; "
                         "lower ccs_beta (CCS uses beta = 0.3 at 90% pruning)")
    pool = ranked[dropped:]
    return pool[ccs_sample(scores[pool], k, generator)]  # bins over the raw score, as the official code


def select_by_scores(scores: torch.Tensor, fraction: float, *, mode: str = "hardest", offset: float = 0.0,
                     ccs_beta: float = PAPER_BETA, labels: torch.Tensor | None = None,
                     generator: torch.Generator, higher_is_harder: bool = True) -> torch.Tensor:
    """Sorted dataset indices of the kept subset: exactly round(fraction * N) of them.

    With `labels`, selection is class balanced: each class keeps its class_quotas share and offset,
    ccs_beta and the bins apply within the class. `higher_is_harder` False: a low score is hard (AUM).
    """
    if mode not in MODES:
        raise BenchError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if offset and mode != "hardest":
        raise BenchError(f"offset applies to mode 'hardest' only (mode is '{mode}'; CCS drops ccs_beta)")
    scores = scores.double().cpu()
    k = subset_size(len(scores), fraction)
    beta = resolve_ccs_beta(ccs_beta, fraction)
    if labels is None:
        return _select_pool(scores, k, mode, offset, beta, generator, higher_is_harder).sort().values
    chosen = []
    for cls, quota in class_quotas(labels, k).items():
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[_select_pool(scores[members], quota, mode, offset, beta, generator, higher_is_harder)])
    return torch.cat(chosen).sort().values


# -- the method base -------------------------------------------------------------------------------

SELECTION_PARAMS = {
    "fraction": FRACTION,
    "mode": Param("hardest", "which scores to keep: the highest, the lowest, or CCS strata", choices=MODES),
    "offset": Param(0.0, "mode hardest: share of the very hardest skipped before keeping (Data Diet)",
                    low=0.0, high=1.0, high_open=True),
    "class_balanced": Param(False, "select within each class, keeping its share of the training set"),
    # 0.3 stays the default of the other score methods' mode ccs (their run ids, which hash every
    # parameter, do not change); the ccs method's default is -1 (methods/ccs.py).
    "ccs_beta": Param(0.3, "mode ccs: share of the hardest dropped before stratified sampling; "
                      "-1 = the CCS paper's value for the pruning rate (0.3 at 90% pruned, 0 at 50%)",
                      low=-1.0, high=1.0, high_open=True, labels={PAPER_BETA: "paper beta"}),
}
SCORE_RUNS = Param(10, "independent proxy runs whose scores are averaged (the paper: 10)", low=1)


def epoch_param(default: int, what: str) -> Param:
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
        if params["ccs_beta"] < 0 and params["ccs_beta"] != PAPER_BETA:
            raise BenchError(f"method '{cls.name}': ccs_beta={params['ccs_beta']} must be in [0, 1), or -1 for the "
                             "CCS paper's value at the pruning rate")
        beta = resolve_ccs_beta(params["ccs_beta"], fraction)
        skipped, what = {"ccs": (beta, "ccs_beta"), "hardest": (params["offset"], "offset")}.get(mode, (0.0, ""))
        if skipped + fraction > 1 + 1e-9:
            raise BenchError(f"method '{cls.name}': {what}={skipped} skips the hardest {skipped:.0%} and "
                             f"fraction={fraction} keeps {fraction:.0%}: more than the whole training set; lower "
                             f"{what}" + (" (CCS uses 0.3 at 90% pruned, less when keeping more; -1 takes the "
                                          "paper's value)" if mode == "ccs" else ""))

    @property
    def score_name(self) -> str:
        """The score kind this run selects by (a method with a `score` parameter reads it from there)."""
        return self.hparams.get("score", self.score_kind)

    def resolved_epoch(self, protocol: Protocol) -> int:
        kind = SCORE_KINDS[self.score_name]
        epoch = resolve_score_epoch(self.hparams["score_epoch"], protocol, kind.auto_epoch)
        if kind.observer is not None and epoch < 1:
            raise BenchError(f"{self.name}: score_epoch must be >= 1 ({self.score_name} is recorded while the "
                             "proxy trains)")
        return epoch

    def prepare(self, ctx: RunContext) -> None:
        h = self.hparams
        epoch = self.resolved_epoch(ctx.protocol)
        labels = ctx.data.train.labels
        self.choose_subset(torch.zeros(len(labels)), labels, torch.Generator())  # bad settings fail before any proxy
        before = ctx.meter.flops["selection"]
        scores, info = compute_scores(ctx, self.score_name, h["score_runs"], epoch)
        self.subset = self.choose_subset(scores, labels, ctx.generator("score-selection"))
        kept = torch.zeros(len(scores), dtype=torch.bool)
        kept[self.subset] = True
        self.stats = {"score": self.score_name, "score_epoch": epoch, "score_runs": h["score_runs"],
                      "scores_cached": all(info["cached"]), "cached_runs": sum(info["cached"]),
                      "kept": len(self.subset), "selection_flops": ctx.meter.flops["selection"] - before,
                      "score_mean": scores.mean().item(), "kept_score_mean": scores[kept].mean().item(),
                      **class_coverage(labels, self.subset)}
        if h["mode"] == "ccs":
            self.stats["ccs_beta"] = resolve_ccs_beta(h["ccs_beta"], h["fraction"])
        self.stats.update(self.extra_stats(info["extra"]))

    def choose_subset(self, scores: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h = self.hparams
        return select_by_scores(scores, h["fraction"], mode=h["mode"], offset=h["offset"], ccs_beta=h["ccs_beta"],
                                labels=labels if h["class_balanced"] else None, generator=generator,
                                higher_is_harder=SCORE_KINDS[self.score_name].higher_is_harder)

    def extra_stats(self, extra: list[dict]) -> dict:
        return {}


def class_coverage(labels: torch.Tensor, subset: torch.Tensor) -> dict:
    """How the kept subset covers the classes: kept count per class, and the smallest class's kept share
    relative to its share of the training set (1 = proportional; 0.24 = a class kept at a quarter of its
    due, as CCS's fixed beta did to 'coat' on Fashion-MNIST)."""
    classes, counts = labels.unique(return_counts=True)
    kept = torch.bincount(labels[subset], minlength=int(classes.max()) + 1)[classes]
    due = counts.double() * len(subset) / len(labels)
    return {"kept_per_class": {str(int(c)): int(k) for c, k in zip(classes, kept)},
            "min_class_coverage": float((kept.double() / due).min())}


def score_params(score_epoch: Param, **defaults) -> dict:
    params = dict(SELECTION_PARAMS, score_runs=SCORE_RUNS, score_epoch=score_epoch)
    for name, value in defaults.items():
        params[name] = dataclasses.replace(params[name], default=value)
    return params
