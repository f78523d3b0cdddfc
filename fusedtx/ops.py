"""The public functional API: validation, torch.library custom ops (fake impls, autograd) and dispatch.

Every op is a ``torch.library.custom_op`` in the ``fusedtx`` namespace, so ``torch.compile`` traces
it as one opaque node (``fullgraph=True``, no graph break) and autograd runs its own backward op.
Inside each custom op, :func:`fusedtx._backend.select` picks the Triton kernel or the reference for
that call; forward and backward choose independently and either choice is correct for either.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fusedtx import _backend, reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _kernels(family: str):
    """The Triton module of a family, imported on first use (importing it imports Triton)."""
    return importlib.import_module(f"fusedtx.kernels.{family}")


def _unsupported_dtype(dtype: torch.dtype) -> str | None:
    if dtype in _KERNEL_FLOATS:
        return None
    return f"has no {dtype} variant (it computes in float32)"


def _check_tensor(name: str, t: Tensor, like: Tensor | None = None, shape: tuple[int, ...] | None = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a float tensor (of ``like``'s device,
    and of ``shape`` when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------------------
# layer_norm_gelu
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedtx::layer_norm_gelu_fwd", mutates_args=())
def _layer_norm_gelu_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, residual sum or an empty tensor, fp32 mean, fp32 rstd); mean and rstd have shape x.shape[:-1]."""
    n = x.shape[-1]
    stats_shape = x.shape[:-1]
    backend = _backend.select("layer_norm_gelu", x.device, _unsupported_dtype(x.dtype))
    if backend == "triton" and x.numel() > 0:
        r2 = residual.reshape(-1, n) if residual is not None else None
        y, s, mean, rstd = _kernels("layer_norm_gelu").layer_norm_gelu_fwd(
            x.reshape(-1, n), weight, bias, r2, eps, activation
        )
        s = s.view(x.shape) if s is not None else x.new_empty(0)
        return y.view(x.shape), s, mean.view(stats_shape), rstd.view(stats_shape)
    out = reference.layer_norm_gelu(x, weight, bias, eps, activation, residual)
    y, s = (out, x.new_empty(0)) if residual is None else out
    normed = x if residual is None else s
    mean, rstd = reference.layer_norm_stats(normed.to(reference.compute_dtype(x.dtype)), eps)
    return y, s, mean.float(), rstd.float()


@_layer_norm_gelu_fwd.register_fake
def _(x, weight, bias, residual, eps, activation):
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x), s, stats, stats.clone()


@torch.library.custom_op("fusedtx::layer_norm_gelu_bwd", mutates_args=())
def _layer_norm_gelu_bwd(
    dy: Tensor, ds: Tensor | None, normed: Tensor, weight: Tensor | None, bias: Tensor | None,
    mean: Tensor, rstd: Tensor, eps: float, activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty tensors where there is no parameter.

    ``normed`` is what the forward normalized: x, or the residual sum (whose gradient, ``ds``, is added
    to dx)."""
    n = normed.shape[-1]
    backend = _backend.select("layer_norm_gelu", normed.device, _unsupported_dtype(normed.dtype))
    if backend == "triton" and normed.numel() > 0:
        dx, dw, db = _kernels("layer_norm_gelu").layer_norm_gelu_bwd(
            dy.reshape(-1, n), ds.reshape(-1, n) if ds is not None else None, normed.reshape(-1, n),
            weight, bias, mean.reshape(-1), rstd.reshape(-1), activation,
        )
        dx = dx.view(normed.shape)
    else:
        # The reference backward is the vector-Jacobian product of the reference forward,
        # taken with respect to the tensors that are present.
        present = [t for t in (normed, weight, bias) if t is not None]

        def forward(*args):
            it = iter(args[1:])
            w, b = (next(it) if t is not None else None for t in (weight, bias))
            return reference.layer_norm_gelu(args[0], w, b, eps, activation)

        grads = iter(torch.func.vjp(forward, *present)[1](dy))
        dx, dw, db = (next(grads) if t is not None else None for t in (normed, weight, bias))
        if ds is not None:
            dx = dx + ds
    return dx, _or_empty(dw, normed), _or_empty(db, normed)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@_layer_norm_gelu_bwd.register_fake
def _(dy, ds, normed, weight, bias, mean, rstd, eps, activation):
    dw = torch.empty_like(weight) if weight is not None else normed.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else normed.new_empty(0)
    return torch.empty_like(normed), dw, db


def _layer_norm_gelu_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, activation = inputs
    y, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.eps, ctx.activation = eps, activation
    ctx.save_for_backward(s if ctx.has_residual else x, weight, bias, mean, rstd)


def _layer_norm_gelu_backward(ctx, dy, ds, _dmean, _drstd):
    normed, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_gelu_bwd(
        dy, ds if ctx.has_residual else None, normed, weight, bias, mean, rstd, ctx.eps, ctx.activation
    )
    return (
        dx,
        dw if ctx.has_weight else None,
        db if ctx.has_bias else None,
        dx if ctx.has_residual else None,
        None,
        None,
    )


_layer_norm_gelu_fwd.register_autograd(_layer_norm_gelu_backward, setup_context=_layer_norm_gelu_setup)


def layer_norm_gelu(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "gelu",
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``act(LayerNorm(x [+ residual]))`` over the last dimension, in one pass.

    Args:
        x: (..., N), float16 / bfloat16 / float32 (float64 runs the reference), any strides.
        weight, bias: (N,) or None (no affine), any float dtype; on x's device.
        eps: added to the biased variance.
        activation: ``"gelu"`` (exact, x·Φ(x)), ``"gelu_tanh"``, ``"relu"`` or ``"none"``.
        residual: optional (..., N) tensor of x's dtype. The sum ``s = x + residual`` (rounded to x's
            dtype, as PyTorch's ``x + residual`` is) is normalized, and returned too: the pre-norm
            block pattern.

    Returns:
        ``y`` of x's shape and dtype, or ``(y, s)`` with a residual. Statistics are float32.
        Under CUDA autocast the inputs run in float32, as ``torch.nn.LayerNorm``'s do.
    """
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalized one)")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_tensor(name, p, like=x, shape=(n,))
    if residual is not None:
        _check_tensor("residual", residual, like=x, shape=tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs layer_norm in float32 (its fp32 list); CPU autocast leaves it alone.
        x, weight, bias, residual = (t.float() if t is not None else None for t in (x, weight, bias, residual))
    y, s, _, _ = _layer_norm_gelu_fwd(x, weight, bias, residual, float(eps), activation)
    return y if residual is None else (y, s)


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``LayerNorm(x [+ residual])`` over the last dimension: :func:`layer_norm_gelu` with no activation."""
    return layer_norm_gelu(x, weight, bias, eps, "none", residual)
