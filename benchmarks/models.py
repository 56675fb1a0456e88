"""Model factory: small CPU-scale nets defined here, everything else from timm.

Every model exposes timm's split: `forward_features(x)` and `forward_head(f, pre_logits=False)`,
so methods can read penultimate embeddings the same way for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import BenchError

_LOCAL: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _LOCAL[fn.__name__.replace("_", "-")] = fn
    return fn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """Stages of conv-BN-ReLU blocks, each stage but the last followed by 2x2 max-pooling; GAP; linear."""

    def __init__(self, in_chans: int, num_classes: int, widths: list[list[int]], pool_to: int = 1):
        super().__init__()
        layers, c = [], in_chans
        for i, stage in enumerate(widths):
            for width in stage:
                layers.append(conv_bn(c, width))
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
def tiny_cnn(in_chans: int, num_classes: int) -> nn.Module:
    """A few thousand parameters: for the seconds-long smoke protocol."""
    return ConvNet(in_chans, num_classes, [[8], [16]])


@register_model
def small_cnn(in_chans: int, num_classes: int, width: int = 32, pool_to: int = 3) -> nn.Module:
    """About 100k parameters: the Fashion-MNIST CPU-scale protocol."""
    return ConvNet(in_chans, num_classes, [[width], [2 * width], [4 * width]], pool_to=pool_to)


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


def list_models() -> list[str]:
    return sorted(_LOCAL)


def create_model(name: str, in_chans: int, num_classes: int, **kwargs) -> nn.Module:
    """A local model by name, or any timm model as 'timm:<name>' (e.g. timm:resnet50)."""
    if name in _LOCAL:
        return _LOCAL[name](in_chans=in_chans, num_classes=num_classes, **kwargs)
    if name.startswith("timm:"):
        import timm

        try:
            return timm.create_model(name[5:], num_classes=num_classes, in_chans=in_chans, **kwargs)
        except RuntimeError as exc:
            raise BenchError(f"timm cannot create '{name[5:]}': {exc}") from None
    raise BenchError(f"unknown model '{name}' (local: {', '.join(list_models())}; or timm:<name>)")
