"""Sweeps: a spec (TOML) -> a manifest (one JSON line per run) -> run here, or one Slurm job array.

Spec:
    name = "smoke"                      # the sweep's folder: results/sweeps/<name>/
    protocol = "smoke"
    seeds = [0, 1]
    overrides = { epochs = 2 }          # optional protocol overrides for every run
    [slurm]                             # optional defaults for --executor slurm
    partition = "gpu"; gpus = 1; time = "04:00:00"; mem = "16G"; account = ""; parallel = 8
    [[methods]]
    name = "uniform"
    grid = { fraction = [0.3, 0.5] }    # the cartesian product of the lists; scalars allowed

A manifest line holds everything a task needs (run id, spec fields, results folder), so an array
task reads only its own line. The manifest is written once by the submitter (atomically); tasks
only write their own records, so concurrent tasks never touch a shared file.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BenchError
from .protocol import find_toml, parse_value, read_toml
from .record import RecordError, atomic_write_bytes, load_record, record_path
from .registry import method_class, resolve_params
from .run import RunSpec, checkpoint_path, run_id

SWEEP_DIR = Path(__file__).parent / "sweeps"
SPEC_KEYS = {"name", "protocol", "seeds", "overrides", "methods", "slurm", "description"}
METHOD_KEYS = {"name", "grid"}
SLURM_KEYS = {"partition", "gpus", "time", "mem", "account", "parallel", "cpus_per_task", "extra"}
SLURM_DEFAULTS = {"partition": None, "gpus": 0, "time": None, "mem": None, "account": None, "parallel": 8,
                  "cpus_per_task": 1, "extra": []}
SBATCH_TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "array.sbatch"


@dataclass
class Sweep:
    name: str
    protocol: str
    runs: list[RunSpec]
    slurm: dict = field(default_factory=dict)
    source: str = ""


def _check_keys(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BenchError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def load_sweep(name_or_path: str, extra_overrides: dict | None = None) -> Sweep:
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
    overrides = dict(spec.get("overrides", {}), **(extra_overrides or {}))
    slurm = dict(SLURM_DEFAULTS)
    _check_keys(spec.get("slurm", {}), SLURM_KEYS, f"{where} [slurm]")
    slurm.update(spec.get("slurm", {}))
    if not spec["methods"]:
        raise BenchError(f"{where}: 'methods' is empty")
    runs = []
    for i, entry in enumerate(spec["methods"]):
        entry_where = f"{where} methods[{i}]"
        _check_keys(entry, METHOD_KEYS, entry_where)
        if "name" not in entry:
            raise BenchError(f"{entry_where}: missing key 'name'")
        method_class(entry["name"])
        grid = entry.get("grid", {})
        axes = {}
        for key, values in grid.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise BenchError(f"{entry_where}: grid '{key}' is empty")
            axes[key] = values
        for combo in itertools.product(*axes.values()):
            params = resolve_params(entry["name"], dict(zip(axes, combo)))
            runs += [RunSpec(spec["protocol"], entry["name"], params, seed, overrides) for seed in seeds]
    runs[0].resolved()  # the protocol and overrides are checked before anything is written
    return Sweep(spec["name"], spec["protocol"], runs, slurm, where)


def sweep_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "sweeps" / name


def manifest_path(out: str | Path, name: str) -> Path:
    return sweep_dir(out, name) / "manifest.jsonl"


def manifest_lines(sweep: Sweep, out: str | Path) -> list[dict]:
    lines = []
    for spec in sweep.runs:
        rid = run_id(spec.protocol, spec.method, spec.params, spec.seed, spec.overrides)
        lines.append({"run_id": rid, "protocol": spec.protocol, "method": spec.method, "params": spec.params,
                      "seed": spec.seed, "overrides": spec.overrides, "group": sweep.name,
                      "out": str(Path(out).resolve())})
    return lines


def write_manifest(sweep: Sweep, out: str | Path) -> tuple[Path, list[dict]]:
    lines = manifest_lines(sweep, out)
    ids = [line["run_id"] for line in lines]
    if len(set(ids)) != len(ids):
        raise BenchError(f"{sweep.source}: the sweep lists the same run twice (duplicate grid values or seeds)")
    path = manifest_path(out, sweep.name)
    atomic_write_bytes(path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode())
    return path, lines


def read_manifest_line(manifest: str | Path, index: int) -> dict:
    try:
        lines = Path(manifest).read_text().splitlines()
    except OSError as exc:
        raise BenchError(f"cannot read manifest {manifest}: {exc}") from None
    if not 0 <= index < len(lines):
        raise BenchError(f"manifest {manifest} has {len(lines)} lines; no line {index}")
    return json.loads(lines[index])


def line_spec(line: dict) -> RunSpec:
    return RunSpec(line["protocol"], line["method"], line["params"], line["seed"], line["overrides"])


# -- state of each run, from the files alone --------------------------------------------------------

def running_marker(out: str | Path, rid: str) -> Path:
    return Path(out) / "running" / rid


def run_state(line: dict) -> tuple[str, str]:
    """(state, detail): complete | failed | running | interrupted | corrupt | missing."""
    out, rid = line["out"], line["run_id"]
    path = record_path(out, rid)
    if path.exists():
        try:
            record = load_record(path)
        except RecordError as exc:
            return "corrupt", str(exc)
        if record["status"] == "complete":
            acc = (record.get("metrics") or {}).get("test_acc")
            return "complete", f"test_acc={acc:.4f}" if isinstance(acc, float) else ""
        if not running_marker(out, rid).exists():
            return "failed", f"{record.get('error')} ({path})"
    marker = running_marker(out, rid)
    if marker.exists():
        return "running", marker.read_text().strip()
    if checkpoint_path(out, rid).exists():
        return "interrupted", f"checkpoint {checkpoint_path(out, rid)}"
    return "missing", ""


def sweep_status(manifest: Path) -> list[tuple[int, dict, str, str]]:
    lines = [json.loads(text) for text in manifest.read_text().splitlines() if text.strip()]
    return [(i, line, *run_state(line)) for i, line in enumerate(lines)]


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


def run_local(manifest: Path, indices: list[int], jobs: int = 1, log=print) -> dict[str, list[int]]:
    """Run manifest lines as subprocesses, `jobs` at a time; returns indices by final state."""
    env = dict(os.environ)
    if jobs > 1:  # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    logs = manifest.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(indices), {}, 0
    started = time.perf_counter()
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop(0)
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
            state, detail = run_state(line)
            log(f"[{done}/{len(indices)}] {state:<9} {line['method']} {line['params']} seed {line['seed']} "
                f"({time.perf_counter() - t0:.0f} s) {detail}")
        time.sleep(0.2)
    log(f"sweep finished in {time.perf_counter() - started:.0f} s; logs in {logs}")
    final = {}
    for i, _, state, _ in sweep_status(manifest):
        if i in indices:
            final.setdefault(state, []).append(i)
    return final


def sbatch_command(manifest: Path, indices: list[int], slurm: dict, job_name: str) -> list[str]:
    logs = manifest.parent / "logs"
    command = ["sbatch", "--parsable", f"--array={compress_indices(indices)}%{slurm['parallel']}",
               f"--job-name={job_name}", f"--output={logs}/%A_%a.out", f"--cpus-per-task={slurm['cpus_per_task']}"]
    if slurm.get("partition"):
        command.append(f"--partition={slurm['partition']}")
    if slurm.get("gpus"):
        command.append(f"--gres=gpu:{slurm['gpus']}")
    if slurm.get("time"):
        command.append(f"--time={slurm['time']}")
    if slurm.get("mem"):
        command.append(f"--mem={slurm['mem']}")
    if slurm.get("account"):
        command.append(f"--account={slurm['account']}")
    command += list(slurm.get("extra") or [])
    return command + [str(SBATCH_TEMPLATE), str(manifest)]


def submit_slurm(manifest: Path, indices: list[int], slurm: dict, job_name: str, log=print) -> str:
    (manifest.parent / "logs").mkdir(parents=True, exist_ok=True)
    command = sbatch_command(manifest, indices, slurm, job_name)
    env = dict(os.environ, BENCH_PYTHON=os.environ.get("BENCH_PYTHON", sys.executable))
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    except FileNotFoundError:
        raise BenchError("sbatch not found: is this a Slurm login node? (slurm/cluster-up.sh starts a "
                         "one-node cluster on this machine)") from None
    if result.returncode != 0:
        raise BenchError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    with open(manifest.parent / "submissions.jsonl", "a") as f:
        f.write(json.dumps({"job_id": job_id, "indices": indices, "command": command, "time": time.time()}) + "\n")
    log(f"submitted job array {job_id} ({len(indices)} tasks): {' '.join(command)}")
    log(f"logs: {manifest.parent / 'logs'}/{job_id}_<task>.out ; status: python -m benchmarks status "
        f"{manifest.parent}")
    return job_id


def parse_slurm_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SLURM_KEYS:
            raise BenchError(f"--slurm '{item}': expected KEY=VALUE with KEY in {', '.join(sorted(SLURM_KEYS))}")
        options[key] = parse_value(value)
    return options
