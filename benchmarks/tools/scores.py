"""`python -m benchmarks scores`: export per-example scores (EL2N, GraNd, forgetting, AUM ...) as CSV.

The scores are exactly those a run of the same protocol, seed and overrides would use: the same
proxy runs, the same cache (`--cache-dir`, by default the cache of runs written to `results/`), so
exporting after a sweep costs nothing, and a sweep after an export reuses its proxies.
CSV columns: index (position in the protocol's training split, the index every batch carries),
label, score (the mean over proxy runs), score_run0, score_run1, ...; with `train_subset` set, also
dataset_index, the example's index in the full training set.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.core.protocol import apply_overrides, load_protocol, parse_assignments
from benchmarks.core.record import atomic_write_bytes
from benchmarks.errors import BenchError

if TYPE_CHECKING:  # torch and the data stack load only when the command runs, as in __main__
    import torch


EXAMPLES = """examples:
  python -m benchmarks scores --protocol fashion-mnist --score el2n --score-runs 2 --out el2n.csv
  python -m benchmarks scores --protocol smoke --score grand --set epochs=2 --out grand.csv
"""


def scores_csv(labels: torch.Tensor, mean: torch.Tensor, per_run: torch.Tensor,
               dataset_index: torch.Tensor | None = None) -> str:
    header = ["index", "label", "score"] + [f"score_run{r}" for r in range(len(per_run))]
    if dataset_index is not None:
        header.append("dataset_index")
    lines = [",".join(header)]
    columns = [labels.tolist(), mean.tolist(), *(row.tolist() for row in per_run)]
    if dataset_index is not None:
        columns.append(dataset_index.tolist())
    for i, row in enumerate(zip(*columns)):
        lines.append(",".join([str(i)] + [repr(v) if isinstance(v, float) else str(v) for v in row]))
    return "\n".join(lines) + "\n"


def _cmd_scores(args: argparse.Namespace) -> int:
    import methods  # noqa: F401 - registers every score kind
    from benchmarks.kit.scoring import SCORE_KINDS, compute_scores, resolve_score_epoch

    if args.score not in SCORE_KINDS:
        raise BenchError(f"unknown score '{args.score}' (known: {', '.join(sorted(SCORE_KINDS))})")
    if args.score_runs < 1:
        raise BenchError("--score-runs must be >= 1")
    protocol = apply_overrides(load_protocol(args.protocol), parse_assignments(args.set, "--set"))
    epoch = resolve_score_epoch(args.score_epoch, protocol, SCORE_KINDS[args.score].auto_epoch)
    if SCORE_KINDS[args.score].observer is not None and epoch < 1:
        raise BenchError(f"{args.score} is recorded while the proxy trains: it needs --score-epoch >= 1")
    from benchmarks.core.run import build_context, reference_flops

    ctx = build_context(protocol, args.seed, data_root=args.data_root, device=args.device,
                        cache_dir=args.cache_dir or None)
    mean, info = compute_scores(ctx, args.score, args.score_runs, epoch)
    labels = ctx.data.train.labels
    text = scores_csv(labels, mean, info["per_run"], ctx.data.train_origin)
    atomic_write_bytes(Path(args.out), text.encode())
    flops = ctx.meter.flops["selection"]
    full = reference_flops(ctx)
    print(f"wrote {args.out}: {len(labels)} {args.score} scores at epoch {epoch}, mean of {args.score_runs} "
          f"proxy runs ({sum(info['cached'])} from the cache); cost {flops:.3e} FLOPs = "
          f"{flops / full:.3f} of a full-data run")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("scores", help="per-example scores (el2n, grand, grand-lastlayer, forgetting, aum, "
                              "aum-softmax) averaged over proxy runs, as CSV", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", required=True, help="protocol name (see `list`) or path to a .toml file")
    p.add_argument("--score", required=True, help="el2n, grand, grand-lastlayer, forgetting, aum or aum-softmax "
                   "(aum: a low score is hard)")
    p.add_argument("--score-runs", type=int, default=10, help="independent proxy runs averaged (default 10)")
    p.add_argument("--score-epoch", type=int, default=-1,
                   help="proxy epochs before scoring; -1 = the score's default (el2n: 10%% of the protocol's "
                        "epochs; grand: 0; forgetting, aum: all)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0): the proxies of runs with this seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol override, repeatable")
    p.add_argument("--data-root", default=None, help="where datasets are looked for first (then $BENCH_DATA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--cache-dir", default="results/cache",
                   help="score/proxy cache shared with runs (default results/cache, the cache of --out results); "
                        "'' disables it")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=_cmd_scores)
    return p
