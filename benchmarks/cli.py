"""Command line: python -m benchmarks {list,run,bench,tables,plots,replicate} ... (`--help` on each)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

from benchmarks.core.layout import ResultsLayout
from benchmarks.errors import BenchError
from benchmarks.tools.reproduce import add_parser as add_reproduce_parser
from benchmarks.tools.scores import add_parser as add_scores_parser
from benchmarks.tools.toy import add_parser as add_toy_parser

EXAMPLES = """examples:
  {prog} list
  {prog} run --protocol fashion-mnist --method uniform --param fraction=0.3 --seed 1
  {prog} bench --protocol fashion-mnist --seeds 0 --jobs 2
  {prog} sweep fashion-online --jobs 2 ; {prog} status fashion-online
  {prog} tables --published                      # results/records -> results/tables
`{prog} COMMAND --help` shows each command's options and its own examples.
"""

# Each command's own examples ({prog}: how this CLI was started: `python -m benchmarks` or `bench`).
COMMAND_EXAMPLES = {
    "list": ["{prog} list", "{prog} list | grep -A8 '^  infobatch'"],
    "run": ["{prog} run --protocol fashion-mnist --method uniform --param fraction=0.3 --seed 1",
            "{prog} run --protocol smoke --method full --set epochs=1 --out /tmp/try",
            "{prog} run --protocol fashion-mnist --method greats --set holdout=0.1 --set budget=iterations",
            "torchrun --nproc-per-node 4 -m benchmarks run --protocol cifar10 --method full   # data parallel"],
    "bench": ["{prog} bench --protocol fashion-mnist --seeds 0 --param score_runs=2 --jobs 2",
              "{prog} bench --protocol smoke --methods full,uniform --set epochs=1 --out /tmp/try",
              "{prog} bench --protocol fashion-mnist --dry-run             # what it would run, and what it leaves out"],
    "sweep": ["{prog} sweep smoke --jobs 2",
              "{prog} sweep cifar10 --quick                              # every [[methods]] block once, small",
              "{prog} sweep cifar10 --executor slurm --slurm partition=gpu --slurm account=myacct"],
    "task": ["{prog} task results/sweeps/smoke/manifest.jsonl 0   # line 0, as Slurm array task 0 runs it"],
    "status": ["{prog} status fashion-online", "{prog} status results/sweeps/bench-fashion-mnist",
               "{prog} status results                         # every run of a results folder (single runs too)"],
    "publish": ["{prog} publish fashion-pruning", "{prog} publish bench-fashion --partial"],
    "tables": ["{prog} tables --runs results                  # the table of your runs (results/runs/)",
               "{prog} tables --published                     # results/records -> results/tables",
               "{prog} tables --records results/records --out /tmp/tables"],
    "plots": ["{prog} plots --records results/records --out /tmp/plots"],
    "replicate": ["{prog} replicate --records results/records --claims-only",
                  "{prog} replicate --runs results --claims-out claims.md"],
}


def program_name() -> str:
    """How the user started this CLI, for usage lines and examples: `bench` (the console script) or
    `python -m benchmarks`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "bench" if name == "bench" else "python -m benchmarks"


def examples_of(command: str, prog: str) -> str:
    return "examples:\n" + "\n".join("  " + line.format(prog=prog) for line in COMMAND_EXAMPLES[command]) + "\n"


def _cmd_list(args: argparse.Namespace) -> int:
    from benchmarks.core import catalog  # the registries as JSON: no torch once the catalog is cached
    from benchmarks.core.protocol import available_protocols, load_protocol

    known = catalog.catalog()
    print("methods (kind: the protocols' task they fit):")
    for name, entry in known["methods"].items():
        oracle = " [ORACLE: reads training group labels]" if entry["reads_train_groups"] else ""
        needs = ", needs a holdout" if entry["needs_holdout"] else ""
        print(f"  {name:<16} [{entry['kind']}{needs}]{oracle} {entry['doc']}")
        for pname, param in entry["params"].items():
            print(f"      {pname:<16} {param['describe']}{': ' + param['help'] if param['help'] else ''}")
    print("protocols:")
    for name in available_protocols():
        p = load_protocol(name, check_values=False)  # shown, not run: tests check the built-ins' values
        selection = f", checkpoint by {p.selection_rule}" if p.selection_rule != "last-epoch" else ""
        print(f"  {name:<16} {p.dataset}, {p.model}, {p.epochs} epochs, batch {p.batch_size}, budget={p.budget}, "
              f"{p.task}, reference {p.reference}{selection}")
    print("local models: " + ", ".join(known["models"]) + " (and any timm model as timm:<name>)")
    print("datasets: " + ", ".join(known["datasets"]) + " (a protocol's `dataset`; plugins add more)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from benchmarks.core.protocol import parse_assignments
    from benchmarks.core.run import RunSpec, execute
    from benchmarks.core.train import Preempted
    from benchmarks.jobs.task import STOPPED, request_stop_on_signals

    spec = RunSpec(protocol=args.protocol, method=args.method,
                   params=parse_assignments(args.param, "--param"), seed=args.seed,
                   overrides=parse_assignments(args.set, "--set"))
    import signal

    replaced = request_stop_on_signals(interrupt=True)  # SIGTERM, SIGUSR1 or a first Ctrl-C: checkpoint, stop
    try:
        record = execute(spec, args.out, data_root=args.data_root, device=args.device, force=args.force,
                         loggers=_wandb_loggers(args), save=args.save_model)
    except Preempted:
        print("stopped: the run is saved in its checkpoint (line above); run the same command again to resume "
              "from there, with identical results", file=sys.stderr)
        return STOPPED
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
    from benchmarks.core.distributed import current

    if current() is not None and not current().is_main:
        return 0  # rank 0 reports
    metrics, compute = record["metrics"], record["compute"]
    print(f"{record['status']}: {record['run_id']} test_acc={metrics.get('test_acc', float('nan')):.4f} "
          f"fraction={compute['fraction']:.3f} selection_share={compute['selection_share']:.3f} "
          f"wall_clock={record['wall_clock_s']:.1f}s")
    return 0


def _quick(overrides: dict, protocol: str, quick: bool) -> dict:
    """--quick: a tenth of the protocol's epochs (a check that everything runs, not a result)."""
    if not quick or "epochs" in overrides:
        return overrides
    from benchmarks.core.protocol import load_protocol

    return dict(overrides, epochs=max(1, load_protocol(protocol).epochs // 10))


def _int_list(text: str, option: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"-?\d+", item) for item in items):
        raise BenchError(f"{option} '{text}' must be comma-separated whole numbers (e.g. 0,1,2)")
    return [int(item) for item in items]


def _cmd_bench(args: argparse.Namespace) -> int:
    """Every method that fits the protocol at its default settings, for each seed, then the table: a sweep of
    its own (benchmarks/jobs/bench.py), checked before the first run starts and run by the local executor."""
    from benchmarks.core.protocol import parse_assignments
    from benchmarks.jobs.bench import bench_sweep

    sweep, skipped = bench_sweep(
        args.protocol, methods=[m.strip() for m in args.methods.split(",")] if args.methods is not None else None,
        seeds=_int_list(args.seeds, "--seeds") if args.seeds is not None else None,
        params=parse_assignments(args.param, "--param"),
        overrides=_quick(parse_assignments(args.set, "--set"), args.protocol, args.quick), name=args.name,
        save_model=args.save_model)
    return _run_sweep(sweep, args, notes=[f"not run: {reason}" for reason in skipped.values()])


def _job_tables(manifest, tables_out) -> int:
    """The table of one job (a sweep or a bench) from its own records, printed and written to its folder.

    Never results/tables/: that folder holds the published tables, rebuilt by `nox -s tables` from the
    published records (results/records/), and a job must not erase a table it did not make.
    """
    from benchmarks.core.record import RecordError, load_record
    from benchmarks.jobs.sweep import read_manifest

    records, problems = [], []
    for line in read_manifest(manifest):
        path = ResultsLayout(line["out"]).record(line["run_id"])
        if path.exists():
            try:
                records.append(dict(load_record(path), _path=str(path)))
            except RecordError as exc:
                problems.append(str(exc))
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    return _render(records, str(manifest), tables_out, plots_out=f"{tables_out}/plots")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from benchmarks.core.protocol import parse_assignments
    from benchmarks.jobs.sweep import load_sweep

    overrides = parse_assignments(args.set, "--set")
    if args.quick:
        overrides = _quick(overrides, load_sweep(args.spec).protocol, True)
    return _run_sweep(load_sweep(args.spec, overrides, quick=args.quick), args)


def _run_sweep(sweep, args: argparse.Namespace, notes: list[str] = ()) -> int:
    """A sweep (or a bench job): checked, its manifest written, its new runs run here or submitted."""
    from benchmarks.core.layout import ResultsLayout
    from benchmarks.jobs.preflight import check_runs
    from benchmarks.jobs.sweep import (
        LIVE_STATES,
        parse_slurm_options,
        run_local,
        slurm_groups,
        submit_slurm,
        sweep_status,
        write_manifest,
    )
    from benchmarks.jobs.tuning import add_selected_runs, waiting_settings

    if args.jobs < 1:
        raise BenchError(f"--jobs {args.jobs}: must be >= 1")
    slurm_options = parse_slurm_options(args.slurm)  # checked whatever the executor: nothing is silently ignored
    # Check what every run needs HERE, before a manifest is written or a job submitted: under Slurm
    # this is the submitting host (--skip-data-check for data that only the compute nodes see).
    check_runs(sweep.runs, data_root=args.data_root, device=getattr(args, "device", None),
               check_data=not args.skip_data_check, out=args.out)
    for note in notes:  # said once everything is checked: bad input stays one line
        print(note)
    settings = {"wandb": args.wandb}
    if getattr(args, "device", None) not in (None, "auto"):
        settings["device"] = args.device
    # Tuned settings whose trials are all complete get their selected runs (phase 2) before the manifest is written.
    tuning_lines = add_selected_runs(sweep, args.out) if sweep.tuned else []
    manifest, lines = write_manifest(sweep, args.out, args.data_root, settings=settings)
    states = sweep_status(manifest)
    complete = [i for i, _, state, _ in states if state == "complete"]
    live = [i for i, _, state, _ in states if state in LIVE_STATES]
    todo = [i for i, _, state, _ in states if state != "complete" and state not in LIVE_STATES]
    print(f"{sweep.source if sweep.source == 'bench' else 'sweep'} {sweep.name}: {len(lines)} runs in {manifest}: "
          f"{len(todo)} to run, {len(complete)} already complete"
          + (f", {len(live)} running or queued" if live else ""), flush=True)
    if sweep.tuned:
        waiting = len(waiting_settings(sweep))
        print(f"tuning: {len(sweep.tuned)} tuned settings, {sweep.tuning.label} each (trials at seed "
              f"{sweep.tuning.seed}): {len(sweep.tuned) - waiting} selected, {waiting} waiting for their trials")
        for line in tuning_lines:
            print(f"  {line}")
    if args.dry_run or not todo:
        for i in todo if args.dry_run else []:
            line = lines[i]
            print(f"  [{i}] {line['run_id']} {line['method']} {line['params']} seed {line['seed']}"
                  + _role(line))
        return 0 if args.dry_run or sweep.source != "bench" else _job_tables(
            manifest, ResultsLayout(args.out).sweep_tables(sweep.name))
    if args.executor == "slurm":
        for slurm, indices in slurm_groups(lines, todo, sweep.slurm, slurm_options):
            submit_slurm(manifest, indices, slurm, job_name=f"bench-{sweep.name}")
        if waiting_settings(sweep):
            print(f"tuning: phase 2 (each selected setting at every seed) of {len(waiting_settings(sweep))} tuned "
                  f"settings is not submitted yet: once `status {sweep.name}` shows their trials complete, run "
                  "this `sweep` command again to submit it")
        return 0
    final = run_local(manifest, todo, jobs=args.jobs)
    if waiting_settings(sweep):  # phase 2 here, in the same call, for the settings whose trials just completed
        before = len(lines)
        for line in add_selected_runs(sweep, args.out):
            print(line)
        if len(sweep.runs) > before:
            manifest, lines = write_manifest(sweep, args.out, args.data_root, settings=settings)
            more = [i for i, _, state, _ in sweep_status(manifest)[before:] if state != "complete"
                    and state not in LIVE_STATES]
            print(f"tuning phase 2: {len(more)} runs of the selected settings to run", flush=True)
            for state, indices in run_local(manifest, more, jobs=args.jobs).items():
                final.setdefault(state, []).extend(indices)
    failed = [i for state, indices in final.items() if state != "complete" for i in indices]
    summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(final.items()))
    print(f"summary: {summary}")
    for i in failed:
        print(f"  not complete: [{i}] {lines[i]['method']} {lines[i]['params']} seed {lines[i]['seed']}")
    if not failed or sweep.source == "bench":  # a bench job tables what it has; its failures are in the summary
        _job_tables(manifest, ResultsLayout(args.out).sweep_tables(sweep.name))
    return 1 if failed else 0


def _role(line: dict) -> str:
    """A manifest line's part in a tuned sweep, for listings: ' [trial 3]', ' [selected: trial 3]' or ''."""
    tuning = line.get("tuning") or {}
    drawn = ", ".join(f"{k}={line['overrides'].get(k)}" for k in tuning.get("tuned_overrides") or [])
    drawn = f", {drawn}" if drawn else ""  # the drawn protocol settings (the drawn parameters are in params)
    if tuning.get("role") == "trial":
        return f" [trial {tuning.get('trial')}{drawn}]"
    if tuning.get("role") == "selected":
        return f" [selected: trial {tuning.get('trial')} of {tuning.get('of')}{drawn}]"
    return ""


def _cmd_task(args: argparse.Namespace) -> int:
    """One manifest line, as a Slurm array task or a local sweep worker (benchmarks/jobs/task.py)."""
    from benchmarks.jobs.task import run_task

    return run_task(args.manifest, args.index, data_root=args.data_root, device=args.device, wandb=args.wandb)


def _find_manifest(target: str, out: str):
    """A sweep's manifest from its name, its spec file (.toml), its folder or the manifest itself."""
    from pathlib import Path

    from benchmarks.core.protocol import read_toml
    from benchmarks.jobs.sweep import SWEEP_DIR

    path = Path(target)
    if path.is_dir():
        path = path / "manifest.jsonl"
    elif path.suffix == ".toml" or (not path.exists() and (SWEEP_DIR / f"{target}.toml").exists()):
        spec = path if path.exists() else SWEEP_DIR / f"{target}.toml"
        name = read_toml(spec).get("name") if spec.exists() else None
        if not isinstance(name, str):
            raise BenchError(f"{spec}: not a sweep spec with a name (give the sweep's name, folder or manifest)")
        path = ResultsLayout(out).manifest(name)
    elif not path.exists():
        path = ResultsLayout(out).manifest(target)
    if not path.is_file():
        raise BenchError(f"no manifest for sweep '{target}' (looked for {path}); `sweep SPEC` writes it")
    return path


def _cmd_status(args: argparse.Namespace) -> int:
    """A sweep's or job's runs, or (given a results folder, e.g. after single `run`s) every run it holds."""
    from pathlib import Path

    from benchmarks.jobs.sweep import folder_lines, progress_summary, run_state, sweep_status

    target = Path(args.sweep)
    if target.is_dir() and not (target / "manifest.jsonl").exists() and ResultsLayout(target).runs.is_dir():
        lines = folder_lines(target)
        if not lines:
            print(f"no runs in {target}")
            return 0
        states = [(i, line, *run_state(line, {})) for i, line in enumerate(lines)]
    else:
        states = sweep_status(_find_manifest(args.sweep, args.out))
    counts: dict[str, int] = {}
    for i, line, state, detail in states:
        counts[state] = counts.get(state, 0) + 1
        print(f"[{i:>3}] {state:<11} {line['run_id']} {line['method']} {line['params']} seed {line['seed']}"
              + _role(line) + (f"  {detail}" if detail else ""))
    print("total: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    print(progress_summary(states))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    """Copy a job's complete records into the published records (results/records/<name>/)."""
    from benchmarks.jobs.publish import publish

    manifest = _find_manifest(args.sweep, args.out)
    return publish(manifest, args.to, partial=args.partial)


def _wandb_loggers(args: argparse.Namespace, out: str | None = None) -> list:
    """The run loggers that `--wandb` asks for; "off" never imports wandb."""
    if args.wandb == "off":
        return []
    from benchmarks.jobs.wandb_logger import make_loggers

    return make_loggers(args.wandb, out or args.out)


def _cmd_tables(args: argparse.Namespace) -> int:
    if not 0 <= args.target_tolerance < 1:
        raise BenchError(f"--target-tolerance {args.target_tolerance}: must be in [0, 1) (0.01 = 1 pp)")
    if args.published:  # what `nox -s tables` runs: the committed tables from the committed records
        from benchmarks.jobs.publish import rebuild

        records = args.records or "results/records"
        _records_folder(args.runs, records)
        return rebuild(records, args.out or "results/tables", args.papers)
    records, source = _load(args.runs, args.from_wandb, args.records)
    return _render(records, source, args.out, tolerance=args.target_tolerance,
                   plots_out=f"{args.out}/plots" if args.out else None)


def _records_folder(results: str, records: str | None):
    """The folder of record files: --records as given, or the results folder's runs/ (BenchError if absent)."""
    from pathlib import Path

    folder = Path(records) if records else ResultsLayout(results).runs
    if not folder.is_dir():
        what = f"--records '{records}'" if records else f"--runs '{results}' (records are read from {folder})"
        published = Path(results) / "records"
        hint = (f"; this checkout's published records are read with --records {published}"
                if not records and published.is_dir() else "")
        raise BenchError(f"{what}: no such folder{hint}")
    return folder


def _load(results: str, from_wandb: str | None = None, records_dir: str | None = None) -> tuple[list[dict], str]:
    """Records (with problem lines printed as warnings) from a results folder, a records folder, or W&B."""
    from benchmarks.core.record import load_records

    if from_wandb:
        from benchmarks.jobs.wandb_logger import records_from_wandb

        records, problems = records_from_wandb(from_wandb)
        source = f"W&B project {from_wandb}"
    else:
        folder = _records_folder(results, records_dir)
        records, problems = load_records(folder)
        source = str(folder)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    return records, source


def _sections(records: list[dict], source: str, tolerance: float = 0.01) -> list | None:
    """Table sections from the records, warnings for unreadable ones; None if there are none."""
    from benchmarks.reporting.tables import build_sections

    problems: list[str] = []
    sections = build_sections(records, problems, tolerance)
    for problem in problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    if not sections:
        print(f"no complete run records under {source}")
        return None
    return sections


def _render(records: list[dict], source: str, tables_out, *, tolerance: float = 0.01, plots_out=None) -> int:
    from benchmarks.reporting.tables import markdown_tables, write_tables

    sections = _sections(records, source, tolerance)
    if sections is None:
        return 1
    for text in markdown_tables(sections).values():
        print(text)
    if tables_out:
        for path in write_tables(sections, tables_out):
            print(f"wrote {path}")
    if plots_out:
        from benchmarks.reporting.plots import write_plots

        for path in write_plots(sections, plots_out):
            print(f"wrote {path}")
    if tables_out:
        from benchmarks.reporting.html import write_report

        print(f"wrote {write_report(sections, tables_out, plots_out)}")
    return 0


def _cmd_plots(args: argparse.Namespace) -> int:
    from benchmarks.reporting.plots import write_plots

    sections = _sections(*_load(args.runs, None, args.records))
    if sections is None:
        return 1
    for path in write_plots(sections, args.out):
        print(f"wrote {path}")
    return 0


def _cmd_replicate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmarks.core.protocol import parse_assignments
    from benchmarks.reporting.claims import evaluate_claims, load_claims, markdown_claims
    from benchmarks.reporting.replicate import load_papers, markdown_table, replicate

    papers = None if args.claims_only else load_papers(args.papers)  # the paper files are checked first
    claims = load_claims(args.papers)
    extra = parse_assignments(args.set, "--set")
    records, _ = _load(args.runs, None, args.records)
    outputs = []
    if papers is not None:
        outputs.append((markdown_table(replicate(papers, records)), args.out))
    if claims:
        for claim in claims:  # a check at tiny scale: records made with the same extra overrides
            for form in claim.forms:
                form.overrides = dict(form.overrides, **extra)
        outputs.append((markdown_claims(evaluate_claims(claims, records, args.scale), args.scale), args.claims_out))
    for text, target in outputs:
        print(text)
        if target:
            out = Path(target)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(f"wrote {out}")
    return 0


WANDB_CHOICES = ("auto", "online", "offline", "off")
WANDB_HELP = ("Weights & Biases logging: auto follows WANDB_MODE and goes offline without an API key "
              "(files under OUT/wandb/); off never imports wandb (default auto)")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (and exit status 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


DATA_CHECK_HELP = ("do not check the data on this host before starting (for data that only the compute nodes "
                   "see); protocol, parameters and the results folder are still checked")


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """How a sweep or a bench job runs its runs: the local executor (N at a time) or one Slurm job array."""
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--jobs", type=int, default=1, help="local: runs at a time (default 1; on 2 cores, 2 runs at a "
                   "time with one thread each is as fast as one run on two threads)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: partition, gpus, time, mem, account, parallel, cpus_per_task, max_requeues, extra "
                        "(over the spec's)")
    p.add_argument("--dry-run", action="store_true", help="write the manifest and list the new runs; run nothing")


def build_parser() -> argparse.ArgumentParser:
    prog = program_name()
    parser = Parser(
        prog=prog, description="Benchmark suite for data-efficient deep learning.",
        epilog=EXAMPLES.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        """A subcommand whose --help names itself and shows its own examples."""
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              epilog=examples_of(name, prog), formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("list", "methods with their parameters and defaults; protocols")
    p.set_defaults(func=_cmd_list)

    p = command("run", "train one run and write its record (skipped if already complete)")
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
    p.add_argument("--force", action="store_true",
                   help="rerun even if a complete record exists; set aside a checkpoint that cannot be used")
    p.add_argument("--save-model", action="store_true",
                   help="keep the final model as OUT/models/<run_id>.pt (a prior or teacher for later runs)")
    p.add_argument("--wandb", choices=WANDB_CHOICES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=_cmd_run)

    p = command("bench", "every registered method that fits a protocol, at its defaults, as a sweep of its own; "
                "then its table")
    p.add_argument("--protocol", required=True)
    p.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: the protocol's first seed)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter for every method that has it (e.g. score_runs=2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol override")
    p.add_argument("--quick", action="store_true", help="a tenth of the protocol's epochs (a check, not a result)")
    p.add_argument("--save-model", action="store_true", help="keep every run's final model under OUT/models/")
    p.add_argument("--out", default="results",
                   help="results folder: records in OUT/runs/, the job's table in OUT/sweeps/NAME/tables/")
    p.add_argument("--name", default=None, help="the job's name (default bench-<protocol>): its folder under "
                   "OUT/sweeps/, and the set name `publish` gives its records")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-data-check", action="store_true", help=DATA_CHECK_HELP)
    p.add_argument("--wandb", choices=WANDB_CHOICES, default="auto", help=WANDB_HELP)
    add_executor_arguments(p)
    p.set_defaults(func=_cmd_bench)

    p = command("sweep", "expand a sweep spec into a manifest; run it here or as one Slurm job array")
    p.add_argument("spec", help="a sweep spec (.toml path, or a name in benchmarks/sweeps/)")
    add_executor_arguments(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="protocol override for all runs")
    p.add_argument("--quick", action="store_true", help="a check that every [[methods]] block runs end to end, not a "
                   "result: its first grid point, the first seed, a tenth of the protocol's epochs")
    p.add_argument("--out", default="results",
                   help="results folder: records in OUT/runs/, the manifest, logs and table in OUT/sweeps/NAME/")
    p.add_argument("--data-root", default=None, help="where every task looks for datasets first (then $BENCH_DATA)")
    p.add_argument("--skip-data-check", action="store_true", help=DATA_CHECK_HELP)
    p.add_argument("--wandb", choices=WANDB_CHOICES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=_cmd_sweep)

    p = command("task", "run one manifest line (what each Slurm array task does)")
    p.add_argument("manifest")
    p.add_argument("index", type=int, help="0-based line number ($SLURM_ARRAY_TASK_ID)")
    p.add_argument("--data-root", default=None, help="(default: the sweep's --data-root, then $BENCH_DATA)")
    p.add_argument("--device", default=None, help="(default: the manifest line's, else auto)")
    p.add_argument("--wandb", choices=WANDB_CHOICES, default=None,
                   help=WANDB_HELP + " (default: the manifest line's, which `sweep` writes, else auto)")
    p.set_defaults(func=_cmd_task)

    p = command("status", "complete / running / queued / failed / interrupted / missing per run of a "
                       "sweep or bench job, from the files (and squeue)")
    p.add_argument("sweep", help="sweep or job name, its spec (.toml), its folder, or its manifest.jsonl")
    p.add_argument("--out", default="results")
    p.set_defaults(func=_cmd_status)

    p = command("publish", "copy a sweep's or bench job's complete records into the published records "
                       "(results/records/<name>/), which `nox -s tables` turns into results/tables/")
    p.add_argument("sweep", help="sweep or job name (bench-<protocol> for bench), its spec, folder or manifest")
    p.add_argument("--out", default="results", help="the results folder the job wrote to (default results)")
    p.add_argument("--to", default="results/records", help="published records folder (default results/records)")
    p.add_argument("--partial", action="store_true", help="publish the complete runs even if others are not")
    p.set_defaults(func=_cmd_publish)

    p = command("tables", "Markdown and LaTeX tables per protocol from the run records (or W&B)")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--records", default=None, metavar="DIR",
                   help="a folder of record files instead (searched recursively), e.g. results/records")
    p.add_argument("--out", default=None, help="also write <protocol>.md and .tex per protocol, runs.csv, "
                   "summary.csv, the plots (OUT/plots) and report.html here")
    p.add_argument("--from-wandb", default=None, metavar="ENTITY/PROJECT",
                   help="rebuild the tables from W&B's runs instead of the local records")
    p.add_argument("--target-tolerance", type=float, default=0.01, metavar="T",
                   help="target accuracy = full-data mean test accuracy - T (default 0.01 = 1 pp)")
    p.add_argument("--published", action="store_true",
                   help="rebuild the published tables: from --records (default results/records) into --out "
                        "(default results/tables), with plots and replication.md, replacing what was there")
    p.add_argument("--papers", default=None, help="with --published: the paper files (default: those the package ships)")
    p.set_defaults(func=_cmd_tables)

    p = command("plots", "accuracy vs compute saved, and accuracy vs FLOPs curves (PNG and PDF)")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--records", default=None, metavar="DIR", help="a folder of record files instead")
    p.add_argument("--out", required=True, help="folder for the plots")
    p.set_defaults(func=_cmd_plots)

    p = command("replicate", "our runs next to the papers' numbers, and their claims checked "
                "(holds / fails / undecided / not run) from the records (benchmarks/resources/paper/*.toml)")
    p.add_argument("--runs", default="results", help="results folder holding runs/ (default results)")
    p.add_argument("--records", default=None, metavar="DIR", help="a folder of record files instead")
    p.add_argument("--papers", default=None, help="folder of paper TOML files (default: those the package ships, "
                   "benchmarks/resources/paper)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the Markdown table here")
    p.add_argument("--scale", choices=["cpu", "paper"], default="cpu",
                   help="which form of the claims ([[claim]] tables) to check: the CPU-scale analogues (default) "
                        "or the paper-scale protocols")
    p.add_argument("--claims-out", default=None, metavar="FILE", help="also write the claims table here")
    p.add_argument("--claims-only", action="store_true", help="only the claims table, not the paper numbers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="claims: match records made with these protocol overrides too (a tiny-scale check, e.g. "
                        "the --set items a sweep was run with)")
    p.set_defaults(func=_cmd_replicate)
    add_scores_parser(sub)
    add_reproduce_parser(sub)
    add_toy_parser(sub)
    return parser


def one_line(message: str) -> str:
    """A message as one line, whatever it quotes (a multi-line error from a library)."""
    return "; ".join(part.strip() for part in message.strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    # Line by line even into a file or a pipe (a sweep worker's log, `nox ... > log`): progress is seen as
    # it happens, not when a block buffer fills or the process ends.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): nothing to say, as a shell's SIGPIPE
        return 141
    except OSError as exc:  # a path the user gave that cannot be read or written: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_and_exit(argv: list[str] | None = None) -> NoReturn:
    """Exit with main()'s status, first writing it to $BENCH_STATUS_FILE when set (slurm/array.sbatch
    reads it: bash can lose a child's exit status to a signal trap that lands as the child exits)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    path = os.environ.get("BENCH_STATUS_FILE")
    from benchmarks.core.launch import is_rank_zero

    if path and is_rank_zero():  # a data-parallel run: rank 0 speaks for the task
        try:
            with open(path, "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass  # the template falls back on wait's answer
    if "benchmarks.core.distributed" not in sys.modules:  # nothing trained here, so no process group to leave
        sys.exit(code)  # and a command that never needed torch does not import it only to exit
    from benchmarks.core.distributed import end_process

    end_process(code)


if __name__ == "__main__":
    run_and_exit()
