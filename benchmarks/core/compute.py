"""The compute meter: the FLOPs a run executes, measured, by purpose.

Every pass the trainer or a method runs goes through `meter.measure(purpose, key)`. The first
time a key is seen, the block runs under torch.utils.flop_counter's FlopCounterMode and its
count is stored; later blocks with the same key are charged that figure without counting, so
measuring stays out of the hot path after a shape's first step. A key names the pass and
everything its FLOPs depend on (the pass, the model, the batch shape); two passes that can differ
in cost must not share a key.

What is counted is what FlopCounterMode counts (matrix multiplies, convolutions, attention, in the
forward and in the backward as autograd runs it, so a first conv without an input gradient
costs less than "3 x forward") plus matrix-vector products and dot products (EXTRA_FLOPS), which
greedy coreset selection runs. Elementwise work (activations, normalisation, optimiser updates)
counts zero, as in the papers' FLOP figures.

Blocks nest: a block's own figure excludes what the blocks opened inside it charged, so nothing
is charged twice. A cost measured elsewhere (a cached score file holds what computing it cost) is
charged with `charge_flops`.

Artefacts: the selection work a run shares with other runs through the cache (a proxy, a score
file) is also listed, as {key, flops} pieces (`note_artefact`; benchmarks/kit/proxies.py notes them
when it saves or charges a cache file), so that a table can show what a run costs when that work
is paid once across the runs that share it (the amortised figure). The listing changes no charge.

Purposes: "train" (the steps that update the model being evaluated), "selection" (everything
spent to choose data: proxy training, scoring passes, candidate passes, a prior's inference) and
"eval" (the protocol's evaluation passes, kept out of the compared compute).

The invariant, tested over the whole registry: the meter's train + selection + eval equals a
FlopCounterMode count (with EXTRA_FLOPS) of the whole run.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

PURPOSES = ("train", "selection", "eval")
MEASUREMENT = ("measured: torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention, forward and "
               "backward as run; plus mv and dot), once per distinct pass and shape")

_aten = torch.ops.aten


def _mv_flops(matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix_shape[0] * matrix_shape[1]


def _addmv_flops(bias_shape, matrix_shape, vector_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * matrix_shape[0] * matrix_shape[1]


def _dot_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0]


EXTRA_FLOPS = {_aten.mv: _mv_flops, _aten.addmv: _addmv_flops, _aten.dot: _dot_flops, _aten.vdot: _dot_flops}


def flop_counter() -> FlopCounterMode:
    """The counter the meter measures with (and the one to check it against)."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)


@contextmanager
def unmetered() -> Iterator[None]:
    """Run bookkeeping that is no method's work (probing the reference's cost) invisibly to every
    active counter, this meter's and any outer FlopCounterMode."""
    with _disable_current_modes():
        yield


def count_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs of fn(*args), its result), counted in isolation from any active counter."""
    with unmetered(), flop_counter() as counter:
        result = fn(*args, **kwargs)
    return counter.get_total_flops(), result


@dataclass
class _Open:
    """A measure block in progress."""

    counter: FlopCounterMode | None  # None: the key's figure is known, nothing is counted
    nested: int = 0  # what blocks opened inside this one charged (their ops are in our counter too)


@dataclass
class ComputeMeter:
    flops: dict = field(default_factory=lambda: dict.fromkeys(PURPOSES, 0))
    examples: dict = field(default_factory=lambda: dict.fromkeys(PURPOSES, 0))
    # key -> measured FLOPs. Not checkpointed: a resumed run measures a key again, with the same result.
    figures: dict = field(default_factory=dict)
    # {"key", "flops"} per piece of shared (cached) work this run charged, in order (module docstring).
    artefacts: list = field(default_factory=list)
    _open: list = field(default_factory=list, repr=False)
    _synced: dict | None = field(default=None, repr=False)  # the global totals at the last sync (data parallel)
    _paused: int = field(default=0, repr=False)  # > 0: inside `paused()`

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work that is no charge of this run (a method's `setup` rebuilding, on a resume, what was charged
        before the checkpoint): blocks inside measure nothing, store no figure and charge nothing."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def measure(self, purpose: str, key: Hashable, examples: int = 0) -> Iterator[None]:
        """Charge the FLOPs of the block to `purpose`: counted the first time `key` is seen, reused after."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose '{purpose}'")
        if self._paused:
            yield
            return
        known = key in self.figures
        block = _Open(None if known else flop_counter())
        self._open.append(block)
        try:
            if block.counter is None:
                yield
            else:
                with block.counter:
                    yield
        finally:
            self._open.pop()
        if not known:  # only a block that ran to its end is measured
            self.figures[key] = block.counter.get_total_flops() - block.nested
        self._charge(purpose, self.figures[key], examples)
        if self._open:
            self._open[-1].nested += self.figures[key]

    def charge_flops(self, purpose: str, flops: int, examples: int = 0) -> None:
        """Charge a cost measured elsewhere (a cached artefact holds what computing it cost)."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose '{purpose}'")
        if not self._paused:
            self._charge(purpose, int(flops), examples)

    def note_artefact(self, key: str, flops: int) -> None:
        """List `flops` of the selection charged so far as the work of the shared artefact `key` (no charge)."""
        if not self._paused:
            self.artefacts.append({"key": str(key), "flops": int(flops)})

    def _charge(self, purpose: str, flops: int, examples: int) -> None:
        self.flops[purpose] += flops
        self.examples[purpose] += int(examples)

    def sync(self, dist) -> None:
        """Data parallel: add every rank's charges since the last sync to the global totals, on every rank.

        A collective: all ranks call it at the same points. Afterwards `flops` and `examples` hold the
        global work, counted once, identical on every rank.
        """
        if dist is None:
            return
        synced = self._synced or {"flops": dict.fromkeys(PURPOSES, 0), "examples": dict.fromkeys(PURPOSES, 0)}
        local = [self.flops[p] - synced["flops"][p] for p in PURPOSES] + \
                [self.examples[p] - synced["examples"][p] for p in PURPOSES]
        total = dist.sum(local)
        for i, purpose in enumerate(PURPOSES):
            self.flops[purpose] = synced["flops"][purpose] + total[i]
            self.examples[purpose] = synced["examples"][purpose] + total[len(PURPOSES) + i]
        self._synced = {"flops": dict(self.flops), "examples": dict(self.examples)}

    @property
    def total(self) -> int:
        """The compared compute: train + selection (evaluation is the same for every method)."""
        return self.flops["train"] + self.flops["selection"]

    def state_dict(self) -> dict:
        return {"flops": dict(self.flops), "examples": dict(self.examples),
                "artefacts": [dict(piece) for piece in self.artefacts]}

    @classmethod
    def from_state(cls, state: dict) -> ComputeMeter:
        """A meter from a checkpoint (taken after a sync: global totals, the same for every rank)."""
        meter = cls(dict(state["flops"]), dict(state["examples"]),
                    artefacts=[dict(piece) for piece in state.get("artefacts", [])])  # older checkpoints: none
        meter._synced = {"flops": dict(meter.flops), "examples": dict(meter.examples)}
        return meter


def compute_summary(meter: ComputeMeter, full_flops: int, reference: str) -> dict:
    total = meter.total
    fraction = total / full_flops if full_flops else float("nan")
    return {
        "train_flops": meter.flops["train"],
        "selection_flops": meter.flops["selection"],
        "total_flops": total,
        "eval_flops": meter.flops["eval"],
        "full_flops": full_flops,
        "reference": reference,
        "fraction": fraction,
        "saved": 1 - fraction,
        "selection_share": meter.flops["selection"] / total if total else 0.0,
        "train_examples": meter.examples["train"],
        "measurement": MEASUREMENT,
        "artefacts": [dict(piece) for piece in meter.artefacts],
    }
