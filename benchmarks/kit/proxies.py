"""Work that selection methods share: proxy training, the artefact cache, passes over the training set.

Proxy training (`train_proxy`): a fresh model of the protocol, trained through the harness's Trainer
with purpose "selection" (so every step is metered as selection), following the protocol's schedule
over the protocol's epochs and stopping after `epochs` of them: "EL2N at epoch 20" is a snapshot of
a 200-epoch run, not a run whose whole schedule is squeezed into 20 epochs. Score methods (EL2N,
GraNd, forgetting, AUM), geometric coresets, JTT's first stage and RHO-Loss's irreducible-loss model
all train their models here.

The cache (`ctx.cache_dir`, shared by the runs of one results folder): artefacts (trained proxies,
scores, targets) are stored per (protocol name + fingerprint of the fields that can change them, a
name, the run seed). Every file holds the FLOPs and seconds its contents cost; a hit charges those
FLOPs to the meter (the method's cost does not depend on what another run computed first) and the
seconds to `ctx.cached_seconds`. Files are written atomically.

Each file also lists its work as pieces {key, flops} (an artefact made inside another one, such as
the proxy a score file trained, is its own piece), and every save or hit notes those pieces on the
meter (`compute.artefacts` in the record): what a table needs to pay shared work once across the
runs that used it (the amortised figure). Nothing is noted without a cache: nothing is shared then.

Resumable: a proxy in training writes `<name>.partial.pt` after every epoch, and mid-epoch when the
run is asked to stop (Slurm's warning signal), holding the trainer's state and the FLOPs spent so
far. `prepare` then starts over after a preemption, finds finished artefacts in the cache and the
unfinished proxy at its last step, and loses nothing. Without a cache directory nothing is kept.
The partial is written and read by the run's own checkpoint mechanism (benchmarks/core/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.api import Batch, Method
from benchmarks.core.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint
from benchmarks.core.models import embed
from benchmarks.core.protocol import Protocol, fingerprint
from benchmarks.core.record import atomic_write_bytes
from benchmarks.core.train import STOP, Preempted, RunContext, Trainer
from benchmarks.errors import BenchError

if TYPE_CHECKING:
    from benchmarks.data.splits import StreamingSplit, TensorSplit

CACHE_VERSION = 2  # 2: FLOPs measured by flop_counter (1 held the "3 x forward" estimate)


def protocol_fingerprint(protocol: Protocol) -> str:
    """The key of this protocol's artefacts: benchmarks.core.protocol.fingerprint without the fields that
    change only evaluation and accounting (one definition and one exclusion list, shared with run ids)."""
    return fingerprint(protocol, artefacts=True)


def cache_file(ctx: RunContext, folder: str, name: str) -> Path | None:
    """Where an artefact of this protocol lives, or None when the run has no cache."""
    if ctx.cache_dir is None:
        return None
    protocol = ctx.protocol
    return Path(ctx.cache_dir) / folder / f"{protocol.name}-{protocol_fingerprint(protocol)}" / f"{name}.pt"


def data_fingerprint(ctx: RunContext) -> str:
    """A digest of the run's training examples (dataset, its options, which examples): what an artefact that
    depends on the data alone (a prior's features, not the protocol's training recipe) is keyed by."""
    origin = ctx.data.train_origin
    examples = hashlib.sha256(origin.numpy().astype("int64").tobytes()).hexdigest() if origin is not None else "all"
    fields = {"dataset": ctx.protocol.dataset, "data_kwargs": ctx.protocol.data_kwargs, "n_train": ctx.num_train,
              "examples": examples}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dataset_cache_file(ctx: RunContext, folder: str, name: str) -> Path | None:
    """Where an artefact of this training data lives, shared by every protocol and seed on the same examples;
    None when the run has no cache. Its key must name everything else it depends on."""
    if ctx.cache_dir is None:
        return None
    return Path(ctx.cache_dir) / folder / f"{ctx.protocol.dataset}-{data_fingerprint(ctx)}" / f"{name}.pt"


def file_label(text: str) -> str:
    """Free text (a prior's spec) made safe and short enough for a cache file's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60]


def dataset_artefact(ctx: RunContext, kind: str, name: str, **fields) -> tuple[Path | None, dict]:
    """(where, key) of a cached artefact of this training data alone (dataset_cache_file), whatever the
    protocol and seed: the key holds the version, `kind`, the data's fingerprint and `fields` (everything
    else the artefact depends on); the file, <kind>/<dataset>-<data>/<name>-<digest of the key>.pt, is
    apart for every key. `name` is file-safe (file_label)."""
    key = {"version": CACHE_VERSION, "kind": kind, "data": data_fingerprint(ctx), **fields}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return dataset_cache_file(ctx, kind, f"{name}-{digest}"), key


def cache_key(ctx: RunContext, **fields) -> dict:
    """What a cached file must match to be used: the version, the protocol, the seed, the data size."""
    return {"version": CACHE_VERSION, "protocol": ctx.protocol.name, "fingerprint": protocol_fingerprint(ctx.protocol),
            "seed": ctx.seed, "n_train": ctx.num_train, **fields}


def load_cached(path: Path | None, key: dict, log=print) -> dict | None:
    """The payload at `path` if it exists, reads, and matches `key`; None otherwise (a bad file is said)."""
    if path is None or not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is recomputed, said out loud
        log(f"warning: cache file {path} unreadable ({exc}); recomputing")
        return None
    return payload if payload.get("key") == key else None


def save_cached(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def artefact_key(key: dict) -> str:
    """A cache key as a short stable name: its kind and a digest of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{key.get('kind', 'artefact')}-{digest}"


def charge_cached(ctx: RunContext, payload: dict) -> None:
    """A cache hit costs what computing it cost: its FLOPs to the meter, its seconds to the record."""
    ctx.meter.charge_flops("selection", payload["flops"])
    ctx.cached_seconds += float(payload.get("seconds", 0.0))
    if "key" in payload:  # an artefact (a partial proxy has no key: its work becomes the proxy's own piece)
        # A file written before artefacts were listed is one piece: all its work.
        pieces = payload.get("artefacts", [{"key": artefact_key(payload["key"]), "flops": payload["flops"]}])
        for piece in pieces:
            ctx.meter.note_artefact(piece["key"], piece["flops"])


def cached_artefact(ctx: RunContext, path: Path | None, key: dict, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """(payload, came from the cache): the artefact at `path` if it matches `key`, its cost charged to the run;
    else `compute()` (its contents, metered as selection as it runs), saved with what it cost. The one
    load-or-compute rule of the artefacts methods cache (JTT's error set, RHO-Loss's losses, RELA's targets)."""
    cached = load_cached(path, key, ctx.log)
    if cached is not None:
        charge_cached(ctx, cached)
        return cached, True
    spent = Spending(ctx)
    payload = spent.payload(key=key, **compute())
    save_cached(path, payload)
    return payload, False


class Spending:
    """The selection FLOPs and seconds spent from here on (what a cached artefact records it cost)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.flops0, self.cached0 = ctx.meter.flops["selection"], ctx.cached_seconds
        self.noted0 = len(ctx.meter.artefacts)
        self.started = time.perf_counter()

    def payload(self, **contents) -> dict:
        """The cache payload: contents plus the FLOPs and seconds spent (cache hits inside included).

        With a `key` and a cache, also its pieces of work: those noted since this Spending began
        (artefacts made or hit inside it, and an earlier payload's own piece: files written from one
        piece of work share it) and one piece, under this key, for the rest.
        """
        flops = self.ctx.meter.flops["selection"] - self.flops0
        payload = {**contents, "flops": flops,
                   "seconds": time.perf_counter() - self.started + self.ctx.cached_seconds - self.cached0}
        if "key" in contents and self.ctx.cache_dir is not None:
            rest = flops - sum(piece["flops"] for piece in self.ctx.meter.artefacts[self.noted0:])
            if rest > 0:
                self.ctx.meter.note_artefact(artefact_key(contents["key"]), rest)
            payload["artefacts"] = [dict(piece) for piece in self.ctx.meter.artefacts[self.noted0:]]
        return payload


def proxy_tag(run: int) -> str:
    return f"score-proxy-{run}"


TRAINING_SPLITS = ("train", "holdout")


def on_split(ctx: RunContext, split: str) -> RunContext:
    """The run's context with another of its splits in the place of the training data.

    A Trainer given it trains on that split (its batches carry the split's own indices); the meter,
    the seed and the log are the run's own, so everything it runs is charged to the run.
    """
    if split not in TRAINING_SPLITS:
        raise ValueError(f"unknown split '{split}' (one of {TRAINING_SPLITS})")
    if split == "train":
        return ctx
    data = getattr(ctx.data, split)
    if data is None or len(data) == 0:
        raise BenchError(f"protocol '{ctx.protocol.name}' has no {split} split to train on; set one with "
                         f"--set holdout=... (a count, or a fraction of the training data)")
    bundle = dataclasses.replace(ctx.data, train=data, train_origin=getattr(ctx.data, f"{split}_origin"),
                                 holdout=None, holdout_origin=None)
    return dataclasses.replace(ctx, data=bundle)


def train_proxy(ctx: RunContext, run: int, epochs: int, method: Method | None = None,
                tag: str | None = None, split: str = "train") -> tuple[torch.nn.Module, bool]:
    """Proxy run `run` after `epochs` epochs of the protocol's schedule; (model, came from the cache).

    Metered as selection: its training steps, or the cached FLOPs on a hit. With an observing
    `method` (forgetting's counter) it always trains (the counts are what is wanted) and the model
    it leaves is cached for others; its partial checkpoints hold the method's state too.
    `split`: the data it trains on, "train" or "holdout" (RHO-Loss's irreducible-loss model); a
    proxy of another split has its own initialisation and its own cache files.
    """
    fit_ctx = on_split(ctx, split)
    model = ctx.new_model("score", run) if split == "train" else ctx.new_model("score", split, run)
    if epochs == 0:
        return model, False
    on = {} if split == "train" else {"split": split, "split_size": fit_ctx.num_train}
    key = cache_key(ctx, kind="proxy", epoch=epochs, run=run, **on)
    name = f"epoch{epochs}-run{run}-seed{ctx.seed}" + ("" if split == "train" else f"-{split}")
    path = cache_file(ctx, "proxies", name)
    if method is None:
        cached = load_cached(path, key, ctx.log)
        if cached is not None:
            model.load_state_dict(cached["state"])
            charge_cached(ctx, cached)
            return model, True
    trainer = Trainer(fit_ctx, model, method or Method(), purpose="selection", evaluate=False,
                      epochs=ctx.protocol.epochs, tag=tag or proxy_tag(run))
    partial_path = cache_file(ctx, "proxies", f"{name}-{method.name if method else 'plain'}.partial")
    partial_key = dict(key, kind="proxy-partial", method=method.name if method else None)
    spent = Spending(ctx)
    partial = _load_partial(partial_path, partial_key, ctx.log)
    if partial is not None:
        trainer.load_state_dict(partial["trainer"])
        charge_cached(ctx, partial)
        ctx.log(f"[{trainer.tag}] resumed at epoch {trainer.state.epoch}"
                + (f", step {trainer.partial.steps_done}" if trainer.partial else ""))

    def keep_partial() -> None:
        if partial_path is not None:  # the run's own checkpoint mechanism, owned by the partial's key
            save_checkpoint(partial_path, spent.payload(trainer=trainer.state_dict()), owner=partial_key)

    started = time.perf_counter()
    try:
        while trainer.state.epoch < epochs:  # stop early inside the protocol's schedule (module docstring)
            entry = trainer.run_epoch(trainer.state.epoch)
            if not ctx.progress:  # a log file: a line per proxy epoch, as for the run's own epochs
                ctx.log(trainer.epoch_line(entry, time.perf_counter() - started, last=epochs))
            if STOP.is_set() and trainer.state.epoch < epochs:
                raise Preempted(f"stopped proxy {trainer.tag} after epoch {trainer.state.epoch}")
            keep_partial()
    except Preempted:
        keep_partial()
        raise
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_cached(path, spent.payload(key=key, state=state))
    if partial_path is not None:
        partial_path.unlink(missing_ok=True)
    return model, False


def _load_partial(path: Path | None, key: dict, log) -> dict | None:
    """A proxy's partial checkpoint (benchmarks/core/checkpoint.py: read safely, owned by `key`), or None.

    It lives in the cache, so one that cannot be used (refused by the safe loader, damaged, another key's) is
    said and the proxy starts over, replacing it: it holds nothing that training the proxy again does not
    give back, and it is never unpickled. A run's own checkpoint is treated more carefully (core/run.py)."""
    if path is None:
        return None
    try:
        return load_checkpoint(path, key, ("trainer", "flops", "seconds"), map_location="cpu")
    except CheckpointRefused as refusal:
        log(f"warning: proxy partial checkpoint {refusal.path} not used ({refusal.reason}); training the proxy "
            "from its start")
        return None


# -- passes over the training set -----------------------------------------------------------------

def train_batches(ctx: RunContext, batch_size: int | None = None,
                  split: TensorSplit | StreamingSplit | None = None) -> Iterator[Batch]:
    """Every example of the training split (or `split`), in index order, un-augmented."""
    split = ctx.data.train if split is None else split
    return split.batches(torch.arange(len(split)), batch_size or ctx.protocol.eval_batch_size)


@torch.no_grad()
def features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate embeddings (pre-logits) and logits, from one forward pass."""
    features = embed(model, x)
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    return features, head(features)


@torch.no_grad()
def per_example_pass(model: torch.nn.Module, ctx: RunContext, tag: str, outputs: Callable,
                     split: TensorSplit | StreamingSplit | None = None) -> torch.Tensor:
    """`outputs(model, batch)` for every example of the training split (or `split`), rows in example order.

    Eval mode (the model's mode is restored after), un-augmented batches, each batch metered as
    selection under `tag`: the one loop behind every scoring pass (EL2N, last-layer GraNd, JTT's
    error set, RHO-Loss's irreducible losses, embeddings). The result stays where `outputs` put it.
    """
    was_training = model.training
    model.eval()
    out = None
    try:
        for batch in train_batches(ctx, split=split):
            with ctx.meter.measure("selection", (tag, tuple(batch.x.shape)), examples=len(batch.y)):
                values = outputs(model, batch)
            if out is None:
                n = len(split if split is not None else ctx.data.train)
                out = values.new_empty((n, *values.shape[1:]))
            out[batch.index.to(values.device)] = values
    finally:
        model.train(was_training)
    return out


def embedding_pass(model: torch.nn.Module, ctx: RunContext, tag: str = "embedding-pass",
                   split: TensorSplit | StreamingSplit | None = None) -> torch.Tensor:
    """Penultimate embeddings of every example of the split [N, d] (eval mode, un-augmented), metered
    as selection, on the training device."""
    return per_example_pass(model, ctx, tag, lambda m, batch: embed(m, batch.x).float(), split)
