"""Weights & Biases: one W&B run per run record, fed as the run happens; and the way back.

The local record stays the source of truth: a W&B failure is a warning and training goes on.
Without credentials W&B runs offline (files under OUT/wandb/, `wandb sync` uploads them later) and
says so once per process; an online start that fails (no network, bad key, server error, timeout)
warns once and logs offline for the rest of the process. wandb is imported only when a run starts.

What a W&B run holds:
- id = the run id (a resumed run continues the same W&B run), name = "method setting seed N",
  group = the sweep name, job_type = the method, tags = [protocol];
- config = {protocol: the resolved protocol, method, params, overrides, seed, run_id, budget, n_train,
  schema (the record schema, so runs rebuilt from W&B are never mixed across schemas)};
- history, one row per epoch, x-axis "epoch": the curve's numbers plus fraction = flops / full_flops;
- summary: status, final/<metric> (the reported metrics), compute/<key>, wall_clock_s, train_seconds,
  method_stats/<key>.
`records_from_wandb` turns such runs back into records that `report` can tabulate.
"""

from __future__ import annotations

import netrc
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from benchmarks.core.record import params_label
from benchmarks.core.run import RunLogger
from benchmarks.errors import BenchError

MODES = ("auto", "online", "offline", "off")
DEFAULT_PROJECT = "data-efficiency-bench"
_offline_notice_shown = False
_online_failed = False


def has_credentials() -> bool:
    """Whether wandb would find an API key (or identity token) without prompting.

    wandb looks at WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, then the .netrc entry for its host.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib import wbauth  # wandb's own reading of the netrc file, where available

        return bool(wbauth.read_netrc_auth(host=base_url))
    except Exception:  # noqa: BLE001 - an older or newer wandb: read .netrc ourselves
        pass
    try:
        host = urlparse(base_url).hostname or base_url
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(requested: str = "auto") -> tuple[str, str | None]:
    """(mode for wandb.init, why it was chosen if that needs saying). Mode: online, offline or disabled.

    auto follows WANDB_MODE (and WANDB_DISABLED); online without credentials becomes offline.
    """
    if requested not in MODES:
        raise BenchError(f"--wandb must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "off":
        return "disabled", None
    mode = requested
    if requested == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
            env = "disabled"
        mode = {"": "online", "run": "online", "dryrun": "offline", "shared": "online"}.get(env, env)
        if mode not in ("online", "offline", "disabled"):
            return "offline", f"WANDB_MODE={env!r} is not a known mode"
    if mode == "online" and not has_credentials():
        return "offline", "no W&B API key (WANDB_API_KEY or a .netrc entry; `wandb login` makes one)"
    return mode, None


def make_loggers(choice: str, out: str | Path, log=print) -> list[RunLogger]:
    """The loggers for a CLI `--wandb` choice; "off" gives none and never imports wandb."""
    if choice == "off":
        return []
    resolve_mode(choice)  # a bad choice fails now, not at the first run
    return [WandbLogger(out, mode=choice, log=log)]


def _scalars(values: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in values.items()
            if isinstance(v, (int, float, str, bool)) or v is None}


class WandbLogger(RunLogger):
    """Logs each run given to `execute(..., loggers=[WandbLogger(out)])` as one W&B run."""

    def __init__(self, out: str | Path = "results", mode: str = "auto", *, project: str | None = None,
                 entity: str | None = None, log=print, init_timeout: float = 30.0, finish_timeout: float = 120.0):
        # W&B's own variable wins: WANDB_DIR is where the user keeps W&B's files (often off a quota'd home).
        self.out = Path(os.environ["WANDB_DIR"]) if os.environ.get("WANDB_DIR") else Path(out)
        self.requested = mode
        self.project = project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        self.entity = entity or os.environ.get("WANDB_ENTITY") or None
        self.log = log
        try:  # wandb's own variable; explicit settings would otherwise override it
            self.init_timeout = float(os.environ.get("WANDB_INIT_TIMEOUT", init_timeout))
        except ValueError:
            self.init_timeout = init_timeout
        self.finish_timeout = finish_timeout
        self.run = None

    def _mode(self) -> str:
        global _offline_notice_shown
        mode, why = resolve_mode(self.requested)
        if mode == "online" and _online_failed:
            mode = "offline"  # this process could not reach W&B once: do not wait for it on every run
        if why and not _offline_notice_shown:
            _offline_notice_shown = True
            self.log(f"W&B: {why}; logging offline under {self.out / 'wandb'} "
                     f"(upload later with `wandb sync {self.out / 'wandb'}/offline-run-*`)")
        return mode

    def start(self, info: dict) -> None:
        global _online_failed
        self.run = None
        mode = self._mode()
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.run = self._init(wandb, info, mode)
        except Exception as exc:
            if mode != "online":
                raise
            _online_failed = True
            self.log(f"warning: W&B online start failed ({type(exc).__name__}: {exc}); logging offline under "
                     f"{self.out / 'wandb'} for the rest of this process (`wandb sync` uploads it later)")
            self.run = self._init(wandb, info, "offline")
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")

    def _init(self, wandb, info: dict, mode: str):
        config = {"protocol": info.get("resolved_protocol"), "method": info["method"], "params": info["params"],
                  "overrides": info.get("overrides") or {}, "seed": info["seed"], "run_id": info["run_id"],
                  "budget": info.get("budget"), "n_train": info.get("n_train"), "schema": info.get("schema"),
                  **({"tuning": info["tuning"]} if info.get("tuning") else {})}  # a tuned sweep's trial or selected run
        # A --force rerun is a new W&B run; a resumed one continues the run of the same id.
        wandb_id = f"{info['run_id']}-{int(time.time())}" if info.get("fresh") else info["run_id"]
        return wandb.init(
            project=self.project, entity=self.entity, dir=str(self.out), mode=mode,
            id=wandb_id, resume="allow", reinit="finish_previous",
            name=f"{info['method']} {params_label(info['params'])} seed {info['seed']}",
            group=info.get("group"), job_type=info["method"], tags=[info["protocol"]], config=config,
            settings=wandb.Settings(init_timeout=self.init_timeout, silent=True, console="off"))

    def log_epoch(self, entry: dict, full_flops: int) -> None:
        if self.run is None:
            return
        row = _scalars({k: v for k, v in entry.items() if not isinstance(v, (str, bool)) and v is not None})
        if full_flops:
            row["fraction"] = entry["flops"] / full_flops
        self._guarded(self.run.log, row)

    def finish(self, record: dict) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        summary = {"status": record["status"], "error": record.get("error"),
                   "wall_clock_s": record.get("wall_clock_s"), "train_seconds": record.get("train_seconds")}
        summary.update(_scalars(record.get("metrics") or {}, "final/"))
        summary.update(_scalars(record.get("compute") or {}, "compute/"))
        summary.update(_scalars(record.get("method_stats") or {}, "method_stats/"))
        exit_code = 0 if record["status"] == "complete" else 1
        try:
            run.summary.update({k: v for k, v in summary.items() if v is not None})
        finally:
            finished = _within(self.finish_timeout, run.finish, exit_code=exit_code)
        if not finished:  # online with the network gone: do not hold a sweep hostage
            self.log(f"warning: W&B did not finish run {record['run_id']} within {self.finish_timeout:.0f} s; "
                     "going on (the local record is written)")

    def _guarded(self, call, *args) -> None:
        """A failing W&B call warns once (through execute) and stops logging this run."""
        try:
            call(*args)
        except Exception:
            self.run = None
            raise


def _within(seconds: float, call, **kwargs) -> bool:
    """Run call(**kwargs) in a daemon thread; False if it has not returned in time. Its error is re-raised."""
    errors = []

    def target():
        try:
            call(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if errors:
        raise errors[0]
    return not worker.is_alive()


# ----- the way back: W&B runs -> records -----

def _summary_dict(run) -> dict:
    summary = getattr(run, "summary_metrics", None)
    if summary is None:
        summary = getattr(run, "summary", {}) or {}
    return dict(summary.items()) if hasattr(summary, "items") else {}


def _prefixed(summary: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)}


def _curve(run) -> list[dict]:
    scan = getattr(run, "scan_history", None)
    if scan is None:
        return []
    rows = [dict(row) for row in scan(keys=["epoch", "flops", "test_acc"])]
    return sorted(rows, key=lambda row: row["epoch"])


def record_from_wandb_run(run) -> dict:
    """The record fields the tables need, from one W&B run's config, summary and history."""
    config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    summary = _summary_dict(run)
    for key in ("method", "params", "seed", "protocol"):
        if key not in config:
            raise KeyError(f"config lacks '{key}' (not a benchmark run)")
    protocol = config["protocol"] if isinstance(config["protocol"], dict) else {"name": config["protocol"]}
    state = getattr(run, "state", None)
    status = summary.get("status") or ("complete" if state == "finished" else "failed")
    # Runs logged before the record schema went into the config are schema 1 (estimated compute).
    return {"schema": config.get("schema", 1), "run_id": config.get("run_id") or run.id, "status": status,
            "protocol": protocol["name"], "method": config["method"], "params": config["params"] or {},
            "seed": config["seed"], "overrides": config.get("overrides") or {},
            "budget": config.get("budget") or protocol.get("budget"), "group": getattr(run, "group", None),
            "resolved_protocol": protocol, "metrics": _prefixed(summary, "final/"),
            "compute": _prefixed(summary, "compute/"), "method_stats": _prefixed(summary, "method_stats/"),
            "wall_clock_s": summary.get("wall_clock_s"), "curve": _curve(run) if status == "complete" else [],
            **({"tuning": config["tuning"]} if config.get("tuning") else {})}  # trials stay out of compared rows


def records_from_wandb(path: str, api=None) -> tuple[list[dict], list[str]]:
    """Records rebuilt from the W&B runs of ENTITY/PROJECT, and one problem line per run that is not one.

    `api` is a wandb.Api (made here when not given; tests pass a fake).
    """
    if api is None:
        if not has_credentials():
            raise BenchError("--from-wandb needs W&B credentials: set WANDB_API_KEY or run `wandb login`")
        import wandb

        try:
            api = wandb.Api(timeout=30)
        except Exception as exc:  # noqa: BLE001 - any failure here is one readable line
            raise BenchError(f"cannot reach W&B ({type(exc).__name__}: {exc})") from None
    records, problems = [], []
    try:
        for run in api.runs(path):
            where = f"wandb:{path}/{getattr(run, 'id', '?')}"
            try:
                record = record_from_wandb_run(run)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                problems.append(f"{where}: {exc}")
                continue
            record["_path"] = where
            records.append(record)
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, permissions, a wrong path
        raise BenchError(f"cannot read the runs of {path} from W&B ({type(exc).__name__}: {exc})") from None
    return records, problems
