"""Final models kept next to their records, addressed by run id: priors and teachers for later runs.

`OUT/models/<run_id>.pt` holds the whole trained module (what the method built: heads and target
networks included), the part the evaluation reads (`backbone`), and what defines the run. A run
saves its model when asked (`--save-model`, the protocol's `save_model`, or a method whose class
says `save_model = True`). Loading needs the code of this suite (the modules are pickled), not the
data: `load_saved_model(run_id)` returns the modules on the requested device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.core.record import atomic_write_bytes
from benchmarks.errors import BenchError


def model_path(out: str | Path, rid: str) -> Path:
    return Path(out) / "models" / f"{rid}.pt"


def save_model(path: Path, model: torch.nn.Module, backbone: torch.nn.Module, info: dict) -> None:
    """Write atomically; `backbone` is a submodule of `model` (or the model), so it is stored once."""
    buffer = io.BytesIO()
    torch.save({"info": info, "model": model, "backbone": backbone}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class SavedModel:
    model: torch.nn.Module
    backbone: torch.nn.Module
    info: dict  # run_id, protocol (resolved), method, params, seed, metrics


def load_saved_model(rid: str, out: str | Path = "results", device: str | torch.device = "cpu") -> SavedModel:
    path = model_path(out, rid)
    if not path.exists():
        raise BenchError(f"no saved model for run '{rid}' (looked for {path}); run it with --save-model, "
                         "or give the results folder it was written to")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is one readable line
        raise BenchError(f"saved model {path} unreadable ({type(exc).__name__}: {exc})") from None
    model, backbone = payload["model"].eval(), payload["backbone"].eval()
    return SavedModel(model, backbone, payload["info"])
