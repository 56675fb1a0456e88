"""Sweeps: a spec (TOML) -> a manifest (one JSON line per run) -> run here, or one Slurm job array.

Spec:
    name = "smoke"                      # the sweep's folder: results/sweeps/<name>/
    protocol = "smoke"
    seeds = [0, 1]
    overrides = { epochs = 2 }          # optional protocol overrides for every run (a [[methods]] block
                                        # may add its own: overrides = { holdout = 0.1 })
    save_model = false                  # optional: keep every run's final model (OUT/models/<run_id>.pt)
    [slurm]                             # optional defaults for --executor slurm
    partition = "gpu"; gpus = 1; time = "04:00:00"; mem = "16G"; account = ""; parallel = 8
    [[methods]]
    name = "uniform"
    grid = { fraction = [0.3, 0.5] }    # the cartesian product of the lists; scalars allowed
    slurm = { time = "02:00:00" }       # optional: this block's Slurm options over the spec's
    [tuning]                            # optional: every block tuned the same way (benchmarks/jobs/tuning.py)
    trials = 6; metric = "val_worst_group_acc"; seed = 1000
    (a block with `tune = false` runs its grid untuned; in a tuned block the grid fixes parameters)

Adding a method to a sweep is one [[methods]] block. Blocks with different Slurm options are
submitted as one job array each (Slurm sets --time per array). `--quick` (a check that every block
runs end to end, not a result) keeps the first seed and the first value of every grid axis.

A manifest line holds everything a task needs (run id, spec fields, results folder), so an array
task reads only its own line. The manifest is written once by the submitter (atomically); tasks
only write their own records, so concurrent tasks never touch a shared file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.protocol import find_toml, parse_value, read_toml
from benchmarks.core.record import RecordError, atomic_write_bytes, load_record
from benchmarks.core.registry import method_class, resolve_params
from benchmarks.core.spec import RunSpec
from benchmarks.errors import BenchError
from benchmarks.jobs.tasks import LIVE_SLURM_STATES, MAX_REQUEUES, marker_alive, read_marker, slurm_states
from benchmarks.jobs.tuning import TunedSetting, Tuning, parse_tuning, plan_setting

SWEEP_DIR = Path(__file__).resolve().parents[1] / "sweeps"
SPEC_KEYS = {"name", "protocol", "seeds", "overrides", "methods", "slurm", "description", "save_model", "tuning"}
METHOD_KEYS = {"name", "grid", "slurm", "overrides", "tune"}
# gpus: per node; nodes x ranks_per_node > 1 makes each run one data-parallel job (srun, one rank per GPU).
SLURM_DEFAULTS = {"partition": None, "gpus": 0, "time": None, "mem": None, "account": None, "parallel": 8,
                  "cpus_per_task": 1, "extra": [], "max_requeues": MAX_REQUEUES, "nodes": 1, "ranks_per_node": 1}
SLURM_KEYS = set(SLURM_DEFAULTS)
MANIFEST_KEYS = ("run_id", "protocol", "method", "params", "seed", "overrides", "out")
# The array template ships inside the package (benchmarks/resources/, package data): found the same way from a
# wheel as from a clone, so an installed copy submits too (sbatch copies the script as it submits).
SBATCH_TEMPLATE = Path(str(files("benchmarks") / "resources" / "array.sbatch"))


@dataclass
class Sweep:
    name: str
    protocol: str
    runs: list[RunSpec]
    slurm: dict = field(default_factory=dict)
    source: str = ""
    save_model: bool = False
    run_slurm: list[dict] = field(default_factory=list)  # per run: its [[methods]] block's Slurm options
    tuning: Tuning | None = None  # the spec's [tuning] table
    # The tuned settings: their trials are in `runs`; their selected runs join `runs` once chosen
    # (benchmarks.jobs.tuning.add_selected_runs, which needs the results folder's trial records).
    tuned: list[TunedSetting] = field(default_factory=list)


def _check_keys(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BenchError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def load_sweep(name_or_path: str, extra_overrides: dict | None = None, quick: bool = False) -> Sweep:
    path = find_toml(name_or_path, SWEEP_DIR, "sweep spec")
    where = str(path)
    spec = read_toml(path)
    _check_keys(spec, SPEC_KEYS, where)
    for key in ("name", "protocol", "seeds", "methods"):
        if key not in spec:
            raise BenchError(f"{where}: missing key '{key}'")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise BenchError(f"{where}: 'seeds' must be a non-empty list of integers")
    if quick:
        seeds = seeds[:1]
    spec_overrides, extra_overrides = spec.get("overrides", {}), extra_overrides or {}
    slurm = dict(SLURM_DEFAULTS)
    _check_keys(spec.get("slurm", {}), SLURM_KEYS, f"{where} [slurm]")
    slurm.update(check_slurm_options(spec.get("slurm", {}), f"{where} [slurm]"))
    if not spec["methods"]:
        raise BenchError(f"{where}: 'methods' is empty")
    tuning = parse_tuning(spec["tuning"], where, spec["seeds"], quick) if "tuning" in spec else None
    runs, run_slurm, tuned = [], [], []
    for i, entry in enumerate(spec["methods"]):
        entry_where = f"{where} methods[{i}]"
        _check_keys(entry, METHOD_KEYS, entry_where)
        if "name" not in entry:
            raise BenchError(f"{entry_where}: missing key 'name'")
        method_class(entry["name"])
        block_slurm = entry.get("slurm", {})
        _check_keys(block_slurm, SLURM_KEYS, f"{entry_where} slurm")
        check_slurm_options(block_slurm, f"{entry_where} slurm")
        block_overrides = entry.get("overrides", {})
        if not isinstance(block_overrides, dict):
            raise BenchError(f"{entry_where}: 'overrides' must be a table, e.g. overrides = {{ holdout = 0.1 }}")
        # The spec's overrides, then the block's (a family that needs its own setting, with its own
        # reference run), then the command line's (--set, --quick).
        overrides = {**spec_overrides, **block_overrides, **extra_overrides}
        grid = entry.get("grid", {})
        if not isinstance(grid, dict):
            raise BenchError(f"{entry_where}: 'grid' must be a table, e.g. grid = {{ fraction = [0.5, 0.3] }}")
        axes = {}
        for key, values in grid.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise BenchError(f"{entry_where}: grid '{key}' is empty")
            axes[key] = values[:1] if quick else values
        tune = entry.get("tune", tuning is not None)
        if not isinstance(tune, bool):
            raise BenchError(f"{entry_where}: 'tune' must be true or false, got {tune!r}")
        if tune and tuning is None:
            raise BenchError(f"{entry_where}: tune = true needs the spec's [tuning] table (trials, metric, seed)")
        for combo in itertools.product(*axes.values()):
            try:
                params = resolve_params(entry["name"], dict(zip(axes, combo)))
            except BenchError as exc:
                raise BenchError(f"{entry_where}: {exc}") from None
            if tune:  # phase 1: the trials; the grid's values are fixed, the block's and --set's settings too
                setting = plan_setting(i, spec["protocol"], entry["name"], dict(zip(axes, combo)), overrides,
                                       set(block_overrides) | set(extra_overrides), tuning, seeds, block_slurm,
                                       entry_where)
                tuned.append(setting)
                runs += setting.trials
                run_slurm += [dict(block_slurm) for _ in setting.trials]
                continue
            runs += [RunSpec(spec["protocol"], entry["name"], params, seed, overrides) for seed in seeds]
            run_slurm += [dict(block_slurm) for _ in seeds]
    for run in runs:  # the protocol, overrides and method-protocol fit are checked before anything is written
        run.resolve()
    save_model = spec.get("save_model", False)
    if not isinstance(save_model, bool):
        raise BenchError(f"{where}: 'save_model' must be true or false, got {save_model!r}")
    return Sweep(spec["name"], spec["protocol"], runs, slurm, where, save_model, run_slurm, tuning, tuned)


def manifest_lines(sweep: Sweep, out: str | Path, data_root: str | None = None,
                   settings: dict | None = None) -> list[dict]:
    """One line per run: its identity and every setting its task needs (`settings`: e.g. the W&B mode)."""
    lines = []
    for i, spec in enumerate(sweep.runs):
        line = {"run_id": spec.run_id, "protocol": spec.protocol, "method": spec.method,
                "params": spec.params, "seed": spec.seed, "overrides": spec.overrides, "group": sweep.name,
                "out": str(Path(out).resolve()), "save_model": sweep.save_model,
                "data_root": str(Path(data_root).resolve()) if data_root else None, **(settings or {})}
        if i < len(sweep.run_slurm) and sweep.run_slurm[i]:
            line["slurm"] = sweep.run_slurm[i]
        if spec.tuning is not None:  # a trial or a selected run: the descriptor is part of its identity
            line["tuning"] = spec.tuning
        lines.append(line)
    return lines


def write_manifest(sweep: Sweep, out: str | Path, data_root: str | None = None,
                   settings: dict | None = None) -> tuple[Path, list[dict]]:
    lines = manifest_lines(sweep, out, data_root, settings)
    ids = [line["run_id"] for line in lines]
    if len(set(ids)) != len(ids):
        raise BenchError(f"{sweep.source}: the sweep lists the same run twice (duplicate grid values or seeds)")
    path = ResultsLayout(out).manifest(sweep.name)
    atomic_write_bytes(path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode())
    return path, lines


def read_manifest(manifest: str | Path) -> list[dict]:
    """Every line of a manifest, checked: one BenchError line names the first bad one."""
    try:
        text = Path(manifest).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BenchError(f"cannot read manifest {manifest}: {getattr(exc, 'strerror', None) or exc}") from None
    lines = []
    for number, raw in enumerate(text.splitlines()):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BenchError(f"manifest {manifest}, line {number}: not JSON ({exc.msg}); "
                             "write it again with `python -m benchmarks sweep SPEC --dry-run`") from None
        missing = [k for k in MANIFEST_KEYS if not isinstance(line, dict) or k not in line]
        if missing:
            raise BenchError(f"manifest {manifest}, line {number}: lacks '{missing[0]}' (a manifest line holds "
                             f"{', '.join(MANIFEST_KEYS)}); write it again with `sweep SPEC --dry-run`")
        lines.append(line)
    if not lines:
        raise BenchError(f"manifest {manifest} has no runs")
    return lines


def read_manifest_line(manifest: str | Path, index: int) -> dict:
    lines = read_manifest(manifest)
    if not 0 <= index < len(lines):
        raise BenchError(f"manifest {manifest} has {len(lines)} lines (0 to {len(lines) - 1}); no line {index}")
    return lines[index]


def line_spec(line: dict) -> RunSpec:
    return RunSpec(line["protocol"], line["method"], line["params"], line["seed"], line["overrides"],
                   tuning=line.get("tuning"))


# -- state of each run, from the files (and squeue, for what is queued) ---------------------------------

LIVE_STATES = ("running", "queued")  # a resubmission leaves these alone


def submitted_tasks(manifest: Path) -> dict[int, str]:
    """Manifest index -> the Slurm array task id of its latest submission (submissions.jsonl)."""
    tasks: dict[int, str] = {}
    try:
        text = (manifest.parent / "submissions.jsonl").read_text()
    except OSError:
        return tasks
    for raw in text.splitlines():
        try:
            entry = json.loads(raw)
            for index in entry["indices"]:
                tasks[int(index)] = f"{entry['job_id']}_{index}"
        except (ValueError, KeyError, TypeError):
            continue  # a damaged bookkeeping line proves nothing
    return tasks


def run_state(line: dict, slurm: dict[str, str] | None = None, submitted: str | None = None) -> tuple[str, str]:
    """(state, detail): complete | failed | running | queued | interrupted | corrupt | missing.

    running: a marker that something proves alive (benchmarks/jobs/tasks.py); queued: a Slurm task of
    this run that squeue still lists, not started yet. A marker that proves nothing (a task killed
    with SIGKILL) leaves the run interrupted (it has a checkpoint) or missing.
    """
    out, rid = line["out"], line["run_id"]
    path = ResultsLayout(out).record(rid)
    marker_path = ResultsLayout(out).marker(rid)
    marker = read_marker(marker_path)
    alive, why = marker_alive(marker, marker_path, slurm) if marker else (False, "")
    if path.exists():
        try:
            record = load_record(path)
        except RecordError as exc:
            return "corrupt", str(exc)
        if record["status"] == "complete":
            acc = (record.get("metrics") or {}).get("test_acc")
            return "complete", f"test_acc={acc:.4f}" if isinstance(acc, float) else ""
        if not alive:
            return "failed", f"{record.get('error')} ({path})"
    if alive:
        return "running", why
    if submitted and slurm is not None and slurm.get(submitted) in LIVE_SLURM_STATES:
        return "queued", f"slurm task {submitted} {slurm[submitted].lower()}"
    dead = f" (stale marker: {why})" if marker else ""
    if ResultsLayout(out).checkpoint(rid).exists():
        return "interrupted", f"checkpoint {ResultsLayout(out).checkpoint(rid)}{dead}"
    return "missing", dead.strip()


def sweep_status(manifest: Path) -> list[tuple[int, dict, str, str]]:
    lines = read_manifest(manifest)
    submitted = submitted_tasks(manifest)
    jobs = set(submitted.values())
    for line in lines:
        marker = read_marker(ResultsLayout(line["out"]).marker(line["run_id"]))
        if marker and marker.job:
            jobs.add(marker.job)
    slurm = slurm_states(jobs) if jobs else {}  # one squeue call for the whole sweep
    return [(i, line, *run_state(line, slurm, submitted.get(i))) for i, line in enumerate(lines)]


def folder_lines(out: str | Path) -> list[dict]:
    """Pseudo manifest lines for every run a results folder knows of (single `run`s, no manifest): records,
    checkpoints of unfinished runs and live markers, with the method and parameters a record names."""
    layout = ResultsLayout(out)
    ids = {p.stem for p in layout.runs.glob("*.json")} | {p.stem for p in layout.checkpoints.glob("*.pt")}
    ids |= {p.name for p in (layout.root / "running").glob("*") if "." not in p.name}
    lines = []
    for rid in sorted(ids):
        line = {"out": str(out), "run_id": rid, "method": "?", "params": {}, "seed": "?"}
        try:
            record = load_record(layout.record(rid))
            line.update(method=record["method"], params=record["params"], seed=record["seed"],
                        wall_clock_s=record.get("wall_clock_s"))
        except RecordError:
            pass  # no record yet (unfinished) or a damaged one: run_state says which
        lines.append(line)
    return lines


def progress_summary(states: list[tuple[int, dict, str, str]]) -> str:
    """done/total, failures, what is under way, and an ETA from the wall-clock of the runs finished so far
    (at as many runs at a time as are running now)."""
    counts: dict[str, int] = {}
    for _, _, state, _ in states:
        counts[state] = counts.get(state, 0) + 1
    total, complete = len(states), counts.get("complete", 0)
    text = f"progress: {complete}/{total} complete"
    for state in ("failed", "corrupt", "running", "queued", "interrupted", "missing"):
        if counts.get(state):
            text += f", {counts[state]} {state}"
    walls = []
    for _, line, state, _ in states:
        if state == "complete":
            record_wall = line.get("wall_clock_s")
            if record_wall is None:
                try:
                    record_wall = load_record(ResultsLayout(line["out"]).record(line["run_id"])).get("wall_clock_s")
                except RecordError:
                    record_wall = None
            if isinstance(record_wall, (int, float)):
                walls.append(record_wall)
    left = total - complete - counts.get("failed", 0) - counts.get("corrupt", 0)
    if left and walls:
        at_once = max(1, counts.get("running", 0))
        mean = sum(walls) / len(walls)
        text += (f"; ETA ~{_duration(mean * left / at_once)} (mean run {_duration(mean)} over {len(walls)} finished, "
                 f"{at_once} at a time)")
    return text


# -- executors ---------------------------------------------------------------------------------------

def compress_indices(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (Slurm's --array syntax)."""
    parts = []
    for _, group in itertools.groupby(enumerate(sorted(indices)), key=lambda p: p[1] - p[0]):
        values = [v for _, v in group]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts)


def task_command(manifest: Path, index: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks", "task", str(manifest), str(index)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60:02d} s"


def run_local(manifest: Path, indices: list[int], jobs: int = 1, log=print) -> dict[str, list[int]]:
    """Run manifest lines as subprocesses, `jobs` at a time; returns indices by final state."""
    env = dict(os.environ)
    if jobs > 1:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    logs = manifest.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, done, failed = list(indices), {}, 0, 0
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop(0)
            line = read_manifest_line(manifest, index)
            log(f"[start] [{index}] {line['method']} {line['params']} seed {line['seed']}: its epochs are logged in "
                f"{logs / f'local_{index}.out'}")
            sys.stdout.flush()  # a log file sees each line as it happens
            log_file = open(logs / f"local_{index}.out", "ab")  # noqa: SIM115 - closed when the task ends
            running[index] = (subprocess.Popen(task_command(manifest, index), stdout=log_file,
                                               stderr=subprocess.STDOUT, env=env), log_file, time.perf_counter())
        for index, (proc, log_file, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log_file.close()
            del running[index]
            done += 1
            line = read_manifest_line(manifest, index)
            state, detail = run_state(line, {})
            failed += state != "complete"
            elapsed = time.perf_counter() - started
            left = len(indices) - done
            eta = f", ETA {_duration(elapsed / done * left)}" if left else ""
            log(f"[{done}/{len(indices)}] {state:<9} {line['method']} {line['params']} seed {line['seed']} "
                f"({time.perf_counter() - t0:.0f} s) {detail}".rstrip()
                + f" | {done} done, {failed} not complete, {left} to go{eta}")
            sys.stdout.flush()
        time.sleep(0.2)
    log(f"sweep finished in {time.perf_counter() - started:.0f} s; logs in {logs}")
    final = {}
    for i, _, state, _ in sweep_status(manifest):
        if i in indices:
            final.setdefault(state, []).append(i)
    return final


def sbatch_command(manifest: Path, indices: list[int], slurm: dict, job_name: str,
                   task_manifest: Path | None = None) -> list[str]:
    """The sbatch call; its tasks read `task_manifest` (default: the manifest itself)."""
    logs = manifest.parent / "logs"
    command = ["sbatch", "--parsable", f"--array={compress_indices(indices)}%{slurm['parallel']}",
               f"--job-name={job_name}", f"--output={logs}/%A_%a.out", f"--cpus-per-task={slurm['cpus_per_task']}"]
    if slurm.get("partition"):
        command.append(f"--partition={slurm['partition']}")
    if slurm.get("gpus"):
        command.append(f"--gres=gpu:{slurm['gpus']}")
    if slurm.get("nodes", 1) > 1 or slurm.get("ranks_per_node", 1) > 1:  # one data-parallel run per array task
        command += [f"--nodes={slurm.get('nodes', 1)}", f"--ntasks-per-node={slurm.get('ranks_per_node', 1)}"]
    if slurm.get("time"):
        command.append(f"--time={slurm['time']}")
    if slurm.get("mem"):
        command.append(f"--mem={slurm['mem']}")
    if slurm.get("account"):
        command.append(f"--account={slurm['account']}")
    command += list(slurm.get("extra") or [])
    return command + [str(SBATCH_TEMPLATE), str(task_manifest or manifest)]


def submit_slurm(manifest: Path, indices: list[int], slurm: dict, job_name: str, log=print) -> str:
    (manifest.parent / "logs").mkdir(parents=True, exist_ok=True)
    # The tasks read a copy of the manifest as submitted: `sweep` rewrites the manifest each time it
    # runs, and an edited spec must not redirect a queued task's line number to another run.
    # The copy's lines also carry this array's requeue cap: every setting a task needs is in its line.
    frozen = manifest.parent / "submitted" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
    cap = slurm.get("max_requeues", MAX_REQUEUES)
    atomic_write_bytes(frozen, "".join(json.dumps(dict(line, max_requeues=cap), sort_keys=True) + "\n"
                                       for line in read_manifest(manifest)).encode())
    command = sbatch_command(manifest, indices, slurm, job_name, task_manifest=frozen)
    env = dict(os.environ, BENCH_PYTHON=os.environ.get("BENCH_PYTHON", sys.executable))
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        frozen.unlink()
        raise BenchError("sbatch did not answer within 60 s: is the Slurm controller up? (scontrol ping)") from None
    except FileNotFoundError:
        frozen.unlink()
        raise BenchError("sbatch not found: is this a Slurm login node? (slurm/cluster-up.sh starts a "
                         "one-node cluster on this machine)") from None
    if result.returncode != 0:
        frozen.unlink()
        raise BenchError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    with open(manifest.parent / "submissions.jsonl", "a") as f:
        f.write(json.dumps({"job_id": job_id, "indices": indices, "command": command, "time": time.time()}) + "\n")
    log(f"submitted job array {job_id} ({len(indices)} tasks): {' '.join(command)}")
    log(f"logs: {manifest.parent / 'logs'}/{job_id}_<task>.out ; status: python -m benchmarks status "
        f"{manifest.parent}")
    return job_id


def slurm_groups(lines: list[dict], indices: list[int], spec_options: dict,
                 command_line: dict) -> list[tuple[dict, list[int]]]:
    """The job arrays to submit: (options, manifest indices) per distinct set of Slurm options.

    A line's options are the spec's, then its [[methods]] block's, then the command line's (--slurm wins).
    """
    groups: dict[str, tuple[dict, list[int]]] = {}
    for i in indices:
        options = {**spec_options, **lines[i].get("slurm", {}), **command_line}
        groups.setdefault(json.dumps(options, sort_keys=True), (options, []))[1].append(i)
    return list(groups.values())


def parse_slurm_options(items: list[str]) -> dict:
    """`--slurm KEY=VALUE` options, each checked (a key without a value is an error, not a default)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SLURM_KEYS:
            raise BenchError(f"--slurm '{item}': expected KEY=VALUE with KEY in {', '.join(sorted(SLURM_KEYS))}")
        if not value.strip():
            raise BenchError(f"--slurm '{item}': '{key}' needs a value")
        options[key] = parse_value(value.strip())
    return check_slurm_options(options, "--slurm")


_SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE", re.IGNORECASE)
_SLURM_MEM = re.compile(r"\d+[KMGT]?", re.IGNORECASE)


def check_slurm_options(options: dict, where: str) -> dict:
    """Types and ranges of Slurm options (from a spec's [slurm] table or --slurm), before sbatch sees them."""
    def bad(key: str, what: str) -> BenchError:
        return BenchError(f"{where}: '{key}' must be {what}, got {options[key]!r}")

    for key, value in options.items():
        if key in ("gpus", "cpus_per_task", "parallel", "max_requeues", "nodes", "ranks_per_node"):
            low = 0 if key in ("gpus", "max_requeues") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise bad(key, f"a whole number >= {low}")
        elif key in ("partition", "account"):
            if not isinstance(value, str) or not re.fullmatch(r"[\w.,-]*", value):
                raise bad(key, "a name (letters, digits, - _ . ,)")
        elif key == "time":
            if not isinstance(value, str) or not _SLURM_TIME.fullmatch(value):
                raise bad(key, "a Slurm time such as \"04:00:00\", \"1-00:00:00\" or \"30\" (minutes)")
        elif key == "mem":
            if not isinstance(value, str) or not _SLURM_MEM.fullmatch(value):
                raise bad(key, "a Slurm size such as \"16G\" or \"4000M\"")
        elif key == "extra":
            if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("-") for v in value):
                raise bad(key, "a list of sbatch options such as [\"--qos=high\"]")
    return options
