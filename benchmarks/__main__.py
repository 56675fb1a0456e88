"""Command line: python -m benchmarks {list,run,tables} ... (`--help` on each)."""

from __future__ import annotations

import argparse
import sys

from .errors import BenchError

EXAMPLES = """examples:
  python -m benchmarks list
  python -m benchmarks run --protocol fashion-mnist --method uniform --param fraction=0.3 --seed 1
  python -m benchmarks run --protocol smoke --method full --set epochs=1
  python -m benchmarks tables --runs results
"""


def _cmd_list(args: argparse.Namespace) -> int:
    from .models import list_models
    from .protocol import available_protocols, load_protocol
    from .registry import list_methods

    print("methods:")
    for name, cls in list_methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {name:<16} {doc}")
        for pname, param in cls.params.items():
            print(f"      {pname:<16} {param.describe()}{': ' + param.help if param.help else ''}")
    print("protocols:")
    for name in available_protocols():
        p = load_protocol(name)
        print(f"  {name:<16} {p.dataset}, {p.model}, {p.epochs} epochs, batch {p.batch_size}, budget={p.budget}")
    print("local models: " + ", ".join(list_models()) + " (and any timm model as timm:<name>)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .protocol import parse_assignments
    from .run import RunSpec, execute

    spec = RunSpec(protocol=args.protocol, method=args.method,
                   params=parse_assignments(args.param, "--param"), seed=args.seed,
                   overrides=parse_assignments(args.set, "--set"))
    record = execute(spec, args.out, data_root=args.data_root, device=args.device, force=args.force)
    metrics, compute = record["metrics"], record["compute"]
    print(f"{record['status']}: {record['run_id']} test_acc={metrics.get('test_acc', float('nan')):.4f} "
          f"fraction={compute['fraction']:.3f} selection_share={compute['selection_share']:.3f} "
          f"wall_clock={record['wall_clock_s']:.1f}s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    """Every method (default: all registered) at its default settings, for each seed, then the table."""
    import time

    from .protocol import load_protocol, parse_assignments
    from .registry import list_methods, method_class
    from .run import RunSpec, execute

    protocol = load_protocol(args.protocol)
    overrides = parse_assignments(args.set, "--set")
    if args.quick:  # a tenth of the epochs: a check that everything runs, not a result
        overrides.setdefault("epochs", max(1, protocol.epochs // 10))
    methods = args.methods.split(",") if args.methods else list(list_methods())
    for name in methods:
        method_class(name)  # unknown names fail before anything runs
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else protocol.seeds[:1]
    specs = [RunSpec(protocol=args.protocol, method=m, seed=s, overrides=overrides) for s in seeds for m in methods]
    started, failed = time.perf_counter(), []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}", flush=True)
        try:
            execute(spec, args.out, data_root=args.data_root, device=args.device)
        except BenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - the failed record holds the traceback; go on
            failed.append(f"{spec.method} seed {spec.seed}: {type(exc).__name__}: {exc}")
            print(f"  failed: {failed[-1]}", flush=True)
    print(f"bench wall-clock: {time.perf_counter() - started:.0f} s for {len(specs)} runs")
    status = _print_tables(args.out, None)
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else status


def _cmd_tables(args: argparse.Namespace) -> int:
    return _print_tables(args.runs, args.out)


def _print_tables(results: str, tables_out: str | None) -> int:
    from .record import runs_dir
    from .report import build_tables, write_tables

    folder = runs_dir(results)
    tables, problems = build_tables(folder)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if not tables:
        print(f"no complete run records under {folder}")
        return 1
    for text in tables.values():
        print(text)
    if tables_out:
        for path in write_tables(folder, tables_out):
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Benchmark suite for data-efficient deep learning.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="methods with their parameters and defaults; protocols")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="train one run and write its record (skipped if already complete)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", required=True, help="protocol name (see `list`) or path to a .toml file")
    p.add_argument("--method", required=True, help="method name (see `list`)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, repeatable (values in TOML syntax: 0.5, true, 'text')")
    p.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="protocol override, repeatable, recorded in the run record (e.g. epochs=5)")
    p.add_argument("--out", default="results", help="results folder; records go to OUT/runs/ (default results)")
    p.add_argument("--data-root", default=None, help="where datasets are looked for first (then $BENCH_DATA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--force", action="store_true", help="rerun even if a complete record exists")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="run every method at its defaults on a protocol, then print the table")
    p.add_argument("--protocol", required=True)
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: the protocol's first seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol override")
    p.add_argument("--quick", action="store_true", help="a tenth of the protocol's epochs (a check, not a result)")
    p.add_argument("--out", default="results")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("tables", help="Markdown tables per protocol from the run records")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--out", default=None, help="also write one <protocol>.md per protocol here")
    p.set_defaults(func=_cmd_tables)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
