"""`python -m benchmarks toy`: the RELA paper's toy study (Sun, Jiang, Lin, NeurIPS 2024), in seconds on a CPU.

The task: binary classification of x in R drawn from a mixture of two Gaussians, y ~ Bernoulli(0.5),
x | y ~ N(mu_y, sigma^2) with mu_0 = -mu, mu_1 = +mu; the model is the paper's four-parameter
f(x) = sigmoid(t1 * ReLU(t2 * x + t3) + t4), trained by SGD on the binary cross-entropy. The claim:
data with lower sample variance, and cleaner targets, lower the validation loss reached in a fixed
number of steps.

Two studies, each a set of curves (validation loss against steps, mean over `seeds` runs):
- variance: training samples with sigma in `sigmas`, clean labels; validated on clean data of the
  same sigma (the task at that variance). Also reported: the same runs validated on the ORIGINAL
  task (sigma = 1), which asks whether low-variance data teaches the original task faster.
- targets: sigma = 1 samples whose training labels are flipped with probability `noise`; validated
  on clean sigma = 1 data.

Decisions: every setting starts from the same initialisations (t ~ N(0, init^2), one per seed) and
sees the same draws (labels, standard normal noise scaled by sigma, flip draws), so settings differ
only in what is studied. Fresh training samples every step (the population, not a fixed set);
float64; the validation set is fixed (n_val examples per evaluation distribution).

Output: a table of the final validation losses with the verdict of each claim ("holds" when the
losses are ordered as claimed, strictly, along the setting axis), a plot `toy.png`/`toy.pdf` and the
curves `toy.json` under --out.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.errors import BenchError

if TYPE_CHECKING:  # torch loads when the study runs: `--help` and the parser stay light
    import torch

EXAMPLES = """examples:
  python -m benchmarks toy
  python -m benchmarks toy --steps 400 --lr 0.2 --out results/toy
"""


@dataclass
class ToyConfig:
    mu: float = 1.0
    sigmas: list = field(default_factory=lambda: [0.25, 0.5, 1.0])
    noises: list = field(default_factory=lambda: [0.0, 0.2, 0.4])
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.05
    seeds: int = 64
    init: float = 0.5
    n_val: int = 2000
    eval_every: int = 10
    seed: int = 0


def model_logits(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t1 * ReLU(t2 x + t3) + t4 for each run: theta [R, 4], x [R, B] -> logits [R, B]."""
    import torch

    t1, t2, t3, t4 = (theta[:, i:i + 1] for i in range(4))
    return t1 * torch.relu(t2 * x + t3) + t4


def _mixture(labels: torch.Tensor, noise: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    return (2 * labels - 1) * mu + sigma * noise


def train_curve(config: ToyConfig, sigma: float, flip: float, val_sigmas: list[float]) -> dict[float, list[float]]:
    """Mean validation loss every eval_every steps, per validation sigma (clean labels), for one setting."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(config.seed)
    theta = (config.init * torch.randn(config.seeds, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    val_labels = torch.randint(0, 2, (config.n_val,), generator=g).double()
    val_noise = torch.randn(config.n_val, generator=g, dtype=torch.float64)
    validation = {s: _mixture(val_labels, val_noise, config.mu, s) for s in val_sigmas}
    draws = torch.Generator().manual_seed(config.seed + 1)  # the same draws for every setting
    curves: dict[float, list[float]] = {s: [] for s in val_sigmas}
    shape = (config.seeds, config.batch_size)
    for step in range(config.steps):
        labels = torch.randint(0, 2, shape, generator=draws).double()
        x = _mixture(labels, torch.randn(shape, generator=draws, dtype=torch.float64), config.mu, sigma)
        flipped = torch.rand(shape, generator=draws, dtype=torch.float64) < flip
        targets = torch.where(flipped, 1 - labels, labels)
        loss = F.binary_cross_entropy_with_logits(model_logits(theta, x), targets, reduction="none").mean(1).sum()
        (grad,) = torch.autograd.grad(loss, theta)  # the sum over runs: each run gets its own gradient
        with torch.no_grad():
            theta -= config.lr * grad
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                for s, xv in validation.items():
                    logits = model_logits(theta, xv.expand(config.seeds, -1))
                    per_run = F.binary_cross_entropy_with_logits(
                        logits, val_labels.expand(config.seeds, -1), reduction="none").mean(1)
                    curves[s].append(per_run.mean().item())
    return curves


def _steps(config: ToyConfig) -> list[int]:
    return sorted({s for s in range(config.eval_every, config.steps + 1, config.eval_every)} | {config.steps})


def _ordered(values: list[float]) -> bool:
    """Strictly increasing along the setting axis (lower variance / less noise first)."""
    return all(a < b for a, b in zip(values, values[1:]))


def run_study(config: ToyConfig) -> dict:
    """Both studies' curves and verdicts (module docstring)."""
    variance, variance_original = {}, {}
    for sigma in sorted(config.sigmas):
        curves = train_curve(config, sigma, 0.0, sorted({sigma, 1.0}))
        variance[sigma], variance_original[sigma] = curves[sigma], curves[1.0]
    targets = {noise: train_curve(config, 1.0, noise, [1.0])[1.0] for noise in sorted(config.noises)}
    final = {name: {k: v[-1] for k, v in curves.items()}
             for name, curves in (("variance", variance), ("variance_on_original", variance_original),
                                  ("targets", targets))}
    return {"config": asdict(config), "steps": _steps(config),
            "curves": {"variance": variance, "variance_on_original": variance_original, "targets": targets},
            "final": final,
            "holds": {"variance": _ordered(list(final["variance"].values())),
                      "variance_on_original": _ordered(list(final["variance_on_original"].values())),
                      "targets": _ordered(list(final["targets"].values()))}}


def report(result: dict) -> str:
    steps = result["steps"][-1]
    lines = [f"Validation loss after {steps} steps (mean over {result['config']['seeds']} runs):"]
    labels = {"variance": "variance (validated at the same sigma)", "variance_on_original":
              "variance (validated on the original task, sigma = 1)", "targets": "target noise (flip rate)"}
    for name, label in labels.items():
        values = ", ".join(f"{k:g}: {v:.4f}" for k, v in result["final"][name].items())
        verdict = "holds" if result["holds"][name] else "does NOT hold"
        lines.append(f"  {label}: {values}  -> lower is faster: {verdict}")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    from benchmarks.reporting.plots import save_figure

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3, sharey=True)
    titles = {"variance": "sample variance (validated at that sigma)",
              "variance_on_original": "sample variance (validated at sigma = 1)",
              "targets": "target noise (validated on clean labels)"}
    for ax, (name, title) in zip(axes, titles.items()):
        for setting, curve in result["curves"][name].items():
            label = f"sigma = {setting:g}" if name != "targets" else f"flip rate = {setting:g}"
            ax.plot(result["steps"], curve, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("SGD step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (BCE)")
    fig.suptitle("RELA toy study: two-Gaussian mixture, sigmoid(t1 ReLU(t2 x + t3) + t4)", fontsize=11)
    out.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, out, "toy")


def _cmd_toy(args: argparse.Namespace) -> int:
    for option, value in (("--steps", args.steps), ("--seeds", args.seeds), ("--batch-size", args.batch_size)):
        if value < 1:
            raise BenchError(f"{option} must be >= 1, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise BenchError(f"--lr must be a finite number > 0, got {args.lr}")
    config = ToyConfig(steps=args.steps, lr=args.lr, seeds=args.seeds, batch_size=args.batch_size, seed=args.seed)
    result = run_study(config)
    print(report(result))
    out = Path(args.out)
    paths = plot(result, out)
    curves_path = out / "toy.json"
    curves_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for path in [*paths, curves_path]:
        print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("toy", help="the RELA paper's two-Gaussian toy study: curves, verdicts and a plot (seconds)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ToyConfig()
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"SGD steps (default {defaults.steps})")
    p.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default {defaults.lr})")
    p.add_argument("--seeds", type=int, default=defaults.seeds, help=f"runs averaged (default {defaults.seeds})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", default="results/toy", help="folder for toy.png, toy.pdf, toy.json (default results/toy)")
    p.set_defaults(func=_cmd_toy)
