"""Declared tuning, the same for every method of a sweep: seeded random search on a validation metric.

A sweep spec asks for it with a [tuning] table (benchmarks/jobs/sweep.py):

    [tuning]
    trials = 6                          # the same number for every tuned block
    metric = "val_worst_group_acc"      # a validation metric of the record; never a test_* one
    seed = 1000                         # the sampler's seed and the trials' run seed (not one of `seeds`)
    direction = "max"                   # optional: "min" for a loss

Every [[methods]] block is tuned unless it says `tune = false` (it then runs its grid at the spec's
seeds, a default row beside the tuned ones; tables say which rows are tuned). In a tuned block the
grid FIXES parameters (each combination of its values is tuned on its own, e.g. per fraction kept),
and so do the block's own overrides and the command line's --set; everything else the method
declares (`Param(space=...)`, `Method.protocol_space`) is drawn.

Phase 1, trials: trial i of a tuned setting draws one value per dimension (sorted by name) from a
generator seeded by (tuning seed, method, i), redrawing a configuration that an earlier trial of the
setting already has; so a trial's draw depends on nothing else in the spec, and a larger `trials`
keeps the earlier trials. Each trial is one run at the tuning seed, with the drawn parameters and the
drawn protocol settings as overrides (over the spec's overrides).
Phase 2, selected: once every trial of a setting has a complete record, the trial with the best
metric (ties: the lowest trial index) is the selection, read from the trials' records and nothing
else (never a test metric), and its configuration runs at every seed of the spec. Locally `sweep`
runs both phases in one call; under Slurm, `sweep` submits what it can and says that phase 2 is
submitted by running it again once the trials are done. Running `sweep` again redoes nothing done:
the selection is recomputed from the same records, so it names the same runs.

Identity. A tuned run carries a descriptor (`tuning` in its manifest line and record) that enters its
run id, and the record holds exactly that descriptor, so a record file has one role and its label
never goes stale:
- a trial: {"role": "trial", "trial": i, the tuned names, the base overrides and their protocol
  fingerprint}. Not the trial count nor the metric: those describe the selection, so a larger
  `trials` or another metric reuses every trial already run.
- a selected run: {"role": "selected", "trial": the chosen index, "of": N, "metric", "direction",
  "seed": the tuning seed, "trial_runs": the N trials' run ids, ...}: the output of one tuning
  procedure; another metric or trial count makes new runs even where it picks the same setting.
A run with the same settings as a tuned one but no descriptor (a `tune = false` block) is another
run: shared records would carry one sweep's role into another's table. Settings coinciding that way
are rare (drawn floats) and the compute it repeats is spent and shown, not hidden.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.core.layout import ResultsLayout
from benchmarks.core.protocol import apply_overrides, fingerprint, load_protocol
from benchmarks.core.record import RecordError, load_record, params_label
from benchmarks.core.registry import Space, method_class, resolve_params
from benchmarks.core.spec import RunSpec
from benchmarks.errors import BenchError

TUNING_KEYS = {"trials", "metric", "seed", "direction"}
DIRECTIONS = ("max", "min")
VALIDATION_PREFIX = "val_"  # the metrics of the validation split (benchmarks/core/evaluation.py)
MAX_REDRAWS = 1000  # a trial redraws a configuration an earlier trial has; a tiny space runs out


@dataclass(frozen=True)
class Tuning:
    """A spec's [tuning] table, checked."""

    trials: int
    metric: str
    seed: int
    direction: str = "max"

    @property
    def label(self) -> str:
        return f"{self.trials} trials on {self.metric}" + (" (lowest)" if self.direction == "min" else "")


def parse_tuning(table: object, where: str, seeds: list[int], quick: bool = False) -> Tuning:
    """The [tuning] table of a spec, or one BenchError line. `quick` keeps one trial (a check, not a result)."""
    if not isinstance(table, dict):
        raise BenchError(f"{where}: [tuning] must be a table (trials, metric, seed)")
    unknown = sorted(set(table) - TUNING_KEYS)
    if unknown:
        raise BenchError(f"{where} [tuning]: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(TUNING_KEYS))})")
    for key in ("trials", "metric", "seed"):
        if key not in table:
            raise BenchError(f"{where} [tuning]: missing key '{key}'")
    trials, metric, seed = table["trials"], table["metric"], table["seed"]
    direction = table.get("direction", "max")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise BenchError(f"{where} [tuning]: 'trials' must be a whole number >= 1, got {trials!r}")
    if not isinstance(metric, str) or not metric:
        raise BenchError(f"{where} [tuning]: 'metric' must be a metric's name such as \"val_worst_group_acc\"")
    if metric.startswith("test"):
        raise BenchError(f"{where} [tuning]: metric '{metric}' is a test metric, and the test split never chooses "
                         "anything; name a validation metric such as val_worst_group_acc or val_acc")
    if not metric.startswith(VALIDATION_PREFIX):
        raise BenchError(f"{where} [tuning]: metric '{metric}' is not a validation metric (tuning reads the "
                         "validation split's: val_acc, val_worst_group_acc, val_adjusted_avg_acc, ...)")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise BenchError(f"{where} [tuning]: 'seed' must be a whole number, got {seed!r}")
    if seed in seeds:
        raise BenchError(f"{where} [tuning]: seed {seed} is also one of the spec's seeds; the trials need a seed "
                         "of their own (e.g. 1000), or the selected setting's run at that seed is the trial that "
                         "chose it")
    if direction not in DIRECTIONS:
        raise BenchError(f"{where} [tuning]: 'direction' must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return Tuning(1 if quick else trials, metric, seed, direction)


def search_space(method: str, fixed_params: set[str], fixed_overrides: set[str]
                 ) -> tuple[dict[str, Space], dict[str, Space]]:
    """(parameter spaces, protocol-setting spaces) a tuned block draws: the method's declarations
    less what the block fixes (its grid's parameters; its own overrides and --set's settings)."""
    cls = method_class(method)
    params = {name: p.space for name, p in sorted(cls.params.items()) if p.space is not None and name not in fixed_params}
    settings = {key: space for key, space in sorted(cls.protocol_space.items()) if key not in fixed_overrides}
    return params, settings


def trial_generator(seed: int, method: str, trial: int) -> random.Random:
    """The generator of one trial's draw: (tuning seed, method, trial index) only, through a hash that no
    Python setting changes (str hashing is salted per process; sha256 is not)."""
    digest = hashlib.sha256(f"tuning/{seed}/{method}/{trial}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def space_size(spaces: dict[str, Space]) -> int | None:
    """How many distinct settings the spaces hold: finite only when every one is a set of choices."""
    if not all(space.choices for space in spaces.values()):
        return None
    return math.prod(len(set(space.choices)) for space in spaces.values())


def draw_trials(method: str, param_space: dict[str, Space], setting_space: dict[str, Space], trials: int,
                seed: int) -> list[tuple[dict, dict]]:
    """`trials` distinct (parameters, protocol settings) drawn from the spaces, seeded per trial."""
    drawn: list[tuple[dict, dict]] = []
    seen: set[str] = set()
    for i in range(trials):
        rng = trial_generator(seed, method, i)
        for _ in range(MAX_REDRAWS):
            config = ({k: s.sample(rng) for k, s in param_space.items()},
                      {k: s.sample(rng) for k, s in setting_space.items()})
            key = repr(config)
            if key not in seen:
                break
        else:
            size = space_size({**param_space, **setting_space})
            raise BenchError(f"method '{method}': its search space has "
                             + (f"only {size}" if size is not None else f"fewer than {trials}")
                             + f" distinct settings, fewer than trials = {trials}; ask for fewer trials (the same "
                             "for every block) or give its block tune = false")
        seen.add(key)
        drawn.append(config)
    return drawn


@dataclass
class TunedSetting:
    """One tuned setting of a sweep: a tuned block with one combination of its grid's fixed values."""

    block: int
    method: str
    protocol: str
    fixed: dict  # the grid's values: not tuned
    base_overrides: dict  # what every trial runs under before its drawn settings
    tuning: Tuning
    seeds: list[int]  # the spec's: where the selected setting runs
    trials: list[RunSpec] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)
    selected: list[RunSpec] = field(default_factory=list)  # phase 2, once chosen

    @property
    def label(self) -> str:
        return self.method + (f" ({params_label(self.fixed)})" if self.fixed else "")


def plan_setting(block: int, protocol: str, method: str, fixed: dict, base_overrides: dict, fixed_overrides: set[str],
                 tuning: Tuning, seeds: list[int], slurm: dict, where: str) -> TunedSetting:
    """The trials of one tuned setting (phase 1), each a RunSpec with its descriptor, checked."""
    param_space, setting_space = search_space(method, set(fixed), fixed_overrides)
    if not param_space and not setting_space:
        fixed_note = " once its grid and overrides fix what it declares" if fixed or fixed_overrides else ""
        raise BenchError(f"{where}: method '{method}' has nothing to tune{fixed_note} (no Param space, no "
                         "protocol_space); give the block tune = false to run it at its setting beside the tuned ones")
    base = {"tuned_params": sorted(param_space), "tuned_overrides": sorted(setting_space),
            "base_overrides": dict(base_overrides),
            "base_fingerprint": fingerprint(apply_overrides(load_protocol(protocol), base_overrides))}
    setting = TunedSetting(block, method, protocol, dict(fixed), dict(base_overrides), tuning, list(seeds),
                           slurm=dict(slurm))
    for i, (params, settings) in enumerate(draw_trials(method, param_space, setting_space, tuning.trials,
                                                       tuning.seed)):
        try:
            resolve_params(method, {**fixed, **params})
        except BenchError as exc:
            raise BenchError(f"{where}: trial {i} drew parameters the method refuses ({exc}); its declared "
                             "spaces must combine") from None
        setting.trials.append(RunSpec(protocol, method, {**fixed, **params}, tuning.seed,
                                      {**base_overrides, **settings},
                                      tuning={"role": "trial", "trial": i, **base}))
    return setting


def choose(values: list[float | None], direction: str = "max") -> int:
    """The index of the best value (ties: the lowest index; a missing or non-finite value is never best
    unless all are)."""
    best = 0
    sign = 1.0 if direction == "max" else -1.0
    for i, value in enumerate(values):
        if value is None or not math.isfinite(value):
            continue
        current = values[best]
        if current is None or not math.isfinite(current) or sign * value > sign * current:
            best = i
    return best


def trial_metric(record: dict, metric: str, where: str) -> float:
    """The named validation metric of a trial's record: the only number of it that tuning reads."""
    value = (record.get("metrics") or {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        have = ", ".join(k for k in sorted(record.get("metrics") or {}) if k.startswith(VALIDATION_PREFIX)) or "none"
        raise BenchError(f"{where}: the record has no metric '{metric}' (its validation metrics: {have}); "
                         "tune on one the protocol's validation split gives")
    return float(value)


def trial_states(setting: TunedSetting, out: str | Path) -> tuple[list[dict | None], list[str]]:
    """Each trial's complete record (None where there is none yet), and a line per trial not complete."""
    layout, records, waiting = ResultsLayout(out), [], []
    for i, spec in enumerate(setting.trials):
        path = layout.record(spec.run_id)
        try:
            record = load_record(path) if path.exists() else None
        except RecordError:
            record = None
        complete = record is not None and record.get("status") == "complete"
        records.append(record if complete else None)
        if not complete:
            waiting.append(f"trial {i} ({spec.run_id}) {'failed' if record else 'not complete'}")
    return records, waiting


def select(setting: TunedSetting, out: str | Path) -> tuple[int, float] | None:
    """(chosen trial, its metric) once every trial has a complete record; None before."""
    records, waiting = trial_states(setting, out)
    if waiting:
        return None
    layout = ResultsLayout(out)
    values = [trial_metric(r, setting.tuning.metric, str(layout.record(s.run_id)))
              for r, s in zip(records, setting.trials)]
    chosen = choose(values, setting.tuning.direction)
    return chosen, values[chosen]


def selected_specs(setting: TunedSetting, chosen: int) -> list[RunSpec]:
    """The chosen trial's configuration at every seed of the spec (phase 2), with its descriptor."""
    trial = setting.trials[chosen]
    tuning = setting.tuning
    descriptor = {key: value for key, value in trial.tuning.items() if key not in ("role", "trial")}
    descriptor = {"role": "selected", "trial": chosen, "of": tuning.trials, "metric": tuning.metric,
                  "direction": tuning.direction, "seed": tuning.seed,
                  "trial_runs": [spec.run_id for spec in setting.trials], **descriptor}
    return [RunSpec(trial.protocol, trial.method, dict(trial.params), seed, dict(trial.overrides),
                    tuning=descriptor) for seed in setting.seeds]


def add_selected_runs(sweep, out: str | Path) -> list[str]:
    """Phase 2 for every tuned setting of `sweep` whose trials are all complete and that has none yet:
    its selected runs are appended to sweep.runs (and sweep.run_slurm). Returns one line per setting."""
    lines = []
    for setting in sweep.tuned:
        if setting.selected:
            continue
        picked = select(setting, out)
        if picked is None:
            _, waiting = trial_states(setting, out)
            lines.append(f"tuning {setting.label}: waiting for {len(waiting)} of {len(setting.trials)} trials")
            continue
        chosen, value = picked
        setting.selected = selected_specs(setting, chosen)
        trial = setting.trials[chosen]
        drawn = {**{k: trial.params[k] for k in trial.tuning["tuned_params"]},
                 **{k: trial.overrides[k] for k in trial.tuning["tuned_overrides"]}}
        for spec in setting.selected:
            spec.resolve()  # checked like every run of the spec
        sweep.runs.extend(setting.selected)
        sweep.run_slurm.extend(dict(setting.slurm) for _ in setting.selected)
        lines.append(f"tuning {setting.label}: selected trial {chosen} of {len(setting.trials)} "
                     f"({setting.tuning.metric} = {value:.4f}): {params_label(drawn)}; "
                     f"{len(setting.selected)} runs at seeds {', '.join(map(str, setting.seeds))}")
    return lines


def waiting_settings(sweep) -> list:
    return [setting for setting in sweep.tuned if not setting.selected]
