"""Model factory: small CPU-scale nets defined here, everything else from timm.

Every model exposes timm's split: `forward_features(x)` and `forward_head(f, pre_logits=False)`,
so methods can read penultimate embeddings the same way for all of them.

Pretrained weights (protocol keys `pretrained`, `pretrained_file`; Waterbirds' ImageNet ResNet-50):
- a timm model loads timm's weights (its cache, or the Hugging Face hub where reachable), or the
  local state dict `pretrained_file` through timm's pretrained_cfg overlay (`file`), which drops a
  classifier of another size and adapts the input channels as timm does;
- a local model loads `pretrained_file` (a classifier of another size is left freshly initialised);
- after a file load every tensor except the classifier's is checked against the file, so a file
  for another architecture fails instead of loading partly;
- weights that cannot be had end in one BenchError line saying how to supply them: never a silent
  random initialisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.errors import BenchError

_LOCAL: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _LOCAL[fn.__name__.replace("_", "-")] = fn
    return fn


NORMS = ("batch", "none")


def conv_bn(c_in: int, c_out: int, norm: str = "batch") -> nn.Sequential:
    """conv-BN-ReLU; norm="none" drops the BatchNorm (a conv with a bias), so that examples never
    interact within a batch (what makes data-parallel training equal one process exactly)."""
    if norm not in NORMS:
        raise BenchError(f"model_kwargs norm='{norm}' is not one of {NORMS}")
    if norm == "none":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """Stages of conv-BN-ReLU blocks, each stage but the last followed by 2x2 max-pooling; GAP; linear."""

    def __init__(self, in_chans: int, num_classes: int, widths: list[list[int]], pool_to: int = 1,
                 norm: str = "batch"):
        super().__init__()
        layers, c = [], in_chans
        for i, stage in enumerate(widths):
            for width in stage:
                layers.append(conv_bn(c, width, norm))
                c = width
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        # pool_to > 1 keeps a coarse spatial grid before the classifier: global average pooling
        # alone throws away where things are, which small nets on 28x28 inputs cannot afford.
        layers.append(nn.AdaptiveAvgPool2d(pool_to))
        self.features = nn.Sequential(*layers)
        self.num_features = c * pool_to * pool_to
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def tiny_cnn(in_chans: int, num_classes: int, norm: str = "batch") -> nn.Module:
    """A few thousand parameters: for the seconds-long smoke protocol."""
    return ConvNet(in_chans, num_classes, [[8], [16]], norm=norm)


@register_model
def small_cnn(in_chans: int, num_classes: int, width: int = 32, pool_to: int = 3, norm: str = "batch") -> nn.Module:
    """About 100k parameters: the Fashion-MNIST CPU-scale protocol."""
    return ConvNet(in_chans, num_classes, [[width], [2 * width], [4 * width]], pool_to=pool_to, norm=norm)


@register_model
def airbench_net(in_chans: int, num_classes: int, width: int = 64) -> nn.Module:
    """A fast CIFAR net in the spirit of airbench (Jordan 2024): three stages of two convs, pooled."""
    return ConvNet(in_chans, num_classes, [[width // 2], [width, width], [4 * width, 4 * width],
                                           [4 * width, 4 * width]])


@register_model
def resnet18_cifar(in_chans: int, num_classes: int) -> nn.Module:
    """timm's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model
def resnet50_cifar(in_chans: int, num_classes: int) -> nn.Module:
    import timm

    model = timm.create_model("resnet50", pretrained=False, num_classes=num_classes, in_chans=in_chans)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features [B, d] (timm's pre-logits) of any model of the suite."""
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


def list_models() -> list[str]:
    return sorted(_LOCAL)


def _how_to_supply(name: str) -> str:
    return (f"supply weights for '{name}': run once where huggingface.co is reachable so that timm caches them, "
            "or set pretrained_file = \"/path/to/weights.pth\" (a state dict) in the protocol or with "
            "--set pretrained_file=/path/to/weights.pth")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def read_state_dict(path: str) -> dict:
    """A state dict from a .pth/.pt/.bin/.safetensors file (timm's reader: unwraps 'state_dict'/'model')."""
    from timm.models import load_state_dict

    if not Path(path).is_file():
        raise BenchError(f"pretrained_file '{path}' does not exist; " + _how_to_supply("the model"))
    try:
        return load_state_dict(path, use_ema=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same advice
        raise BenchError(f"pretrained_file '{path}' is not a readable state dict ({_first_line(exc)})") from None


def check_loaded(model: nn.Module, state: dict, skip: tuple[str, ...], path: str) -> None:
    """Every tensor of the model outside the modules `skip` (the classifier; the first conv when
    timm adapted it to other input channels) equals the file's: no partial loads."""
    for key, value in model.state_dict().items():
        if any(key.startswith(prefix + ".") for prefix in skip):
            continue
        if key not in state:
            raise BenchError(f"pretrained_file '{path}' has no tensor '{key}': it is not a state dict of this model")
        if state[key].shape != value.shape or not torch.equal(state[key].to(value.dtype), value.cpu()):
            raise BenchError(f"pretrained_file '{path}': tensor '{key}' of shape {tuple(state[key].shape)} does not "
                             f"fit the model's {tuple(value.shape)}")


def _adapted_modules(model: nn.Module, in_chans: int) -> tuple[str, ...]:
    """Modules timm re-shapes when loading: the classifier, and the first conv for non-RGB input."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = [cfg.get("classifier") or "head"]
    first = cfg.get("first_conv")
    if in_chans != 3 and first:
        names += [first] if isinstance(first, str) else list(first)
    return tuple(names)


def _pretrained_local(model: nn.Module, path: str, name: str) -> nn.Module:
    if not path:
        raise BenchError(f"local model '{name}' has no published pretrained weights; " + _how_to_supply(name))
    state = read_state_dict(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items()
               if not (k.startswith("head.") and k in own and v.shape != own[k].shape)}  # another task's head
    missing = [k for k in own if k not in fitting and not k.startswith("head.")]
    if missing:
        raise BenchError(f"pretrained_file '{path}' has no tensor '{missing[0]}': it is not a state dict of '{name}'")
    try:
        model.load_state_dict(fitting, strict=False)
    except RuntimeError as exc:
        raise BenchError(f"pretrained_file '{path}' does not fit '{name}' ({_first_line(exc)})") from None
    return model


# Set from the data and the protocol's own keys, never through model_kwargs.
_SET_ELSEWHERE = ("in_chans", "num_classes", "pretrained", "pretrained_file")


def check_model_kwargs(name: str, kwargs: dict) -> None:
    """model_kwargs the model can take, checked when a protocol is loaded (not as a run's traceback).

    A local model's factory names what it takes; timm models are checked by timm when built.
    """
    taken = sorted(set(kwargs) & set(_SET_ELSEWHERE))
    if taken:
        raise BenchError(f"model_kwargs '{taken[0]}' is set by the data or the protocol's own keys, "
                         f"not model_kwargs")
    factory = _LOCAL.get(name)
    if factory is None:
        return
    accepted = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    own = [k for k in accepted if k not in _SET_ELSEWHERE]
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        raise BenchError(f"model '{name}' takes no model_kwargs '{unknown[0]}' (it takes: {', '.join(own) or 'none'})")


def create_model(name: str, in_chans: int, num_classes: int, pretrained: bool = False, pretrained_file: str = "",
                 **kwargs) -> nn.Module:
    """A local model by name, or any timm model as 'timm:<name>' (e.g. timm:resnet50), optionally
    with pretrained weights (module docstring)."""
    pretrained = pretrained or bool(pretrained_file)
    if name in _LOCAL:
        model = _LOCAL[name](in_chans=in_chans, num_classes=num_classes, **kwargs)
        return _pretrained_local(model, pretrained_file, name) if pretrained else model
    if name.startswith("timm:"):
        import timm

        if pretrained and pretrained_file:
            read_state_dict(pretrained_file)  # a missing or unreadable file is our one-line error, not timm's
            kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        try:
            model = timm.create_model(name[5:], pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
                                      **kwargs)
        except Exception as exc:  # noqa: BLE001 - timm, hub and download errors of every kind
            if not pretrained or isinstance(exc, BenchError):
                raise BenchError(f"timm cannot create '{name[5:]}': {_first_line(exc)}") from None
            raise BenchError(f"pretrained weights for '{name}' are not available here ({_first_line(exc)}); "
                             + _how_to_supply(name)) from None
        if pretrained and pretrained_file:
            check_loaded(model, read_state_dict(pretrained_file), _adapted_modules(model, in_chans), pretrained_file)
        return model
    raise BenchError(f"unknown model '{name}' (local: {', '.join(list_models())}; or timm:<name>)")
