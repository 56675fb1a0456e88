"""Per-example gradient norms of the cross-entropy over ALL trainable parameters, batched.

GraNd (Paul et al. 2021) needs || d CE(f(x_i), y_i) / d theta ||_2 for every training example.
Two batched ways to get it, never a Python loop over examples:

- "hooks" (the default where it applies): one forward pass and one backward pass of the summed
  loss over the batch, asking autograd only for the gradient at each parameterised layer's OUTPUT.
  A layer's per-example weight gradient is then a product of its saved input and that output
  gradient, and only its norm is needed, so each layer takes the cheaper of two exact forms:
    materialise: G_i A_i^T, a [p, d] matrix per example          cost T * d * p
    ghost norm:  sum((A_i^T A_i) * (G_i^T G_i)), two [T, T] Grams cost T^2 * (d + p)
  (A_i: the example's unfolded input, d x T; G_i: its output gradient, p x T; T positions.)
  The first conv of a 28x28 net has T = 784, d = 9: materialising is 100x cheaper; the last
  stage of a ResNet-18 has T = 16, d = 4608: the ghost norm is 30x cheaper. The rule also bounds
  memory (B*p*d or B*T^2 floats per layer, never the whole per-example gradient).
  Covered layer types: nn.Linear, nn.Conv2d (zero padding, groups = 1), nn.BatchNorm1d/2d in eval
  mode with running statistics; exact types only (a subclass may do more in forward, e.g. timm's
  BatchNormAct2d applies its activation).
- "vmap": torch.func vmap(grad(functional_call)), for any model; it materialises every
  per-example gradient, so it runs in chunks sized to bound memory.

"auto" uses the hooks where every trainable parameter sits in a covered layer called once per
forward pass, else vmap. Both need the model in eval mode (BatchNorm from running statistics), so
that examples are independent; the functions put the model in eval mode and restore its mode.
The loss is the plain cross-entropy (no label smoothing), as in the paper, unless the caller asks
for the training loss's smoothing.

The hooks' factors (each layer's input and output gradient, `capture_layer_factors`) and their split into
per-parameter pieces (`pieces`) are shared with benchmarks/kit/ghost.py, which builds Gram matrices and
subset gradients from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VMAP_CHUNK_FLOATS = 2**26  # per-example gradients held at once by the vmap path (256 MB in fp32)
_HOOKED_TYPES = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def trainable_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _covered(module: nn.Module) -> bool:
    if type(module) not in _HOOKED_TYPES or not set(trainable_parameters(module)) <= {"weight", "bias"}:
        return False
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return module.track_running_stats and module.running_mean is not None
    return True


def hooked_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers holding trainable parameters, or None if one of them is not covered by the hooks."""
    layers = []
    for module in model.modules():
        if trainable_parameters(module):
            if not _covered(module):
                return None
            layers.append(module)
    return layers


def _outer_sq_norms(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """|| g_i a_i^T ||_F^2 per example, g [B, p, T], a [B, d, T], by the cheaper exact form."""
    _, p, t = g.shape
    d = a.shape[1]
    if t == 1:
        return g.square().sum((1, 2)) * a.square().sum((1, 2))
    if t * d * p <= t * t * (d + p):
        return torch.bmm(g, a.transpose(1, 2)).square().sum((1, 2))
    gram_a = torch.bmm(a.transpose(1, 2), a)
    gram_g = torch.bmm(g.transpose(1, 2), g)
    return (gram_a * gram_g).sum((1, 2))


def _patches(a: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The conv's input patches [B, C*kh*kw, T], like F.unfold.

    Built from strided views and one copy: F.unfold (im2col) on the CPU was 10-60x slower here.
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    padded = F.pad(a, (pw, pw, ph, ph))
    view = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    b, c, ho, wo = view.shape[:4]
    return view.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, ho * wo)


@dataclass
class Outer:
    """A weight's per-example gradients as factors: grad_i = g[i] @ a[i]^T, reshaped to `shape`."""

    g: torch.Tensor  # [n, p, T]
    a: torch.Tensor  # [n, d, T]
    shape: torch.Size


@dataclass
class Vector:
    """A parameter's per-example gradients held directly: grad_i = v[i], reshaped to `shape`."""

    v: torch.Tensor  # [n, q]
    shape: torch.Size


def product_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # half precision factors are multiplied in fp32


def pieces(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, Outer | Vector]:
    """Each trainable parameter's per-example gradients of one layer, as factors or vectors."""
    trainable = trainable_parameters(module)
    dtype = product_dtype(g)
    a, g = a.to(dtype), g.to(dtype)
    n = a.shape[0]
    out: dict[str, Outer | Vector] = {}
    if type(module) is nn.Linear:
        g3 = g.reshape(n, -1, g.shape[-1]).transpose(1, 2)  # [n, p, T]
        if "weight" in trainable:
            out["weight"] = Outer(g3, a.reshape(n, -1, a.shape[-1]).transpose(1, 2), module.weight.shape)
        if "bias" in trainable:
            out["bias"] = Vector(g3.sum(2), module.bias.shape)
    elif type(module) is nn.Conv2d:
        g3 = g.flatten(2)  # [n, p, T]
        if "weight" in trainable:
            out["weight"] = Outer(g3, _patches(a, module), module.weight.shape)  # d ordered as weight.view(p, -1)
        if "bias" in trainable:
            out["bias"] = Vector(g3.sum(2), module.bias.shape)
    else:  # BatchNorm in eval mode: out = xhat * weight + bias, xhat from the running statistics
        shape = (1, -1) + (1,) * (a.dim() - 2)
        xhat = (a - module.running_mean.view(shape).to(dtype)) * torch.rsqrt(
            module.running_var.view(shape).to(dtype) + module.eps)
        if "weight" in trainable:
            out["weight"] = Vector((g * xhat).reshape(n, g.shape[1], -1).sum(2), module.weight.shape)
        if "bias" in trainable:
            out["bias"] = Vector(g.reshape(n, g.shape[1], -1).sum(2), module.bias.shape)
    return out


def _layer_sq_norms(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared norm of the gradient of this layer's trainable parameters."""
    sq = torch.zeros(a.shape[0], device=g.device, dtype=torch.float32)
    for piece in pieces(module, a, g).values():
        sq += _outer_sq_norms(piece.g, piece.a) if isinstance(piece, Outer) else piece.v.square().sum(1)
    return sq


class NotHookable(Exception):
    """The hooks cannot give exact per-example quantities for this model (a layer called twice, or its
    input modified in place after it ran)."""


def capture_layer_factors(model: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor,
                          label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """One forward and one backward of the summed per-example cross-entropy, keeping each layer's factors.

    Returns (per-example losses, logits, [(layer, input, output gradient)] for every layer of `layers`),
    all detached. The gradient at a layer's output of the SUM of the losses is, row by row, each example's
    own gradient, provided the examples do not interact (BatchNorm from running statistics).
    The factors are what every per-example quantity here is built from: squared norms (below), Gram
    matrices and subset gradients (benchmarks/kit/ghost.py).
    """
    seen: list[tuple[nn.Module, torch.Tensor, int, torch.Tensor]] = []

    def keep(module, inputs, output):
        a = inputs[0]
        seen.append((module, a.detach(), a._version, output))
        # The rest of the net continues on a copy: an in-place op after this layer (ReLU(inplace=True),
        # `out += shortcut`) then cannot change the tensor whose gradient we ask for.
        return output.clone()

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if len(seen) != len(layers) or len({id(m) for m, *_ in seen}) != len(layers):
        raise NotHookable("a layer ran more or less than once in the forward pass")
    # fp32 at least (a half-precision forward under autocast), fp64 kept (exact tests)
    losses = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="none",
                             label_smoothing=label_smoothing)
    # sum: each example's own gradient
    grads = torch.autograd.grad(losses.sum(), [out for *_, out in seen], allow_unused=True)
    factors = []
    for (module, a, version, out), g in zip(seen, grads):
        if a._version != version:
            raise NotHookable("a layer's input was modified in place after the layer ran")
        factors.append((module, a, g if g is not None else torch.zeros_like(out)))
    return losses.detach(), logits.detach(), factors


def _sq_norms_by_hooks(model: nn.Module, layers: list[nn.Module], x: torch.Tensor,
                       y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    _, _, factors = capture_layer_factors(model, layers, x, y, label_smoothing)
    sq = torch.zeros(len(y), device=x.device, dtype=torch.float32)
    for module, a, g in factors:
        sq += _layer_sq_norms(module, a.float(), g.float())
    return sq


def _sq_norms_by_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_of_one(params, xi, yi):
        logits = functional_call(model, (params, frozen, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits.float(), yi.unsqueeze(0), label_smoothing=label_smoothing)

    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, min(len(y), VMAP_CHUNK_FLOATS // max(1, n_params)))
    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0), chunk_size=chunk)(params, x, y)
    return sum(g.reshape(len(y), -1).float().square().sum(1) for g in grads.values())


def per_example_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           strategy: str = "auto", label_smoothing: float = 0.0) -> torch.Tensor:
    """|| grad_theta CE(f(x_i), y_i) ||_2 for each example of the batch, over all trainable parameters.

    strategy: "auto", "hooks" or "vmap" (see the module docstring). `label_smoothing`: that of the
    loss whose gradient is taken (GraNd: 0, the paper's plain cross-entropy; an online selector
    scoring the training loss passes the protocol's). Returns a float32 tensor [B].
    """
    if strategy not in ("auto", "hooks", "vmap"):
        raise ValueError(f"unknown strategy '{strategy}'")
    was_training = model.training
    model.eval()
    try:
        layers = hooked_layers(model) if strategy != "vmap" else None
        if strategy == "hooks" and layers is None:
            raise ValueError("the hooks do not cover every trainable layer of this model; use 'vmap'")
        with torch.enable_grad():
            if layers is not None:
                try:
                    return _sq_norms_by_hooks(model, layers, x, y, label_smoothing).sqrt()
                except NotHookable:
                    if strategy == "hooks":
                        raise
            return _sq_norms_by_vmap(model, x, y, label_smoothing).sqrt()
    finally:
        model.train(was_training)


def last_layer_grad_norms(logits: torch.Tensor, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient norm of CE over a final linear layer's weight and bias only (DeepCore's cheap GraNd).

    For logits = W h + b: dL/dW = (p - onehot(y)) h^T and dL/db = p - onehot(y), so the norm is
    ||p - onehot(y)|| * sqrt(1 + ||h||^2).
    """
    error = logits.float().softmax(1) - F.one_hot(y, logits.shape[1]).float()
    return error.norm(dim=1) * (1 + features.float().flatten(1).square().sum(1)).sqrt()
