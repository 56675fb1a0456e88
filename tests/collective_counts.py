"""The CLI of tests/distributed_support.py with torch.distributed's collectives counted per training step:
`python tests/collective_counts.py OUT_DIR run ...` under torchrun; each rank writes OUT_DIR/rank<r>.json
with, for every data-parallel training step that is not the last of its epoch, the collectives it made
(from the start of its `Trainer._step` to the start of the next step's) and its wall-clock seconds.

The Python-level collectives are wrapped (DDP's gradient all-reduce runs inside its C++ reducer and is
not counted). Proxy training (dist=None, on rank 0 in `prepare`) is not counted.
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import distributed_models  # noqa: E402, F401 - registers them
import torch.distributed as dist  # noqa: E402

from benchmarks.cli import run_and_exit  # noqa: E402
from benchmarks.core.train import Trainer  # noqa: E402

COUNTED = ("all_gather", "all_reduce", "broadcast", "all_gather_object", "broadcast_object_list",
           "all_gather_into_tensor", "reduce_scatter_tensor", "barrier")
calls: dict[str, int] = {}
windows: list[dict] = []  # one per step: name -> count, and seconds
current: dict | None = None


def counting(name, original):
    def wrapper(*args, **kwargs):
        if current is not None:
            current["calls"][name] = current["calls"].get(name, 0) + 1
        return original(*args, **kwargs)
    return wrapper


for _name in COUNTED:
    setattr(dist, _name, counting(_name, getattr(dist, _name)))


def close_window() -> None:
    global current
    if current is not None:
        current["seconds"] = time.perf_counter() - current.pop("started")
        windows.append(current)
    current = None


original_step, original_run_epoch, original_fit = Trainer._step, Trainer.run_epoch, Trainer.fit


def _step(self, *args, **kwargs):
    global current
    if self.dist is not None:
        close_window()
        current = {"calls": {}, "started": time.perf_counter()}
    return original_step(self, *args, **kwargs)


def run_epoch(self, *args, **kwargs):
    global current
    try:
        return original_run_epoch(self, *args, **kwargs)
    finally:
        if self.dist is not None:
            current = None  # the epoch's last step runs into the epoch's end (evaluation, meter sync): dropped


def fit(self, *args, **kwargs):
    try:
        return original_fit(self, *args, **kwargs)
    finally:
        if self.dist is not None:
            Path(OUT, f"rank{self.dist.rank}.json").write_text(json.dumps(windows))


Trainer._step, Trainer.run_epoch, Trainer.fit = _step, run_epoch, fit

if __name__ == "__main__":
    OUT = sys.argv[1]
    run_and_exit(sys.argv[2:])
