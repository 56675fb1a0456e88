"""Frozen "prior" models, named by a string: feature extractors whose outputs other runs learn from.

RELA (methods/rela.py) turns a prior's features into per-example targets; a teacher for
distillation would use the same registry. A spec is one of:
  random              a frozen copy of the student's own initial network (the official RELA code's
                      "rand" prior is the student's backbone at initialisation)
  run:<run_id>        the backbone a run of this suite saved (`--save-model`, or a sweep's
                      save_model = true), looked up in the run's results folder (OUT/models/)
  timm:<name>         a timm model with its pretrained weights (downloaded by timm on first use)
  timm:<name>@<path>  a timm model with weights from a local file (a state dict, or {"state_dict": ...})

Inputs: the suite's batches are normalised with the dataset's statistics. A timm prior sees what it
was trained on: the pixels are recovered, converted to its number of channels (a gray image is
repeated to RGB, RGB is turned to luma for a 1-channel model), resized (bilinear) to its
pretrained_cfg input size, and normalised with its pretrained_cfg mean and std. A suite-trained
prior gets the batch as it is (the same dataset's normalisation), with only the channel conversion
when its first convolution expects another number of channels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.core.compute import unmetered
from benchmarks.core.models import embed
from benchmarks.errors import BenchError

if TYPE_CHECKING:
    from benchmarks.core.context import RunContext

PRIOR_KINDS = "random, run:<run_id>, timm:<name> or timm:<name>@<weights file>"


def check_prior_spec(spec: str) -> None:
    """A BenchError naming the spec unless it has one of the forms of the module docstring."""
    if spec == "random":
        return
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("run", "timm") and rest.strip() and (kind != "timm" or rest.split("@", 1)[0].strip()):
        if kind == "timm" and "@" in rest and not rest.split("@", 1)[1].strip():
            raise BenchError(f"prior '{spec}': no weights file after '@' (expected {PRIOR_KINDS})")
        return
    raise BenchError(f"unknown prior '{spec}' (expected {PRIOR_KINDS})")


def prior_identity(spec: str, ctx: RunContext) -> dict:
    """What determines a prior's outputs on the run's data (for cache keys): a random prior depends on the
    run's model and seed, a weights file on its contents (size and modification time stand in)."""
    if spec == "random":
        return {"prior": spec, "model": ctx.protocol.model, "model_kwargs": ctx.protocol.model_kwargs,
                "seed": ctx.seed, "pretrained": ctx.protocol.pretrained,  # a protocol's weights start it
                "pretrained_file": ctx.protocol.pretrained_file}
    if spec.startswith("timm:") and "@" in spec:
        path = Path(spec.split("@", 1)[1]).expanduser()
        stat = path.stat() if path.exists() else None
        return {"prior": spec, "size": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}
    return {"prior": spec}


class PriorEncoder(nn.Module):
    """A frozen prior behind the suite's embedding interface: embed(encoder, batch.x) = the prior's features."""

    def __init__(self, prior: nn.Module, data_stats: tuple | None, pixel_stats: tuple | None = None,
                 input_size: tuple | None = None, in_chans: int | None = None):
        super().__init__()
        self.prior = prior.eval().requires_grad_(False)
        mean, std = data_stats or ((0.0,), (1 / 255,))  # the dataset's normalisation, per channel, in [0, 1] units
        self.register_buffer("data_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("data_std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
        self.pixel_stats = pixel_stats  # the prior's own (mean, std) in [0, 1] units; None keeps the batch as is
        self.input_size = tuple(input_size) if input_size else None  # (H, W) the prior expects, or None
        self.in_chans = in_chans
        self.eval()

    def train(self, mode: bool = True) -> PriorEncoder:  # a prior stays in eval mode (frozen BatchNorm)
        return super().train(False)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixel_stats is not None:
            x = (x * self.data_std + self.data_mean) / 255  # back to pixels in [0, 1]
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x.mean(1, True)
            else:
                raise BenchError(f"the prior expects {self.in_chans} input channels and the data have {x.shape[1]}")
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.pixel_stats is not None:
            mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in self.pixel_stats)
            x = (x - mean) / std
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return embed(self.prior, self.adapt(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def feature_dim(self, input_shape: tuple) -> int:
        """The size of the prior's features: its num_features, or one probe forward (no one's work: unmetered)."""
        dim = getattr(self.prior, "num_features", None)
        if isinstance(dim, int) and dim > 0:
            return dim
        device = next(self.prior.parameters()).device
        with unmetered(), torch.no_grad():
            return int(self.forward_features(torch.zeros(1, *input_shape, device=device)).shape[1])


def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _timm_prior(name: str, weights: str | None) -> tuple[nn.Module, dict]:
    import timm

    try:
        model = timm.create_model(name, pretrained=weights is None, num_classes=0)
    except RuntimeError as exc:
        raise BenchError(f"prior 'timm:{name}': timm cannot create it ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - no network, no weights on the hub: one readable line
        raise BenchError(f"prior 'timm:{name}': its pretrained weights could not be loaded "
                         f"({type(exc).__name__}: {exc}); give a local file as timm:{name}@<path>") from None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise BenchError(f"prior 'timm:{name}@{weights}': no such weights file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise BenchError(f"prior weights {path} unreadable ({type(exc).__name__}: {exc})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = model.state_dict()
        matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matching:
            raise BenchError(f"prior weights {path} match none of timm:{name}'s parameters")
        model.load_state_dict(matching, strict=False)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    return model, cfg


def load_prior(spec: str, ctx: RunContext, random_init: Callable[[], nn.Module] | None = None) -> PriorEncoder:
    """The frozen prior named by `spec`, on the run's device, behind the suite's embedding interface."""
    check_prior_spec(spec)
    # A streaming split's loader has normalised its images already (with ImageNet's statistics): no
    # pixels to recover there, so a timm prior gets them as they are.
    data_stats = getattr(ctx.data.train, "stats", None)
    if spec == "random":
        if random_init is None:
            raise BenchError("prior 'random' needs the student's initial network")
        prior, pixel_stats, size = random_init(), None, None
    elif spec.startswith("run:"):
        from benchmarks.core.saved_models import load_saved_model

        rid = spec[4:].strip()
        if ctx.results_dir is None:
            raise BenchError(f"prior '{spec}': this run has no results folder to look for saved models in")
        prior, pixel_stats, size = load_saved_model(rid, ctx.results_dir, ctx.device).backbone, None, None
    else:
        name, _, weights = spec[5:].partition("@")
        prior, cfg = _timm_prior(name.strip(), weights.strip() or None)
        pixel_stats = (tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))) \
            if data_stats is not None else None
        size = tuple(cfg["input_size"][-2:]) if cfg.get("input_size") else None
    encoder = PriorEncoder(prior, data_stats, pixel_stats, size, _first_conv_channels(prior))
    return encoder.to(ctx.device)
