"""GREATS's step cost by product form, its fidelity to the exact form, and where a run's charge goes.

`python -m benchmarks.tools.greats_speed [--tiny] [--out FILE.json]` measures, for each setup (the
Fashion-MNIST model after ~100 plain steps; ResNet-18 with the CIFAR stem at 32x32, at init):
- per product form (`all` = exact, the default; `last`; `sketch`; `last+sketch`, see the method's
  docstring): the median wall time of one GREATS step (select B = 2k, then train on k) over a plain
  step on the same B examples (perf's greats_step_over_plain_step), alternated A B C ... with the
  plain step so that a slow spell of the machine hits every contender, and the same ratio in FLOPs;
- the fidelity of each form against the exact form on the SAME candidates (the method's `fidelity`:
  overlap of the kept sets, Spearman of the first-order scores, the exact second-order gain of each
  kept set), averaged over a few candidate batches;
- the breakdown of one exact step (FLOPs and seconds): the candidate pass, the products, the greedy,
  the training step on k, against a plain step on k (what `full` takes at each step) and on B.
  `run_over_full` = one GREATS step over one plain step on k: what a whole run under
  budget = iterations (same step count as full, the online sweeps' setting) charges over full's
  compute; it is exactly 2x `flops_over_plain` (FLOPs are linear in the batch, and perf's plain step
  runs on the B = 2k candidates).
Threads: run with OMP_NUM_THREADS=1 on a shared machine. The measured method is reached through the
registry (the harness never imports a method's module).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.api import Step
from benchmarks.core.compute import count_flops
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import build_context
from benchmarks.core.train import Trainer
from benchmarks.kit.ghost import has_batchnorm
from benchmarks.tools.perf import alternate

METHOD = "greats"
FAST_FORM_GOAL = 1.3  # issue 24: a fast form's step within 1.3x a plain step on the same candidates
FORMS = {"all": {}, "last": {"products": "last"}, "sketch": {"sketch": 16},
         "last+sketch": {"products": "last", "sketch": 16}}
# name -> protocol, overrides, plain warm-up steps, timing repeats, candidate batches for fidelity
SETUPS = {
    "fashion-mnist": ("fashion-mnist", {"train_subset": 25600, "holdout": 64}, 100, 5, 3),
    "resnet18": ("cifar10", {"dataset": "synthetic", "holdout": 64,
                             "data_kwargs": {"n_train": 1024, "n_test": 64, "num_classes": 10, "size": 32,
                                             "channels": 3}}, 0, 2, 1),
}
TINY = {"smoke": ("smoke", {"holdout": 64}, 4, 1, 1)}


def _timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    def measure() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started
    return measure


def _warm_model(ctx, steps: int) -> torch.nn.Module:
    """A model `steps` plain steps into training (one epoch of the protocol's training subset)."""
    model = ctx.new_model("greats-speed")
    if steps:
        Trainer(ctx, model, create_method("full"), evaluate=False, epochs=1).fit()
    return model


def _step_pieces(method, batch, model, step) -> dict[str, Callable[[], object]]:
    """The pieces of one exact GREATS selection, each runnable alone (the products need the capture)."""
    n = len(batch.y)
    one_pass = method.hparams["one_pass"] and not has_batchnorm(model)
    held = {}

    def candidate_pass():
        held["captured"] = method.candidate_pass(batch, model, step, one_pass)

    def products():
        held["products"] = method.products(held["captured"], n, model, step.step)

    def greedy():
        values, interactions, _ = held["products"]
        method.pick(values, interactions, method.kept(batch), step.lr)

    return {"candidate_pass": candidate_pass, "products": products, "greedy": greedy}


def measure_setup(name: str, protocol: str, overrides: dict, warm_steps: int, repeats: int,
                  fidelity_batches: int, log: Callable[[str], None] = print) -> dict:
    ctx = build_context(apply_overrides(load_protocol(protocol), overrides), 0, log=lambda *a: None)
    k = ctx.protocol.batch_size
    b = 2 * k  # GREATS's default candidate_factor
    log(f"{name}: warming the model for {warm_steps} plain steps ...")
    warm = _warm_model(ctx, warm_steps)
    order = torch.randperm(ctx.num_train, generator=torch.Generator().manual_seed(1))
    batches = [next(iter(ctx.data.train.batches(order[i * b:(i + 1) * b], b)))
               for i in range(max(1, fidelity_batches))]
    batch = batches[0]
    step = Step(epoch=0, step=warm_steps, lr=ctx.protocol.lr, progress=0.5, autocast=nullcontext)

    methods, trainers = {}, {}
    for form, params in FORMS.items():
        methods[form] = create_method(METHOD, **params)
        methods[form].setup(ctx)
        trainers[form] = Trainer(ctx, copy.deepcopy(warm), methods[form], evaluate=False)
    plain = Trainer(ctx, copy.deepcopy(warm), create_method("full"), evaluate=False)

    fidelity = {}
    for form, method in methods.items():
        log(f"{name}: fidelity of '{form}' ...")
        reports = [method.fidelity(candidates, copy.deepcopy(warm), step) for candidates in batches]
        fidelity[form] = {key: statistics.fmean(r[key] for r in reports) for key, value in reports[0].items()
                          if not isinstance(value, list)}

    def greats_step(form: str) -> Callable[[], None]:
        def run() -> None:
            trainer = trainers[form]
            selected, selection = trainer._select(batch, step)
            trainer._step(selected, step, selection)
        return run

    def plain_step() -> None:
        plain._step(batch, step)

    log(f"{name}: counting FLOPs ...")
    flops = {form: count_flops(greats_step(form))[0] for form in FORMS}  # also warms up
    flops["plain"] = count_flops(plain_step)[0]
    log(f"{name}: timing {repeats} alternated repeats ...")
    contenders = {"plain": _timed(plain_step, ctx.device)}
    contenders.update({form: _timed(greats_step(form), ctx.device) for form in FORMS})
    medians = alternate(contenders, repeats)

    # The breakdown of one exact step, on a fresh copy of the warm model (no optimiser step in between).
    exact, model = create_method(METHOD), copy.deepcopy(warm)
    exact.setup(ctx)
    pieces = _step_pieces(exact, batch, model, step)
    kept = batch.take(torch.arange(k))
    train_k = Trainer(ctx, copy.deepcopy(warm), create_method("full"), evaluate=False)
    breakdown_flops, breakdown_seconds = {}, {}
    for piece, fn in pieces.items():
        breakdown_flops[piece] = count_flops(fn)[0]
    breakdown_flops["train_step_k"] = count_flops(lambda: train_k._step(kept, step))[0]
    timers = {piece: _timed(fn, ctx.device) for piece, fn in pieces.items()}
    timers["train_step_k"] = _timed(lambda: train_k._step(kept, step), ctx.device)
    breakdown_seconds = alternate(timers, repeats)
    plain_k = breakdown_flops["train_step_k"]
    greats_exact = flops["all"]
    breakdown = {
        "flops": breakdown_flops, "seconds": breakdown_seconds,
        "flops_over_plain_k": {piece: f / plain_k for piece, f in breakdown_flops.items()},
        "plain_b_over_plain_k": flops["plain"] / plain_k,
        "run_over_full": greats_exact / plain_k,
    }
    forms = {form: {"step_over_plain": medians[form] / medians["plain"], "step_ms": 1000 * medians[form],
                    "flops_over_plain": flops[form] / flops["plain"], "flops_over_plain_k": flops[form] / plain_k,
                    "fidelity": fidelity[form], "params": FORMS[form]} for form in FORMS}
    return {"plain_step_ms": 1000 * medians["plain"], "k": k, "candidates": b, "warm_steps": warm_steps,
            "repeats": repeats, "fidelity_batches": len(batches), "device": str(ctx.device),
            "threads": torch.get_num_threads(), "forms": forms, "breakdown": breakdown}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.greats_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the smoke protocol, one repeat (a test)")
    parser.add_argument("--only", action="append", choices=sorted(SETUPS), help="measure only these setups")
    parser.add_argument("--out", default="results/greats_speed.json", help="where to write the results (JSON)")
    parser.add_argument("--merge-into", metavar="PERF_JSON", help="also merge each form's step ratio into this "
                        "perf.json, as greats_step_over_plain/<setup>/<form> (`nox -s perf`: results/perf.json)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    setups = TINY if args.tiny else {name: SETUPS[name] for name in (args.only or SETUPS)}
    results = {}
    for name, setup in setups.items():
        results[name] = measure_setup(name, *setup, log=lambda line: print(line, flush=True))
        for form, row in results[name]["forms"].items():
            f = row["fidelity"]
            print(f"  {name} {form}: step {row['step_over_plain']:.2f}x plain (FLOPs {row['flops_over_plain']:.2f}x); "
                  f"overlap {f['overlap']:.2f}, spearman {f['spearman']:.3f}, gain {f['gain_fast']:.4g} vs exact "
                  f"{f['gain_exact']:.4g} (random {f['gain_random']:.4g})", flush=True)
        print(f"  {name} breakdown (FLOPs over a plain step on k): "
              f"{json.dumps(results[name]['breakdown']['flops_over_plain_k'])}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setups": results}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if args.merge_into:
        perf = Path(args.merge_into)
        ratios = json.loads(perf.read_text()) if perf.exists() else {}
        ratios.update({f"greats_step_over_plain/{name}/{form}": float(f"{row['step_over_plain']:.4g}")
                       for name, result in results.items() for form, row in result["forms"].items()})
        perf.parent.mkdir(parents=True, exist_ok=True)
        perf.write_text(json.dumps(ratios, indent=1, sort_keys=True) + "\n")
        print(f"merged the step ratios into {perf} (goal for a fast form: <= {FAST_FORM_GOAL} a plain step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
