"""Speed ratios, each measured side by side in one process on this machine (`nox -s perf`).

The harness and the kit:
- harness_step_over_bare: the harness's training step time over a bare PyTorch loop (same model,
  batch, in-memory data, same per-batch uint8 -> float conversion; no augmentation in either).
  Goal <= 1.05.
- pipeline_over_dataloader: the harness's input pipeline (the trainer's batches: uint8 tensors,
  batched crop + flip on the device) over torchvision's DataLoader with PIL transforms (2 workers),
  images per second. Goal >= 3.
- imagenet_loader_images_per_core: ImageNet-like JPEGs (500x375 and 375x500, about 120 KB at
  quality 90; benchmarks/tools/imagenet_like.py) through the streaming training loader (StreamingSplit
  of the image-folder dataset: RandomResizedCrop 224 + flip + ToTensor + Normalize in 1, then 2
  workers) over a plain torchvision ImageFolder DataLoader with the same transforms and workers,
  images/s per worker-core at 1 worker. Goal >= 0.95 (not slower than the plain loader). Also
  reported: both per core at 2 workers (where there are 2 cores), decode = "gpu"'s images/s on this
  machine's device (on a machine without CUDA a CPU figure: one main-process thread decodes, one
  worker reads), and cores_per_gpu_at_2500_img_s = 2500 / the streaming loader's images/s per core,
  the cores a ResNet-50 at 2,500 images/s needs on the CPU path.
- pergrad_loop_over_batched: per-example gradient norms (all parameters) by a Python loop of
  single-example gradients over benchmarks.kit.pergrad's batched norms, same 256 examples.
  Goal >= 10 (a GPU goal: on 2 CPU cores the batched forward/backward alone costs about what the
  loop does).
- ghost_over_materialised, ghost_over_materialised_resnet18: the Gram products of an online step
  (2 x batch-size candidates and 2 validation examples) by the per-layer cost rule of
  benchmarks/kit/ghost.py ("auto") over the same products from materialised per-example gradients
  in every layer (the capture pass, the same for both, excluded). Goal <= 1.

Start-up (seconds, not ratios; the "ratio" entry of results/perf.json holds the seconds):
- status_startup_s, tables_startup_s: wall-clock of `python -m benchmarks status DIR` and `tables --runs DIR`
  on 40 published records, with `python -c "import torch"` timed beside them (import_torch_s).
  Goals: status <= 0.5 s, tables <= 1 s (tables imports pandas; neither imports torch).

Per method, for the methods named on the command line (the perf session in noxfile.py names them;
this module names none). Each runs through the public run path (`execute`, at the method's
defaults), against the protocol's reference method run the same way:
- epoch_over_reference/<method> (--epoch-method, a method that plans its epochs): its training
  seconds per visited example over the reference's, trained on a fixed subset of the size the
  method visits per epoch. The first epoch is dropped from both (it holds the one-off FLOP
  measurements, and is full data for a pruning schedule). Goal <= 1.02.
- step_over_reference_step/<method> (--step-method, a method that selects online): one of its
  training steps (B candidates, the selection, the step on the k kept) over one reference step on
  B examples (the reference run with batch size B, so both take the same steps), on the
  fashion-mnist model. Goal <= 1.3.
- step_over_reference_step_resnet18/<method>: the same for ResNet-18 (CIFAR stem) at 32x32,
  batch 128. Goal <= 1.3. Both also report the FLOP ratio from the runs' meters: that one is a
  property of the algorithm, not of the machine.
- scoring_cost/fashion-mnist/<method> (--cost-method): the selection FLOPs of a run at the
  method's defaults as a share of one full-data run, as its record meters them, on a fixed subset
  of Fashion-MNIST (the share does not depend on the subset's size, but for a coreset's greedy
  term, which grows with it).

Repeats alternate the contenders (A B A B ...) and report the ratio of medians, so a slow spell of
the machine hits both sides.

--tiny runs every measurement at a tiny size on synthetic images of the same shapes, in seconds:
a test runs it, so that an API change breaks a test instead of this session. Its ratios mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.api import overrides as overrides_hook
from benchmarks.core.protocol import apply_overrides, load_protocol
from benchmarks.core.registry import create_method
from benchmarks.core.run import RunSpec, build_context, execute
from benchmarks.core.train import Trainer
from benchmarks.errors import BenchError

GOALS = {"harness_step_over_bare": ("<=", 1.05), "pipeline_over_dataloader": (">=", 3.0),
         "imagenet_loader_images_per_core": (">=", 0.95),
         "pergrad_loop_over_batched": (">=", 10.0),
         "ghost_over_materialised": ("<=", 1.0), "ghost_over_materialised_resnet18": ("<=", 1.0),
         "epoch_over_reference": ("<=", 1.02), "step_over_reference_step": ("<=", 1.3),
         "step_over_reference_step_resnet18": ("<=", 1.3),
         # seconds, not ratios: a command that only reads records must not pay torch's start-up
         "status_startup_s": ("<=", 0.5), "tables_startup_s": ("<=", 1.0)}
FASHION = "fashion-mnist"
TINY_BATCH = 16  # the batch size of every tiny measurement on the fashion-mnist model


def quiet(*_args, **_kwargs) -> None:
    pass


def alternate(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each contender's measurement, measured in alternation."""
    samples = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, measure in contenders.items():
            samples[name].append(measure())
    return {name: statistics.median(values) for name, values in samples.items()}


# -- where each measurement runs -------------------------------------------------------------------
# (protocol name, overrides). Tiny sizes swap the real data for synthetic images of the same shape:
# the cost of a step does not depend on the pixels, and a test then needs no dataset on disk.

def fashion_setup(tiny: bool, n: int, holdout: int = 0, **extra) -> tuple[str, dict]:
    """The fashion-mnist protocol on n training examples (after a held-out split of `holdout`)."""
    if tiny:
        data = {"n_train": n + holdout, "n_test": 32, "num_classes": 10, "size": 28, "channels": 1}
        overrides = {"dataset": "synthetic", "data_kwargs": data, "batch_size": TINY_BATCH}
    else:
        overrides = {"train_subset": n + holdout}
    if holdout:
        overrides["holdout"] = holdout
    return FASHION, {**overrides, **extra}


def resnet18_setup(tiny: bool, n: int, holdout: int = 0, **extra) -> tuple[str, dict]:
    """ResNet-18 (the cifar10 protocol) at 32x32 on synthetic images of CIFAR's shape."""
    data = {"n_train": n + holdout, "n_test": 8 if tiny else 64, "num_classes": 10, "size": 8 if tiny else 32,
            "channels": 3}
    overrides = {"dataset": "synthetic", "data_kwargs": data, **({"batch_size": 2} if tiny else {})}
    if holdout:
        overrides["holdout"] = holdout
    return "cifar10", {**overrides, **extra}


def context(setup: tuple[str, dict]):
    name, overrides = setup
    return build_context(apply_overrides(load_protocol(name), overrides), 0, log=quiet)


def reference_trainer(ctx, model: torch.nn.Module) -> Trainer:
    """A trainer of the protocol's reference method: the harness's plain training path."""
    return Trainer(ctx, model, create_method(ctx.protocol.reference), evaluate=False)


# -- the harness -----------------------------------------------------------------------------------

def harness_step_over_bare(tiny: bool = False) -> dict:
    n_examples, repeats = (4 * TINY_BATCH, 2) if tiny else (8192, 5)
    ctx = context(fashion_setup(tiny, n_examples, augment=[], epochs=1))
    protocol, train = ctx.protocol, ctx.data.train
    model = ctx.new_model("perf")
    batch_size = protocol.batch_size
    steps = -(-n_examples // batch_size)

    def harness() -> float:
        trainer = reference_trainer(ctx, model)
        started = time.perf_counter()
        trainer.run_epoch(0)
        return (time.perf_counter() - started) / steps

    def bare() -> float:
        optimizer = torch.optim.SGD(model.parameters(), lr=protocol.lr, momentum=0.9, nesterov=True,
                                    weight_decay=protocol.weight_decay)
        images, labels = train.images, train.labels.to(ctx.device)
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n_examples, device=images.device)
        for start in range(0, n_examples, batch_size):
            index = order[start:start + batch_size]
            x = train.normalize(images[index])
            loss = F.cross_entropy(model(x), labels[index], label_smoothing=protocol.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - started) / steps

    medians = alternate({"harness": harness, "bare": bare}, repeats)  # the first pair warms up too
    return {"ratio": medians["harness"] / medians["bare"], "harness_step_ms": 1000 * medians["harness"],
            "bare_step_ms": 1000 * medians["bare"]}


def pipeline_over_dataloader(tiny: bool = False) -> dict:
    import torchvision.transforms as T
    from PIL import Image

    n_examples, repeats = (4 * TINY_BATCH, 1) if tiny else (20000, 3)
    ctx = context(fashion_setup(tiny, n_examples))
    protocol, split = ctx.protocol, ctx.data.train
    trainer = reference_trainer(ctx, ctx.new_model("perf"))  # its batches are the harness's pipeline
    images, labels = split.images.cpu(), split.labels
    side = images.shape[-1]
    (mean,), (std,) = split.stats

    class PILDataset(torch.utils.data.Dataset):
        transform = T.Compose([T.RandomCrop(side, padding=protocol.crop_padding), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize((mean,), (std,))])

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(images[i, 0].numpy(), mode="L")), int(labels[i])

    def harness() -> float:
        started = time.perf_counter()
        for batch in trainer.batches(torch.randperm(len(split)), protocol.batch_size,
                                     torch.Generator().manual_seed(0)):
            batch.x.sum()
        return len(split) / (time.perf_counter() - started)

    def dataloader() -> float:
        loader = torch.utils.data.DataLoader(PILDataset(), batch_size=protocol.batch_size, shuffle=True,
                                             num_workers=2)
        started = time.perf_counter()
        for x, _ in loader:
            x.sum()
        return len(split) / (time.perf_counter() - started)

    medians = alternate({"harness": harness, "dataloader": dataloader}, repeats)
    return {"ratio": medians["harness"] / medians["dataloader"], "harness_images_per_s": medians["harness"],
            "dataloader_images_per_s": medians["dataloader"]}


GPU_IMAGES_PER_S = 2500  # a ResNet-50's training throughput on one modern GPU (mixed precision)


def imagenet_loader_images_per_core(tiny: bool = False) -> dict:
    """Images/s per worker-core of the streaming loader and of a plain ImageFolder DataLoader.

    Both read the same JPEGs with the same training transform and the same number of workers, and
    move each batch to the device; each pass is one epoch of N images in a fresh loader (its
    workers' start included, as every epoch of a run pays it). The main process keeps one thread, so
    that decode = "gpu" on a machine without CUDA is a one-core figure.
    """
    import os

    import torchvision

    from benchmarks.data import load_data
    from benchmarks.data.image_folder import options, transforms
    from benchmarks.tools.imagenet_like import write_image_folder

    n_images, batch_size, repeats = (8, 4, 1) if tiny else (1024, 64, 3)
    worker_counts = [1] if tiny or (os.cpu_count() or 1) < 2 else [1, 2]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def timed(epoch: Callable[[], None]) -> float:
        started = time.perf_counter()
        epoch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n_images / (time.perf_counter() - started)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as root:
            written = write_image_folder(Path(root), {"train": n_images, "val": 4})
            kilobytes = statistics.mean(path.stat().st_size for path in written["train"]) / 1000
            settings = {"root": root, "image_size": 224}
            train_transform, _ = transforms(options(settings))
            plain = torchvision.datasets.ImageFolder(str(Path(root) / "train"), transform=train_transform)

            def streaming(workers: int, decode: str = "cpu") -> Callable[[], float]:
                split = load_data("image-folder", None, {**settings, "num_workers": workers, "decode": decode})
                split = split.train.to(device)

                def epoch() -> None:
                    generator = torch.Generator().manual_seed(0)
                    order = torch.randperm(n_images, generator=generator)
                    for batch in split.batches(order, batch_size, augment=["crop", "flip"], generator=generator):
                        batch.x.sum()
                return lambda: timed(epoch)

            def image_folder(workers: int) -> Callable[[], float]:
                def epoch() -> None:
                    loader = torch.utils.data.DataLoader(plain, batch_size=batch_size, shuffle=True,
                                                         num_workers=workers, pin_memory=device.type == "cuda")
                    for x, y in loader:
                        x.to(device, non_blocking=True).sum()
                        y.to(device, non_blocking=True)
                return lambda: timed(epoch)

            contenders = {}
            for workers in worker_counts:
                contenders[f"streaming_{workers}"] = streaming(workers)
                contenders[f"image_folder_{workers}"] = image_folder(workers)
            contenders["decode_gpu"] = streaming(1, "gpu")
            medians = alternate(contenders, repeats)
    finally:
        torch.set_num_threads(previous)
    per_core = {name: medians[name] / int(name.rsplit("_", 1)[1]) for name in medians if name != "decode_gpu"}
    detail = {"ratio": per_core["streaming_1"] / per_core["image_folder_1"],
              "streaming_images_per_s_per_core": per_core["streaming_1"],
              "image_folder_images_per_s_per_core": per_core["image_folder_1"]}
    if 2 in worker_counts:
        detail.update(streaming_images_per_s_per_core_at_2_workers=per_core["streaming_2"],
                      image_folder_images_per_s_per_core_at_2_workers=per_core["image_folder_2"])
    detail[f"decode_gpu_on_{device.type}_images_per_s"] = medians["decode_gpu"]
    detail.update(cores_per_gpu_at_2500_img_s=GPU_IMAGES_PER_S / per_core["streaming_1"], jpeg_kb=kilobytes,
                  images=n_images)
    return detail


# -- the kit ---------------------------------------------------------------------------------------

def pergrad_loop_over_batched(tiny: bool = False, threads: int | None = 1) -> dict:
    """Per-example gradient norms on the same examples: a loop of single-example gradients over
    benchmarks.kit.pergrad's batched norms.

    Fashion-MNIST's small-cnn in eval mode (as a gradient-norm score is taken), all parameters.
    `threads` pins torch's intra-op threads while measuring: on a shared machine the loop's tiny ops
    stall on busy OpenMP threads, which inflates the ratio many times over; None keeps the default.
    """
    from benchmarks.kit.pergrad import per_example_grad_norms

    n_examples, repeats = (8, 1) if tiny else (256, 3)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    ctx = context(fashion_setup(tiny, n_examples))
    model = ctx.new_model("perf").eval()
    train = ctx.data.train
    x, y = train.normalize(train.images), train.labels.to(ctx.device)
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
        medians = alternate({"loop": loop, "batched": batched}, repeats)
    finally:
        torch.set_num_threads(previous)
    return {"ratio": medians["loop"] / medians["batched"], "loop_s": medians["loop"],
            "batched_s": medians["batched"], "threads": threads or previous}


def _ghost_ratio(setup: tuple[str, dict], repeats: int) -> dict:
    from benchmarks.kit.ghost import capture, gram

    ctx = context(setup)
    b = 2 * ctx.protocol.batch_size  # a candidate batch at the online methods' default factor of 2
    train = ctx.data.train
    index = torch.arange(b + 2)  # B candidates + 2 validation examples, in one pass
    x, y = train.normalize(train.images[index.to(train.images.device)]), train.labels[index].to(ctx.device)
    model = ctx.new_model("perf").eval()  # the BatchNorm rule: products from running statistics
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
    medians = alternate({"auto": products("auto"), "materialise": products("materialise")}, repeats)
    return {"ratio": medians["auto"] / medians["materialise"], "auto_ms": 1000 * medians["auto"],
            "materialised_ms": 1000 * medians["materialise"], "ghost_weights": used["ghost"],
            "materialised_weights": used["materialise"], "candidates": b}


def ghost_over_materialised(tiny: bool = False) -> dict:
    return _ghost_ratio(fashion_setup(tiny, 2 * TINY_BATCH + 2 if tiny else 1024), 1 if tiny else 5)


def ghost_over_materialised_resnet18(tiny: bool = False) -> dict:
    return _ghost_ratio(resnet18_setup(tiny, 8 if tiny else 258), 1 if tiny else 2)


# -- per method, through the public run path -------------------------------------------------------

def _run(setup: tuple[str, dict], method: str, out: str, **extra) -> dict:
    name, overrides = setup
    return execute(RunSpec(name, method, {}, 0, {**overrides, **extra}), out, log=quiet, progress=False,
                   force=True)


def _after_first_epoch(record: dict, key: str) -> float:
    """How much of `key` (a cumulative curve column) the epochs after the first added."""
    curve = record["curve"]
    return curve[-1][key] - curve[0][key]


def epoch_over_reference(method: str, tiny: bool = False) -> dict:
    """Training seconds per visited example, the first epoch dropped from both."""
    n_examples, epochs, repeats = (4 * TINY_BATCH, 3, 1) if tiny else (10000, 4, 2)
    setup = fashion_setup(tiny, n_examples, epochs=epochs, eval_every=epochs)
    reference = load_protocol(setup[0]).reference
    visited = {}

    def seconds_per_example(record: dict) -> float:
        return _after_first_epoch(record, "seconds") / sum(row["examples"] for row in record["curve"][1:])

    with tempfile.TemporaryDirectory() as out:
        def method_run() -> float:
            record = _run(setup, method, out)
            rows = record["curve"][1:]
            visited["examples"] = round(sum(row["examples"] for row in rows) / len(rows))
            return seconds_per_example(record)

        def reference_run() -> float:  # after a method run: the size it visited is known
            return seconds_per_example(_run(setup, reference, out, train_subset=visited["examples"]))

        medians = alternate({"method": method_run, "reference": reference_run}, repeats)
    return {"ratio": medians["method"] / medians["reference"], "visited_share": visited["examples"] / n_examples,
            "method_us_per_example": 1e6 * medians["method"],
            "reference_us_per_example": 1e6 * medians["reference"]}


def _step_ratio(method: str, setup: tuple[str, dict], epochs: int, repeats: int) -> dict:
    """Training seconds (and metered FLOPs) per step, the first epoch dropped from both runs."""
    name, overrides = setup
    setup = (name, {**overrides, "epochs": epochs, "eval_every": epochs})
    reference = load_protocol(name).reference
    shape, flops = {}, {"method": [], "reference": []}

    def per_step(record: dict, who: str) -> float:
        steps = _after_first_epoch(record, "step")
        flops[who].append(_after_first_epoch(record, "flops") / steps)
        return _after_first_epoch(record, "seconds") / steps

    with tempfile.TemporaryDirectory() as out:
        def method_run() -> float:
            record = _run(setup, method, out)
            steps_per_epoch = _after_first_epoch(record, "step") / (epochs - 1)
            shape["candidates"] = round(record["n_train"] / steps_per_epoch)  # every example a candidate once
            shape["trained"] = record["curve"][-1]["examples"] / steps_per_epoch
            return per_step(record, "method")

        def reference_run() -> float:  # after a method run: its candidate batch size is known
            return per_step(_run(setup, reference, out, batch_size=shape["candidates"]), "reference")

        medians = alternate({"method": method_run, "reference": reference_run}, repeats)
    return {"ratio": medians["method"] / medians["reference"], "method_step_ms": 1000 * medians["method"],
            "reference_step_ms": 1000 * medians["reference"],
            "flops_ratio": statistics.median(flops["method"]) / statistics.median(flops["reference"]),
            "candidates": shape["candidates"], "trained": shape["trained"]}


def step_over_reference_step(method: str, tiny: bool = False) -> dict:
    n = 4 * TINY_BATCH if tiny else 2048
    return _step_ratio(method, fashion_setup(tiny, n, holdout=16 if tiny else 64), 2, 1 if tiny else 3)


def step_over_reference_step_resnet18(method: str, tiny: bool = False) -> dict:
    return _step_ratio(method, resnet18_setup(tiny, 8 if tiny else 256, holdout=8 if tiny else 64), 2,
                       1 if tiny else 2)


def scoring_cost(method: str, tiny: bool = False) -> dict:
    """Selection FLOPs over one full-data run (the record's compute, as metered) at the method's defaults."""
    n_examples = 2 * TINY_BATCH if tiny else 1024
    epochs = 1 if tiny else load_protocol(FASHION).epochs
    setup = fashion_setup(tiny, n_examples, epochs=epochs, eval_every=epochs)
    with tempfile.TemporaryDirectory() as out:
        compute = _run(setup, method, out)["compute"]
    return {"ratio": compute["selection_flops"] / compute["full_flops"], "selection_flops": compute["selection_flops"],
            "n_train": n_examples}


def _startup(command: str, tiny: bool) -> dict:
    """Wall-clock seconds of `python -m benchmarks <command>` on a results folder of published records
    (median of alternated repeats), with `python -c "import torch"` timed beside it: what the command
    would pay if it imported torch. The first call (not timed) may build the registry catalog."""
    import os
    import shutil
    import subprocess

    records = sorted((Path(__file__).resolve().parents[2] / "results" / "records").rglob("*.json"))
    with tempfile.TemporaryDirectory() as out:
        (Path(out) / "runs").mkdir()
        for record in records[: 4 if tiny else 40]:
            shutil.copy(record, Path(out) / "runs" / record.name)
        args = {"status": ["status", out], "tables": ["tables", "--runs", out]}[command]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                          os.environ.get("PYTHONPATH")])))

        def timed(argv: list[str]) -> Callable[[], float]:
            def measure() -> float:
                started = time.perf_counter()
                subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=env, timeout=300)
                return time.perf_counter() - started
            return measure

        timed(["-m", "benchmarks", *args])()  # builds the catalog where it is not cached yet
        times = alternate({"command": timed(["-m", "benchmarks", *args]), "torch": timed(["-c", "import torch"])},
                           1 if tiny else 5)
    return {"ratio": times["command"], "import_torch_s": times["torch"], "records": min(len(records), 4 if tiny else 40)}


def status_startup_s(tiny: bool = False) -> dict:
    return _startup("status", tiny)


def tables_startup_s(tiny: bool = False) -> dict:
    return _startup("tables", tiny)


MEASUREMENTS = {"harness_step_over_bare": harness_step_over_bare,
                "status_startup_s": status_startup_s, "tables_startup_s": tables_startup_s,
                "pipeline_over_dataloader": pipeline_over_dataloader,
                "imagenet_loader_images_per_core": imagenet_loader_images_per_core,
                "pergrad_loop_over_batched": pergrad_loop_over_batched,
                "ghost_over_materialised": ghost_over_materialised,
                "ghost_over_materialised_resnet18": ghost_over_materialised_resnet18}
# kind -> (the option naming its methods, the hook a method must implement to be measured, measure)
PER_METHOD = {"epoch_over_reference": ("epoch_method", "plan_epoch", epoch_over_reference),
              "step_over_reference_step": ("step_method", "select", step_over_reference_step),
              "step_over_reference_step_resnet18": ("step_method", "select", step_over_reference_step_resnet18),
              "scoring_cost": ("cost_method", "prepare", scoring_cost)}


def _checked(methods: list[str], hook: str, option: str) -> list[str]:
    """The named methods, each known and implementing `hook` (else the measurement means nothing)."""
    for name in methods:
        if not overrides_hook(create_method(name), hook):  # an unknown name raises BenchError here
            raise BenchError(f"{option} {name}: the method does not implement `{hook}`, which this measurement times")
    return methods


def plan(args: argparse.Namespace) -> list[tuple[str, Callable[[], dict], str | None]]:
    """(result name, measure, goal kind) for every measurement asked for, in order."""
    kinds = args.only or [*MEASUREMENTS, *PER_METHOD]
    todo = []
    for kind in kinds:
        if kind in MEASUREMENTS:
            todo.append((kind, lambda fn=MEASUREMENTS[kind]: fn(args.tiny), kind))
            continue
        option, hook, fn = PER_METHOD[kind]
        flag = "--" + option.replace("_", "-")
        if not getattr(args, option):
            if args.only:
                raise BenchError(f"--only {kind} measures the methods named by {flag}, and none is named")
            print(f"(no {flag} named: {kind} not measured)", flush=True)
        for method in _checked(getattr(args, option), hook, flag):
            name = f"{kind}/{FASHION}/{method}" if kind == "scoring_cost" else f"{kind}/{method}"
            todo.append((name, lambda fn=fn, method=method: fn(method, args.tiny), kind if kind in GOALS else None))
    return todo


def report(name: str, detail: dict, goal_kind: str | None) -> None:
    extras = ", ".join(f"{k}={v:.4g}" for k, v in detail.items() if k != "ratio")
    if goal_kind is None:
        print(f"  {name} = {detail['ratio']:.3f} ({extras})", flush=True)
        return
    op, goal = GOALS[goal_kind]
    met = detail["ratio"] <= goal if op == "<=" else detail["ratio"] >= goal
    print(f"  {name} = {detail['ratio']:.3f} (goal {op} {goal}: {'met' if met else 'NOT met'}; {extras})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tools.perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/perf.json", help="where to write name -> ratio (JSON; merged "
                        "into what the file holds)")
    parser.add_argument("--only", action="append", choices=[*MEASUREMENTS, *PER_METHOD], help="measure only these")
    parser.add_argument("--epoch-method", action="append", default=[], metavar="METHOD",
                        help="a method that plans its epochs, for epoch_over_reference (repeatable)")
    parser.add_argument("--step-method", action="append", default=[], metavar="METHOD",
                        help="a method that selects online, for the step_over_reference_step ratios (repeatable)")
    parser.add_argument("--cost-method", action="append", default=[], metavar="METHOD",
                        help="a method that scores before training, for scoring_cost (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="every measurement at a tiny size, in seconds (for "
                        "tests: the ratios mean nothing)")
    args = parser.parse_args(argv)
    try:
        todo = plan(args)
        torch.manual_seed(0)
        results = {}
        for name, measure, goal_kind in todo:
            print(f"measuring {name} ...", flush=True)
            started = time.perf_counter()
            detail = measure()
            detail["took_s"] = time.perf_counter() - started
            if not (math.isfinite(detail["ratio"]) and detail["ratio"] > 0):
                raise RuntimeError(f"{name}: measured {detail['ratio']}, not a finite positive ratio")
            results[name] = float(f"{detail['ratio']:.4g}")
            report(name, detail, goal_kind)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing.update(results)
    out.write_text(json.dumps(existing, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
