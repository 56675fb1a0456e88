"""Final models kept next to their records, addressed by run id: priors and teachers for later runs.

`OUT/models/<run_id>.pt` holds the trained module's state dict (what the method built: heads and
target networks included), what defines the run (`info`: run id, resolved protocol, method,
params, seed, metrics) and what rebuilding the module needs beyond that (`build`: the data's input
shape, class count and training size, and where the backbone sits in the module). A run saves its
model when asked (`--save-model`, the protocol's `save_model`, or a method whose traits say
`save_model=True`).

No module is pickled: the file is read by the suite's one checkpoint mechanism
(benchmarks/core/checkpoint.py, torch.load with weights_only=True, owned by the run id), so a
planted or swapped file cannot run code. `load_saved_model(run_id)` rebuilds the module the way the
run built it (the method's `build_model`, or the protocol's model) from a context that knows the
data's shapes but holds no data, then loads the state dict into it strictly. Loading therefore
needs the code of this suite and the method's registration, not the data; a method whose
`build_model` loads a prior needs that prior again (RELA with a timm prior: the timm model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.core.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint
from benchmarks.core.compute import ComputeMeter
from benchmarks.core.context import RunContext
from benchmarks.core.layout import ResultsLayout
from benchmarks.core.protocol import protocol_from_dict
from benchmarks.errors import BenchError

MODEL_KEYS = ("info", "build", "state")


def save_model(path: Path, model: torch.nn.Module, backbone: torch.nn.Module, info: dict,
               ctx: RunContext) -> None:
    """Write atomically: the state dict of `model`, `info` (run_id, resolved_protocol, method, params, seed...)
    and the data's shapes from `ctx`. `backbone` is a submodule of `model` (or the model): its name is kept."""
    where = next((name for name, module in model.named_modules() if module is backbone), None)
    build = {"input_shape": list(ctx.data.input_shape), "num_classes": ctx.data.num_classes,
             "num_train": ctx.num_train, "backbone": where}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"info": info, "build": build, "state": state}, owner=info["run_id"])


@dataclass
class SavedModel:
    model: torch.nn.Module
    backbone: torch.nn.Module
    info: dict  # run_id, protocol (resolved), method, params, seed, metrics


def load_saved_model(rid: str, out: str | Path = "results", device: str | torch.device = "cpu") -> SavedModel:
    path = ResultsLayout(out).model(rid)
    if not path.exists():
        raise BenchError(f"no saved model for run '{rid}' (looked for {path}); run it with --save-model, "
                         "or give the results folder it was written to")
    advice = f"save it again: run '{rid}' once more with --save-model --force"
    payload = load_checkpoint(path, rid, MODEL_KEYS, map_location="cpu", advice=advice)
    try:
        model, backbone = _rebuild(payload["info"], payload["build"], out)
        model.load_state_dict(payload["state"])
    except BenchError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise CheckpointRefused(path, f"its model could not be rebuilt ({type(exc).__name__}: {message}); "
                                "saved by another version of the code?", advice) from None
    model.to(device)
    return SavedModel(model.eval(), backbone.eval(), payload["info"])


class _ShapeOnlySplit:
    """A training split that knows its size and image shape and holds no examples."""

    stats = None  # no streaming loader's normalisation (kit/priors.py reads it)

    def __init__(self, input_shape: tuple, size: int):
        self.input_shape, self.size = input_shape, size

    def __len__(self) -> int:
        return self.size


@dataclass
class _ShapeOnlyData:
    """What building a model reads of the data (DataBundle's shape fields), without the data."""

    train: _ShapeOnlySplit
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return self.train.input_shape


def _rebuild(info: dict, build: dict, out: str | Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The module the run trained, freshly built on the CPU, and its backbone."""
    from benchmarks.core.registry import create_method  # the registry loads methods, which import this module

    # The weights come from the state dict: no pretrained download on the way.
    protocol = protocol_from_dict(info["resolved_protocol"], f"saved model {info['run_id']}").replace(
        pretrained=False, pretrained_file="")
    data = _ShapeOnlyData(_ShapeOnlySplit(tuple(build["input_shape"]), build["num_train"]), build["num_classes"])
    ctx = RunContext(protocol, data, torch.device("cpu"), ComputeMeter(), info["seed"], log=_quiet,
                     results_dir=Path(out))
    method = create_method(info["method"], **info["params"])
    # Building draws from the global RNG (a head's nn.Linear): loading a prior must not move the run's draws.
    with torch.random.fork_rng(devices=[]):
        model = method.build_model(ctx) or ctx.new_model("main")
    backbone = model.get_submodule(build["backbone"]) if build["backbone"] is not None else method.backbone(model)
    return model, backbone


def _quiet(*_args, **_kwargs) -> None:
    pass
