"""Ghost inner products: Gram matrices of per-example gradients, and subset gradients, from one pass.

GREATS (Wang et al., NeurIPS 2024) needs, for a candidate batch, every g_i . g_j and every
g_i . g_val (g_i: the gradient of example i's loss over ALL trainable parameters). Built on the
per-layer machinery of benchmarks/kit/pergrad.py: one forward and one backward of the summed loss,
keeping each parameterised layer's input A_i (d x T after unfolding) and output gradient B_i (p x T),
T being the sequence axis (spatial positions for nn.Conv2d, 1 for a Linear on flat features). A
layer's per-example weight gradient is B_i A_i^T, so

    <grad_i, grad_j> = sum over layers of  sum((A_i^T A_j) * (B_i^T B_j))     (the ghost form)
                                        or  <B_i A_i^T, B_j A_j^T>             (materialised)

Biases and BatchNorm's affine parameters have small per-example gradient vectors and are always
multiplied directly. The products with the validation gradient use the same machinery: the
validation examples ride along in the same pass, and g_i . g_val = mean over validation examples v
of <g_i, g_v> (g_val is the gradient of the validation batch's MEAN loss).

The per-layer choice. For an n x n Gram the ghost form costs n^2 T^2 (d + p) multiply-adds, the
materialised one n T d p (forming the gradients) + n^2 d p (their products); `auto` takes the
cheaper, per layer (for an n x c block, n c replaces n^2). The often quoted rule "ghost iff
2 T^2 <= d p" (ghost clipping, Li et al. 2022, and the GREATS code) compares MEMORY for per-example
NORMS (T^2 numbers per example against d p); for a Gram the pairs dominate and each pair costs
T^2 (d + p) against d p. On the Fashion-MNIST model's last conv (T = 49, d = 576, p = 128, n = 514)
that rule says ghost, which costs about 21x the materialised form; the FLOP rule says materialise.
Memory stays bounded either way (both forms work in chunks of GRAM_CHUNK_FLOATS numbers). `ghost`
and `materialise` force one form for every layer (the perf comparison, tests).
What it costs: a whole-model Gram needs about n^2 x (number of parameters) multiply-adds at best,
which on the suite's CNNs is more than a training step over the n examples (measured FLOPs: 2.5x on
the Fashion-MNIST model with n = 514, 1.4x on ResNet-18 at 32x32 with n = 258). Only the products
with the validation examples (n x 2) are cheap.

What the hooks cannot handle: a layer whose examples interact. BatchNorm in train mode normalises
with the batch's statistics, so one example's loss depends on every other example and per-example
gradients are not defined by one batched pass. The rule (as GraNd's, benchmarks/kit/pergrad.py):
per-example quantities are computed with BatchNorm in eval mode, from its running statistics; the
caller switches the model to eval mode, and `capture` refuses a BatchNorm layer in train mode.
Covered layer types are pergrad's (exact nn.Linear, nn.Conv2d with zero padding and groups = 1,
nn.BatchNorm1d/2d); a model with any other trainable layer is refused (GREATS has no vmap fallback:
a Gram needs every pair of per-example gradients, too many to materialise for a whole model).

Subset gradients (`subset_gradient`): the gradient of the (weighted) mean loss of a kept subset is
sum over kept i of w_i B_i A_i^T / k per layer, formed from the same captured factors, so a
selection step that trains on the subset needs no second forward/backward pass when the model's
training forward has no coupled layers (no BatchNorm in train mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.kit.pergrad import (
    NotHookable,
    Outer,
    Vector,
    capture_layer_factors,
    hooked_layers,
    pieces,
    product_dtype,
    trainable_parameters,
)

GRAM_CHUNK_FLOATS = 2**25  # numbers held at once by one layer's product (128 MB in fp32)
FORMS = ("auto", "ghost", "materialise")


@dataclass
class Captured:
    """One pass over a batch: per-example losses and logits, and each layer's (input, output gradient)."""

    losses: torch.Tensor  # [n], detached
    logits: torch.Tensor  # [n, C], detached
    factors: list  # [(layer, input, output gradient)]


def coupled_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose training forward makes examples interact (BatchNorm with batch statistics)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or not m.track_running_stats or m.running_mean is None)]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def capture(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
            layers: list[nn.Module] | None = None) -> Captured:
    """Losses, logits and every trainable layer's factors from one forward/backward over (x, y).

    The model must be in the mode the products are meant for; a BatchNorm layer in train mode is
    refused (see the module docstring). Raises ValueError for a model the hooks do not cover.
    `layers`: capture only these (a subset of the trainable layers, e.g. `last_block`); the backward
    then stops at the earliest of them (autograd computes only what the asked outputs need).
    """
    coupled = coupled_layers(model)
    if coupled:
        raise ValueError(f"{type(coupled[0]).__name__} in train mode couples the examples of a batch: per-example "
                         "gradients need it in eval mode (running statistics); call model.eval() first")
    covered = hooked_layers(model)
    if covered is None:
        kinds = sorted({type(m).__name__ for m in model.modules() if trainable_parameters(m)})
        raise ValueError(f"ghost products cover trainable nn.Linear, nn.Conv2d (zero padding, groups 1) and "
                         f"BatchNorm layers only; this model has {', '.join(kinds)}")
    if layers is None:
        layers = covered
    elif not {id(m) for m in layers} <= {id(m) for m in covered}:
        raise ValueError("capture: `layers` must be trainable layers of the model")
    with torch.enable_grad():
        try:
            losses, logits, factors = capture_layer_factors(model, layers, x, y, label_smoothing)
        except NotHookable as exc:
            raise ValueError(f"ghost products cannot be exact for this model: {exc}") from None
    return Captured(losses, logits, factors)


def ghost_flops(n: int, t: int, d: int, p: int, columns: int | None = None) -> int:
    """Multiply-adds of an n x columns block (default n x n) of one weight's Gram by the ghost form."""
    return n * (n if columns is None else columns) * t * t * (d + p)


def materialised_flops(n: int, t: int, d: int, p: int, columns: int | None = None) -> int:
    """Multiply-adds of the same block by forming each example's p x d gradient first (the columns'
    examples are among the n rows, so they are formed once)."""
    return n * t * d * p + n * (n if columns is None else columns) * d * p


def weight_form(n: int, t: int, d: int, p: int, form: str = "auto", columns: int | None = None) -> str:
    """"ghost" or "materialise" for one weight (see the module docstring for why FLOPs, not 2T^2 <= dp)."""
    if form not in FORMS:
        raise ValueError(f"unknown form '{form}' (one of {FORMS})")
    if form != "auto":
        return form
    cheaper = ghost_flops(n, t, d, p, columns) <= materialised_flops(n, t, d, p, columns)
    return "ghost" if cheaper else "materialise"


def _ghost_gram(piece: Outer, columns: torch.Tensor | None) -> torch.Tensor:
    n, p, t = piece.g.shape
    d = piece.a.shape[1]
    a = piece.a.transpose(1, 2).reshape(n * t, d)
    g = piece.g.transpose(1, 2).reshape(n * t, p)
    a_cols = a if columns is None else piece.a[columns].transpose(1, 2).reshape(-1, d)
    g_cols = g if columns is None else piece.g[columns].transpose(1, 2).reshape(-1, p)
    c = len(a_cols) // t
    out = torch.empty(n, c, dtype=a.dtype, device=a.device)
    rows = max(1, GRAM_CHUNK_FLOATS // (2 * c * t * t))
    for i in range(0, n, rows):
        j = min(n, i + rows)
        gram_a = (a[i * t:j * t] @ a_cols.T).view(j - i, t, c, t)  # a_i^t . a_j^s for every pair and positions
        gram_g = (g[i * t:j * t] @ g_cols.T).view(j - i, t, c, t)
        out[i:j] = (gram_a * gram_g).sum((1, 3))
    return out


def _materialised_gram(piece: Outer, columns: torch.Tensor | None) -> torch.Tensor:
    n, p, _ = piece.g.shape
    d = piece.a.shape[1]
    a_t = piece.a.transpose(1, 2)  # [n, T, d]
    out = torch.zeros(n, n if columns is None else len(columns), dtype=piece.a.dtype, device=piece.a.device)
    # In slices of output channels: memory bounded, and nothing is formed twice (the Gram is a sum over them).
    channels = max(1, GRAM_CHUNK_FLOATS // (n * d))
    for c in range(0, p, channels):
        flat = torch.bmm(piece.g[:, c:c + channels], a_t).reshape(n, -1)  # per-example gradient rows
        out += flat @ (flat if columns is None else flat[columns]).T
    return out


def gram(captured: Captured, form: str = "auto",
         columns: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """(products of per-example gradients over all trainable parameters, the count of weights computed by
    each form): the n x n Gram matrix, or its n x c block of the examples at positions `columns`."""
    n = captured.losses.shape[0]
    cols = None if columns is None else len(columns)
    total = None
    used = {"ghost": 0, "materialise": 0}
    for module, a, g in captured.factors:
        for piece in pieces(module, a, g).values():
            if isinstance(piece, Vector):
                part = piece.v @ (piece.v if columns is None else piece.v[columns]).T
            else:
                chosen = weight_form(n, piece.g.shape[2], piece.a.shape[1], piece.g.shape[1], form, cols)
                used[chosen] += 1
                part = (_ghost_gram if chosen == "ghost" else _materialised_gram)(piece, columns)
            total = part if total is None else total + part
    return total, used


def gram_with_validation(captured: Captured, n_candidates: int, form: str = "auto",
                         interactions: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, int]]:
    """For a pass over B candidates followed by validation examples: (g_i . g_val [B], g_i . g_j [B, B] or
    None without `interactions`, forms used). g_val is the gradient of the validation examples' mean loss.

    Without interactions only the B x (validation examples) block is computed: a few products per
    candidate instead of B.
    """
    b, n = n_candidates, captured.losses.shape[0]
    if n <= b:
        raise ValueError("the pass holds no validation examples after the candidates")
    if not interactions:
        block, used = gram(captured, form, torch.arange(b, n, device=captured.losses.device))
        return block[:b].mean(1), None, used
    full, used = gram(captured, form)
    return full[:b, b:].mean(1), full[:b, :b], used


# -- fast forms: products over a subset of layers, or over sketched per-example gradients ------------


def last_block(model: nn.Module) -> list[nn.Module]:
    """The classifier and the last block: the last trainable layer, and every trainable layer of the module
    that holds the one before it (small-cnn: features.4's conv and BatchNorm, and head; ResNet-18:
    layer4.1's two convs and BatchNorms, and fc). Layers are taken in registration order, which is
    the forward order of the suite's models. Raises ValueError for a model the hooks do not cover."""
    layers = hooked_layers(model)
    if layers is None:
        raise ValueError("ghost products do not cover every trainable layer of this model")
    if len(layers) < 2:
        return layers
    names = {module: name for name, module in model.named_modules()}
    parent = names[layers[-2]].rpartition(".")[0]
    inside = [m for m in layers[:-1] if parent == "" or names[m].startswith(parent + ".")]
    return inside + [layers[-1]]


def restrict(captured: Captured, layers: list[nn.Module]) -> Captured:
    """The same pass with only the factors of `layers` (products over that subset of parameters)."""
    wanted = {id(m) for m in layers}
    return Captured(captured.losses, captured.logits, [f for f in captured.factors if id(f[0]) in wanted])


def sketch_flops(n: int, t: int, d: int, p: int, dim: int) -> int:
    """Multiply-adds of sketching one weight's n per-example gradients (see `sketch_gradients`)."""
    d1, d2 = min(p, dim), min(d, dim)
    return n * t * ((p * d1 if p > dim else 0) + (d * d2 if d > dim else 0) + d1 * d2)


def sketch_gradients(captured: Captured, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """([n, D], the number of weights sketched): each example's gradient, every weight's part projected to at most dim x dim numbers.

    A Kronecker (two-sided) Johnson-Lindenstrauss sketch, as LoGra (Choe et al. 2024) does for
    gradient features: a weight's per-example gradient G_i = g_i a_i^T (p x d, a sum over T
    positions) becomes P^T G_i Q = (P^T g_i)(Q^T a_i)^T, with P (p x dim) and Q (d x dim) of
    independent N(0, 1/dim) entries, so E[<P^T G_i Q, P^T G_j Q>] = <G_i, G_j> (unbiased products).
    Computed from the factors, never forming G_i: n T (p dim + d dim + dim^2) multiply-adds instead of
    the materialised n T d p. A side no longer than `dim` is kept as it is (exact on that side), so
    dim >= max(p, d) for every weight gives the exact products. Biases and BatchNorm parameters
    (Vector pieces) are kept exactly. The projections are drawn from `generator` (CPU), in the
    order of the pieces, so a (seed, step) generator makes the same sketch on every rank and resume.
    The products are then one matmul of this matrix with itself.
    """
    if dim < 1:
        raise ValueError(f"sketch dimension must be >= 1, got {dim}")
    columns, weights = [], 0
    for module, a, g in captured.factors:
        for piece in pieces(module, a, g).values():
            if isinstance(piece, Vector):
                columns.append(piece.v)
                continue
            weights += 1
            n, p, t = piece.g.shape
            d = piece.a.shape[1]
            g_t, a_t = piece.g.transpose(1, 2), piece.a.transpose(1, 2)  # [n, T, p], [n, T, d]
            if p > dim:
                proj = torch.randn(p, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
                g_t = g_t @ proj.to(g_t)
            if d > dim:
                proj = torch.randn(d, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
                a_t = a_t @ proj.to(a_t)
            columns.append(torch.bmm(g_t.transpose(1, 2), a_t).reshape(n, -1))  # sum over positions
    return torch.cat(columns, 1), weights


def sketched_with_validation(captured: Captured, n_candidates: int, dim: int, generator: torch.Generator,
                             interactions: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, int]]:
    """`gram_with_validation`'s (g_i . g_val, g_i . g_j or None, {"sketched": weights}) from sketched gradients."""
    b, n = n_candidates, captured.losses.shape[0]
    if n <= b:
        raise ValueError("the pass holds no validation examples after the candidates")
    sketched, weights = sketch_gradients(captured, dim, generator)
    values = sketched[:b] @ sketched[b:].mean(0)
    return values, (sketched[:b] @ sketched[:b].T if interactions else None), {"sketched": weights}


def subset_gradient(model: nn.Module, captured: Captured, keep: torch.Tensor,
                    weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The gradient of mean(w_i * loss_i) over the kept examples, per parameter name, from the factors.

    Equals autograd's gradient of that loss when the captured pass is the training forward (no
    BatchNorm in train mode), with no second pass.
    """
    prefixes = {module: prefix for prefix, module in model.named_modules()}
    keep = keep.to(captured.losses.device)
    k = len(keep)
    out = {}
    for module, a, g in captured.factors:
        for name, piece in pieces(module, a[keep], g[keep]).items():
            scale = torch.full((k,), 1.0 / k, dtype=product_dtype(g), device=g.device)
            if weights is not None:
                scale = scale * weights.to(scale)
            if isinstance(piece, Vector):
                grad = scale @ piece.v
            else:
                p, d = piece.g.shape[1], piece.a.shape[1]
                # sum_i w_i g_i a_i^T as one matmul over (example, position) pairs
                grad = (piece.g * scale.view(-1, 1, 1)).transpose(0, 1).reshape(p, -1) \
                    @ piece.a.transpose(1, 2).reshape(-1, d)
            param = getattr(module, name)
            prefix = prefixes[module]
            out[f"{prefix}.{name}" if prefix else name] = grad.reshape(piece.shape).to(param.dtype)
    return out
