"""Where a results folder keeps everything: the one place its layout is spelt out.

    OUT/runs/<run_id>.json            run records (the source of truth for every table)
    OUT/checkpoints/<run_id>.pt       a run's checkpoint while it is unfinished
    OUT/models/<run_id>.pt            final models kept with --save-model (priors, teachers)
    OUT/cache/                        artefacts shared by runs (proxies, scores, targets)
    OUT/sweeps/<name>/                a sweep's or job's manifest, submissions, logs and tables
    OUT/running/<run_id>[...]         markers of live runs, and their requeue bookkeeping
    OUT/wandb/                        offline W&B files (unless $WANDB_DIR says otherwise)
    OUT/records/, OUT/tables/         published records and the tables built from them (results/ only)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ResultsLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def record(self, rid: str) -> Path:
        return self.runs / f"{rid}.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, rid: str) -> Path:
        return self.checkpoints / f"{rid}.pt"

    def model(self, rid: str) -> Path:
        return self.root / "models" / f"{rid}.pt"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def sweep(self, name: str) -> Path:
        return self.root / "sweeps" / name

    def manifest(self, name: str) -> Path:
        return self.sweep(name) / "manifest.jsonl"

    def sweep_tables(self, name: str) -> Path:
        """A job's own tables: never OUT/tables/, which holds the published ones."""
        return self.sweep(name) / "tables"

    def marker(self, rid: str) -> Path:
        return self.root / "running" / rid

    def requeue_state(self, rid: str) -> Path:
        return self.root / "running" / f"{rid}.requeues.json"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    @property
    def published_records(self) -> Path:
        return self.root / "records"

    @property
    def published_tables(self) -> Path:
        return self.root / "tables"
