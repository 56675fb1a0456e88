"""Command line: python -m benchmarks {list,run,bench,tables,plots,replicate} ... (`--help` on each)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import BenchError
from .scores_cli import add_parser as add_scores_parser

EXAMPLES = """examples:
  python -m benchmarks list
  python -m benchmarks run --protocol fashion-mnist --method uniform --param fraction=0.3 --seed 1
  python -m benchmarks run --protocol smoke --method full --set epochs=1
  python -m benchmarks tables --runs results --out results/tables
  python -m benchmarks plots --runs results --out results/tables/plots
  python -m benchmarks replicate --runs results --out results/tables/replication.md
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
    record = execute(spec, args.out, data_root=args.data_root, device=args.device, force=args.force,
                     loggers=_wandb_loggers(args))
    metrics, compute = record["metrics"], record["compute"]
    print(f"{record['status']}: {record['run_id']} test_acc={metrics.get('test_acc', float('nan')):.4f} "
          f"fraction={compute['fraction']:.3f} selection_share={compute['selection_share']:.3f} "
          f"wall_clock={record['wall_clock_s']:.1f}s")
    return 0


def _quick(overrides: dict, protocol: str, quick: bool) -> dict:
    """--quick: a tenth of the protocol's epochs (a check that everything runs, not a result)."""
    if not quick or "epochs" in overrides:
        return overrides
    from .protocol import load_protocol

    return dict(overrides, epochs=max(1, load_protocol(protocol).epochs // 10))


def _cmd_bench(args: argparse.Namespace) -> int:
    """Every method (default: all registered) at its default settings, for each seed, then the table."""
    import time

    from .protocol import load_protocol, parse_assignments
    from .registry import list_methods, method_class
    from .run import RunSpec, execute

    protocol = load_protocol(args.protocol)
    overrides = _quick(parse_assignments(args.set, "--set"), args.protocol, args.quick)
    methods = args.methods.split(",") if args.methods else list(list_methods())
    for name in methods:
        method_class(name)  # unknown names fail before anything runs
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else protocol.seeds[:1]
    shared = parse_assignments(args.param, "--param")

    def params_for(method: str) -> dict:  # a --param goes to every method that has that parameter
        return {k: v for k, v in shared.items() if k in method_class(method).params}

    specs = [RunSpec(protocol=args.protocol, method=m, params=params_for(m), seed=s, overrides=overrides)
             for s in seeds for m in methods]
    started, failed = time.perf_counter(), []
    loggers = _wandb_loggers(args)
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}", flush=True)
        try:
            execute(spec, args.out, data_root=args.data_root, device=args.device, loggers=loggers)
        except BenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - the failed record holds the traceback; go on
            failed.append(f"{spec.method} seed {spec.seed}: {type(exc).__name__}: {exc}")
            print(f"  failed: {failed[-1]}", flush=True)
    print(f"bench wall-clock: {time.perf_counter() - started:.0f} s for {len(specs)} runs")
    status = _print_tables(args.out, f"{args.out}/tables", plots_out=f"{args.out}/tables/plots")
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else status


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .protocol import parse_assignments
    from .sweep import load_sweep, parse_slurm_options, run_local, submit_slurm, sweep_status, write_manifest

    overrides = parse_assignments(args.set, "--set")
    if args.quick:
        overrides = _quick(overrides, load_sweep(args.spec).protocol, True)
    sweep = load_sweep(args.spec, overrides)
    manifest, lines = write_manifest(sweep, args.out)
    os.environ["BENCH_WANDB"] = args.wandb  # tasks inherit it: sbatch exports the environment
    states = sweep_status(manifest)
    complete = [i for i, _, state, _ in states if state == "complete"]
    todo = [i for i, _, state, _ in states if state not in ("complete", "running")]
    running = len(states) - len(complete) - len(todo)
    print(f"sweep {sweep.name}: {len(lines)} runs in {manifest}: {len(todo)} to run, {len(complete)} already "
          f"complete" + (f", {running} running" if running else ""))
    if args.dry_run or not todo:
        for i in todo if args.dry_run else []:
            line = lines[i]
            print(f"  [{i}] {line['run_id']} {line['method']} {line['params']} seed {line['seed']}")
        return 0
    if args.executor == "slurm":
        slurm = dict(sweep.slurm, **parse_slurm_options(args.slurm))
        submit_slurm(manifest, todo, slurm, job_name=f"bench-{sweep.name}")
        return 0
    final = run_local(manifest, todo, jobs=args.jobs)
    failed = final.get("failed", []) + final.get("corrupt", []) + final.get("interrupted", [])
    summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(final.items()))
    print(f"summary: {summary}")
    for i in failed:
        print(f"  not complete: [{i}] {lines[i]['method']} {lines[i]['params']} seed {lines[i]['seed']}")
    if not failed:
        _print_tables(args.out, f"{args.out}/tables", plots_out=f"{args.out}/tables/plots")
    return 1 if failed else 0


def _cmd_task(args: argparse.Namespace) -> int:
    """One manifest line, as a Slurm array task or a local sweep worker; checkpoint + requeue on signal."""
    import signal
    import socket
    import subprocess

    from .record import atomic_write_bytes
    from .run import execute
    from .sweep import line_spec, read_manifest_line, running_marker
    from .train import STOP, Preempted

    line = read_manifest_line(args.manifest, args.index)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    task_id = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else None

    def request_stop(signum, _frame):
        if not STOP.is_set():
            print(f"received {signal.Signals(signum).name}: stopping at the next step to checkpoint", flush=True)
        STOP.set()

    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    marker = running_marker(line["out"], line["run_id"])
    atomic_write_bytes(marker, f"host={socket.gethostname()} pid={os.getpid()} job={task_id or '-'}\n".encode())
    try:
        execute(line_spec(line), line["out"], data_root=args.data_root, device=args.device,
                group=line.get("group"), loggers=_wandb_loggers(args, line["out"]))
    except Preempted:
        if task_id:
            subprocess.run(["scontrol", "requeue", task_id], check=False)
            print(f"requeued {task_id}", flush=True)
        else:
            print("stopped; run the same command again to resume from the checkpoint", flush=True)
        return 3
    finally:
        marker.unlink(missing_ok=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .sweep import manifest_path, sweep_status

    target = Path(args.sweep)
    manifest = target if target.is_file() else target / "manifest.jsonl"
    if not manifest.exists():
        manifest = manifest_path(args.out, args.sweep)
    if not manifest.exists():
        raise BenchError(f"no manifest for sweep '{args.sweep}' (looked for {manifest})")
    counts: dict[str, int] = {}
    for i, line, state, detail in sweep_status(manifest):
        counts[state] = counts.get(state, 0) + 1
        print(f"[{i:>3}] {state:<11} {line['run_id']} {line['method']} {line['params']} seed {line['seed']}"
              + (f"  {detail}" if detail else ""))
    print("total: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def _wandb_loggers(args: argparse.Namespace, out: str | None = None) -> list:
    """The run loggers that `--wandb` asks for; "off" never imports wandb."""
    if args.wandb == "off":
        return []
    from .wandb_logger import make_loggers

    return make_loggers(args.wandb, out or args.out)


def _cmd_tables(args: argparse.Namespace) -> int:
    return _print_tables(args.runs, args.out, tolerance=args.target_tolerance, from_wandb=args.from_wandb)


def _load(results: str, from_wandb: str | None = None) -> tuple[list[dict], str]:
    """Records (with problem lines printed as warnings) from a results folder or from W&B."""
    from .record import load_records, runs_dir

    if from_wandb:
        from .wandb_logger import records_from_wandb

        records, problems = records_from_wandb(from_wandb)
        source = f"W&B project {from_wandb}"
    else:
        folder = runs_dir(results)
        records, problems = load_records(folder)
        source = str(folder)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    return records, source


def _sections(results: str, from_wandb: str | None = None, tolerance: float = 0.01) -> list | None:
    """Table sections from the records (or W&B), warnings for unreadable records; None if there are none."""
    from .report import build_sections

    records, source = _load(results, from_wandb)
    problems: list[str] = []
    sections = build_sections(records, problems, tolerance)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if not sections:
        print(f"no complete run records under {source}")
        return None
    return sections


def _print_tables(results: str, tables_out: str | None, *, tolerance: float = 0.01,
                  from_wandb: str | None = None, plots_out: str | None = None) -> int:
    from .report import markdown_tables, write_tables

    sections = _sections(results, from_wandb, tolerance)
    if sections is None:
        return 1
    for text in markdown_tables(sections).values():
        print(text)
    if tables_out:
        for path in write_tables(sections, tables_out):
            print(f"wrote {path}")
    if plots_out:
        from .plots import write_plots

        for path in write_plots(sections, plots_out):
            print(f"wrote {path}")
    return 0


def _cmd_plots(args: argparse.Namespace) -> int:
    from .plots import write_plots

    sections = _sections(args.runs)
    if sections is None:
        return 1
    for path in write_plots(sections, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_replicate(args: argparse.Namespace) -> int:
    from .replicate import load_papers, markdown_table, replicate

    entries = load_papers(args.papers)
    records, _ = _load(args.runs)
    text = markdown_table(replicate(entries, records))
    print(text)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0


WANDB_CHOICES = ("auto", "online", "offline", "off")
WANDB_HELP = ("Weights & Biases logging: auto follows WANDB_MODE and goes offline without an API key "
              "(files under OUT/wandb/); off never imports wandb (default auto)")


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
    p.add_argument("--wandb", choices=WANDB_CHOICES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="run every method at its defaults on a protocol, then print the table")
    p.add_argument("--protocol", required=True)
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: the protocol's first seed)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter for every method that has it (e.g. score_runs=2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol override")
    p.add_argument("--quick", action="store_true", help="a tenth of the protocol's epochs (a check, not a result)")
    p.add_argument("--out", default="results")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--wandb", choices=WANDB_CHOICES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("sweep", help="expand a sweep spec into a manifest; run it here or as one Slurm job array")
    p.add_argument("spec", help="a sweep spec (.toml path, or a name in benchmarks/sweeps/)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--jobs", type=int, default=1, help="local: runs at a time (default 1)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: partition, gpus, time, mem, account, parallel, cpus_per_task (over the spec's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol override for all runs")
    p.add_argument("--quick", action="store_true", help="a tenth of the protocol's epochs (a check, not a result)")
    p.add_argument("--dry-run", action="store_true", help="write the manifest and list the new runs; run nothing")
    p.add_argument("--out", default="results")
    p.add_argument("--wandb", choices=WANDB_CHOICES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("task", help="run one manifest line (what each Slurm array task does)")
    p.add_argument("manifest")
    p.add_argument("index", type=int, help="0-based line number ($SLURM_ARRAY_TASK_ID)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--wandb", choices=WANDB_CHOICES, default=os.environ.get("BENCH_WANDB", "auto"),
                   help=WANDB_HELP + " (default: $BENCH_WANDB, set by `sweep`, else auto)")
    p.set_defaults(func=_cmd_task)

    p = sub.add_parser("status", help="complete / running / failed / missing per run of a sweep, from the files")
    p.add_argument("sweep", help="sweep name, its folder, or its manifest.jsonl")
    p.add_argument("--out", default="results")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("tables", help="Markdown and LaTeX tables per protocol from the run records (or W&B)")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--out", default=None, help="also write <protocol>.md and <protocol>.tex per protocol here")
    p.add_argument("--from-wandb", default=None, metavar="ENTITY/PROJECT",
                   help="rebuild the tables from W&B's runs instead of the local records")
    p.add_argument("--target-tolerance", type=float, default=0.01, metavar="T",
                   help="target accuracy = full-data mean test accuracy - T (default 0.01 = 1 pp)")
    p.set_defaults(func=_cmd_tables)

    p = sub.add_parser("plots", help="accuracy vs compute saved, and accuracy vs FLOPs curves (PNG and PDF)")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--out", default="results/tables/plots", help="folder for the plots (default results/tables/plots)")
    p.set_defaults(func=_cmd_plots)

    p = sub.add_parser("replicate", help="our runs next to the papers' numbers (results/paper/*.toml)")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--papers", default="results/paper", help="folder of paper TOML files (default results/paper)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the Markdown table here")
    p.set_defaults(func=_cmd_replicate)
    add_scores_parser(sub)
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
