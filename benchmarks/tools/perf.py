"""Speed ratios, each measured side by side in one process on this machine (`nox -s perf`).

- harness_step_over_bare: the harness's training step time over a bare PyTorch loop (same model,
  batch, in-memory data, same per-batch uint8 -> float conversion; no augmentation in either).
  Goal <= 1.05.
- pipeline_over_dataloader: the harness's input pipeline (uint8 tensors, batched crop + flip on the
  device) over torchvision's DataLoader with PIL transforms (2 workers), images per second.
  Goal >= 3.
- infobatch_epoch_over_uniform_epoch: InfoBatch's training seconds per visited example over
  uniform-epoch's at the same visited share. Goal <= 1.02.
- grand_loop_over_batched: GraNd (all parameters) by a Python loop of single-example gradients over
  the batched per-example gradient norms, same 256 examples. Goal >= 10 (a GPU goal: on 2 CPU cores
  the batched forward/backward alone costs about what the loop does).
- greats_step_over_plain_step: one GREATS step (B = 2k candidates and 2 validation examples in one
  eval-mode forward/backward, the Gram products, the greedy pick of k, then the train-mode step on
  the k) over one plain training step on the same B examples, on the fashion-mnist model. Goal <= 1.3.
- greats_step_over_plain_step_resnet18: the same for ResNet-18 (CIFAR stem) at 32x32, batch 128.
  Goal <= 1.3. Both also report the FLOP ratio, measured with the meter's counter: that one is a
  property of the algorithm, not of the machine.
- ghost_over_materialised, ghost_over_materialised_resnet18: the Gram products of a GREATS step by
  the per-layer cost rule (benchmarks/ghost.py, "auto") over the same products from materialised
  per-example gradients in every layer (the capture pass, the same for both, excluded). Goal <= 1.
Then the selection cost of each score method at its defaults, as a share of one full-data run.

Repeats alternate the contenders (A B A B ...) and report the ratio of medians, so a slow spell of
the machine hits both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.core.compute import ComputeMeter
from benchmarks.core.protocol import load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, execute
from benchmarks.core.train import RunContext, Trainer
from benchmarks.data import load_data, restrict_train

GOALS = {"harness_step_over_bare": ("<=", 1.05), "pipeline_over_dataloader": (">=", 3.0),
         "infobatch_epoch_over_uniform_epoch": ("<=", 1.02), "grand_loop_over_batched": (">=", 10.0),
         "greats_step_over_plain_step": ("<=", 1.3), "greats_step_over_plain_step_resnet18": ("<=", 1.3),
         "ghost_over_materialised": ("<=", 1.0), "ghost_over_materialised_resnet18": ("<=", 1.0)}


def _alternate(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each contender's measurement, measured in alternation."""
    samples = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, measure in contenders.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


def harness_step_over_bare(n_examples: int = 8192, repeats: int = 5) -> dict:
    protocol = load_protocol("fashion-mnist").replace(augment=[], epochs=1)
    data = restrict_train(load_data("fashion-mnist"), n_examples)
    ctx = RunContext(protocol, data, torch.device("cpu"), ComputeMeter(), seed=0, log=lambda *a: None)
    model = ctx.new_model("perf")
    batch_size = protocol.batch_size
    steps = -(-n_examples // batch_size)

    def harness() -> float:
        trainer = Trainer(ctx, model, create_method("full"), evaluate=False)
        started = time.perf_counter()
        trainer.run_epoch(0)
        return (time.perf_counter() - started) / steps

    def bare() -> float:
        optimizer = torch.optim.SGD(model.parameters(), lr=protocol.lr, momentum=0.9, nesterov=True,
                                    weight_decay=protocol.weight_decay)
        images, labels = data.train.images, data.train.labels
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n_examples)
        for start in range(0, n_examples, batch_size):
            index = order[start:start + batch_size]
            x = data.train.normalize(images[index])
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=protocol.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - started) / steps

    medians = _alternate({"harness": harness, "bare": bare}, repeats)  # the first pair warms up too
    return {"ratio": medians["harness"] / medians["bare"], "harness_step_ms": 1000 * medians["harness"],
            "bare_step_ms": 1000 * medians["bare"]}


def pipeline_over_dataloader(n_examples: int = 20000, repeats: int = 3) -> dict:
    import torchvision.transforms as T
    from PIL import Image

    protocol = load_protocol("fashion-mnist")
    data = restrict_train(load_data("fashion-mnist"), n_examples)
    split = data.train
    batch_size = protocol.batch_size
    pad = protocol.crop_padding
    (mean,), (std,) = split.stats

    class PILDataset(torch.utils.data.Dataset):
        transform = T.Compose([T.RandomCrop(28, padding=pad), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize((mean,), (std,))])

        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(split.images[i, 0].numpy(), mode="L")), int(split.labels[i])

    def harness() -> float:
        started = time.perf_counter()
        for batch in split.batches(torch.randperm(len(split)), batch_size, augment=["crop", "flip"], padding=pad,
                                   generator=torch.Generator().manual_seed(0)):
            batch.x.sum()
        return len(split) / (time.perf_counter() - started)

    def dataloader() -> float:
        loader = torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, num_workers=2)
        started = time.perf_counter()
        for x, _ in loader:
            x.sum()
        return len(split) / (time.perf_counter() - started)

    medians = _alternate({"harness": harness, "dataloader": dataloader}, repeats)
    return {"ratio": medians["harness"] / medians["dataloader"], "harness_images_per_s": medians["harness"],
            "dataloader_images_per_s": medians["dataloader"]}


def infobatch_epoch_over_uniform_epoch(n_examples: int = 10000, epochs: int = 4, repeats: int = 2) -> dict:
    """Seconds per visited example, epoch 1 dropped from both (it is full data for InfoBatch)."""
    overrides = {"epochs": epochs, "train_subset": n_examples}

    def seconds_per_example(record: dict) -> float:
        rows = record["curve"]
        return (rows[-1]["seconds"] - rows[0]["seconds"]) / sum(r["examples"] for r in rows[1:])

    def run(method: str, params: dict, out: str) -> dict:
        return execute(RunSpec("fashion-mnist", method, params, 0, overrides), out, log=lambda *a: None,
                       progress=False, force=True)

    ratios = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            infobatch = run("infobatch", {"prune_ratio": 0.5}, out)
            rows = infobatch["curve"][1:]
            kept = sum(r["examples"] for r in rows) / (len(rows) * n_examples)
            uniform = run("uniform-epoch", {"fraction": kept}, out)
            ratios.append(seconds_per_example(infobatch) / seconds_per_example(uniform))
    return {"ratio": statistics.median(ratios), "visited_share": kept}


def grand_loop_over_batched(n_examples: int = 256, repeats: int = 3, threads: int | None = 1) -> dict:
    """GraNd on the same examples: a loop of single-example gradients over benchmarks.kit.pergrad's batched norms.

    Fashion-MNIST's small-cnn in eval mode (as GraNd scores), all parameters. `threads` pins torch's
    intra-op threads while measuring: on a shared machine the loop's tiny ops stall on busy OpenMP
    threads, which inflates the ratio many times over; None keeps the default.
    """
    from benchmarks.kit.pergrad import per_example_grad_norms

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    protocol = load_protocol("fashion-mnist")
    data = restrict_train(load_data("fashion-mnist"), n_examples)
    ctx = RunContext(protocol, data, torch.device("cpu"), ComputeMeter(), seed=0, log=lambda *a: None)
    model = ctx.new_model("perf").eval()
    x, y = data.train.normalize(data.train.images), data.train.labels
    params = [p for p in model.parameters() if p.requires_grad]

    def loop() -> float:
        started = time.perf_counter()
        norms = []
        for i in range(n_examples):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
            norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
        torch.stack(norms)
        return time.perf_counter() - started

    def batched() -> float:
        started = time.perf_counter()
        per_example_grad_norms(model, x, y)
        return time.perf_counter() - started

    try:
        batched()  # one warm-up call each, outside the timing
        loop()
        medians = _alternate({"loop": loop, "batched": batched}, repeats)
    finally:
        torch.set_num_threads(previous)
    return {"ratio": medians["loop"] / medians["batched"], "loop_s": medians["loop"],
            "batched_s": medians["batched"], "threads": threads or previous}


# -- online selection: a GREATS step and its products ----------------------------------------------

# protocol, overrides: the fashion-mnist model on real data; ResNet-18 at 32x32 on synthetic images of
# CIFAR's shape (the cost of a step does not depend on the pixels), each with a held-out split for GREATS.
ONLINE_SETUPS = {
    "fashion-mnist": ("fashion-mnist", {"train_subset": 4096, "holdout": 64}),
    "resnet18": ("cifar10", {"dataset": "synthetic", "holdout": 64,
                             "data_kwargs": {"n_train": 1024, "n_test": 64, "num_classes": 10, "size": 32,
                                             "channels": 3}}),
}


def _online_step_setup(setup: str):
    from benchmarks.core.protocol import apply_overrides
    from benchmarks.core.run import build_context

    name, overrides = ONLINE_SETUPS[setup]
    ctx = build_context(apply_overrides(load_protocol(name), overrides), 0, log=lambda *a: None)
    b = 2 * ctx.protocol.batch_size  # GREATS's default candidate_factor
    batch = next(iter(ctx.data.train.batches(torch.arange(b), b)))
    return ctx, batch


def _greats_step_ratio(setup: str, repeats: int) -> dict:
    from benchmarks.api import Step
    from benchmarks.core.compute import count_flops

    ctx, batch = _online_step_setup(setup)
    greats = create_method("greats")
    greats.ctx = ctx
    trainers = {"greats": Trainer(ctx, ctx.new_model("perf"), greats, evaluate=False),
                "plain": Trainer(ctx, ctx.new_model("perf"), create_method("full"), evaluate=False)}
    step = Step(epoch=0, step=0, lr=ctx.protocol.lr, progress=0.0, autocast=trainers["greats"].autocast)

    def greats_step() -> None:
        trainer = trainers["greats"]
        selected, selection = trainer._select(batch, step)
        trainer._step(selected, step, selection)

    def plain_step() -> None:
        trainers["plain"]._step(batch, step)

    def timed(fn) -> Callable[[], float]:
        def measure() -> float:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started
        return measure

    flops = {"greats": count_flops(greats_step)[0], "plain": count_flops(plain_step)[0]}  # also warms up
    medians = _alternate({"greats": timed(greats_step), "plain": timed(plain_step)}, repeats)
    return {"ratio": medians["greats"] / medians["plain"], "greats_step_ms": 1000 * medians["greats"],
            "plain_step_ms": 1000 * medians["plain"], "flops_ratio": flops["greats"] / flops["plain"],
            "candidates": len(batch.y)}


def greats_step_over_plain_step(repeats: int = 5) -> dict:
    return _greats_step_ratio("fashion-mnist", repeats)


def greats_step_over_plain_step_resnet18(repeats: int = 3) -> dict:
    return _greats_step_ratio("resnet18", repeats)


def _ghost_ratio(setup: str, repeats: int) -> dict:
    from benchmarks.kit.ghost import capture, gram

    ctx, batch = _online_step_setup(setup)
    model = ctx.new_model("perf").eval()  # the BatchNorm rule: products from running statistics
    x = torch.cat([batch.x, batch.x[:2]])  # B candidates + 2 validation examples, as in a GREATS step
    y = torch.cat([batch.y, batch.y[:2]])
    captured = capture(model, x, y)

    def products(form: str) -> Callable[[], float]:
        def measure() -> float:
            started = time.perf_counter()
            gram(captured, form)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - started
        return measure

    _, used = gram(captured, "auto")  # warm-up
    medians = _alternate({"auto": products("auto"), "materialise": products("materialise")}, repeats)
    return {"ratio": medians["auto"] / medians["materialise"], "auto_ms": 1000 * medians["auto"],
            "materialised_ms": 1000 * medians["materialise"], "ghost_weights": used["ghost"],
            "materialised_weights": used["materialise"]}


def ghost_over_materialised(repeats: int = 5) -> dict:
    return _ghost_ratio("fashion-mnist", repeats)


def ghost_over_materialised_resnet18(repeats: int = 2) -> dict:
    return _ghost_ratio("resnet18", repeats)


def per_example_costs(model: torch.nn.Module, shape: tuple, classes: int) -> dict:
    """FLOPs per example, measured with the meter's counter on a batch of 2: a training step, a forward
    pass, a GraNd pass (all FLOP counts are linear in the batch size)."""
    from benchmarks.core.compute import count_flops
    from benchmarks.kit.pergrad import per_example_grad_norms

    x, y = torch.randn(2, *shape), torch.arange(2) % classes

    def step():
        F.cross_entropy(model(x), y).backward()

    model.train()
    costs = {"step": count_flops(step)[0] // 2}
    model.eval()
    with torch.no_grad():
        costs["forward"] = count_flops(model, x)[0] // 2
    costs["grand"] = count_flops(per_example_grad_norms, model, x, y)[0] // 2
    return costs


def scoring_costs(protocols: tuple = ("fashion-mnist", "datadiet-cifar10", "forgetting-cifar10")) -> dict:
    """Selection FLOPs of each score method at its defaults (10 proxy runs, fraction 0.5), as a share of
    one full-data run: an estimate from per-example costs measured with the meter's counter, nothing
    trained. Runs record the metered figure; class sizes are taken as balanced (true of Fashion-MNIST
    and CIFAR)."""
    from benchmarks.core.models import create_model
    from benchmarks.core.registry import method_class
    from benchmarks.kit.scoring import early_epoch

    datasets = {"fashion-mnist": (60000, (1, 28, 28), 10), "cifar10": (50000, (3, 32, 32), 10),
                "cifar100": (50000, (3, 32, 32), 100)}
    shares = {}
    for name in protocols:
        protocol = load_protocol(name)
        n, shape, classes = datasets[protocol.dataset]
        n = min(n, protocol.train_subset) if protocol.train_subset else n
        model = create_model(protocol.model, in_chans=shape[0], num_classes=classes, **protocol.model_kwargs)
        cost = per_example_costs(model, shape, classes)
        runs = method_class("el2n").params["score_runs"].default
        early, epochs = early_epoch(protocol.epochs), protocol.epochs
        k = n // 2
        greedy = 2 * model.num_features * k * n / classes  # one mv per pick over each class's members
        per_method = {
            "el2n": runs * n * (early * cost["step"] + cost["forward"]),
            "grand": runs * n * cost["grand"],
            "grand-lastlayer": runs * n * cost["forward"],
            "forgetting": runs * n * epochs * cost["step"],
            "kcenter": n * (early * cost["step"] + cost["forward"]) + greedy,
        }
        per_method["ccs"], per_method["herding"] = per_method["el2n"], per_method["kcenter"]
        full = n * epochs * cost["step"]
        for method, flops in per_method.items():
            shares[f"{name}/{method}"] = flops / full
            print(f"  {name:<20} {method:<16} selection = {flops / full:7.3f} x a full-data run")
    return shares


MEASUREMENTS = {"harness_step_over_bare": harness_step_over_bare,
                "pipeline_over_dataloader": pipeline_over_dataloader,
                "infobatch_epoch_over_uniform_epoch": infobatch_epoch_over_uniform_epoch,
                "grand_loop_over_batched": grand_loop_over_batched,
                "greats_step_over_plain_step": greats_step_over_plain_step,
                "greats_step_over_plain_step_resnet18": greats_step_over_plain_step_resnet18,
                "ghost_over_materialised": ghost_over_materialised,
                "ghost_over_materialised_resnet18": ghost_over_materialised_resnet18}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/perf.json", help="where to write name -> ratio (JSON)")
    parser.add_argument("--only", action="append", choices=sorted(MEASUREMENTS), help="measure only these")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results, details = {}, {}
    for name in args.only or MEASUREMENTS:
        print(f"measuring {name} ...", flush=True)
        detail = MEASUREMENTS[name]()
        results[name] = round(detail["ratio"], 4)
        details[name] = detail
        op, goal = GOALS[name]
        met = detail["ratio"] <= goal if op == "<=" else detail["ratio"] >= goal
        extras = ", ".join(f"{k}={v:.4g}" for k, v in detail.items() if k != "ratio")
        print(f"  {name} = {detail['ratio']:.3f} (goal {op} {goal}: {'met' if met else 'NOT met'}; {extras})",
              flush=True)
    if not args.only:
        print("scoring cost at default settings (selection FLOPs / one full-data run):", flush=True)
        for key, share in scoring_costs().items():
            results[f"scoring_cost/{key}"] = round(share, 4)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing.update(results)
    out.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
