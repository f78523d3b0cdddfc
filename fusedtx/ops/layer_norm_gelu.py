"""LayerNorm (+ residual) (+ activation) in one pass: ``layer_norm_gelu`` and ``layer_norm``."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fusedtx import reference
from fusedtx.ops.common import call, check_tensor, kernels, or_empty, try_kernel, unsupported_dtype, vjp


def _forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float,
             activation: str, stats: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(y, residual sum or an empty tensor, fp32 mean, fp32 rstd); mean and rstd have shape x.shape[:-1].
    Without ``stats`` (an eager call that records no gradient) the PyTorch paths skip the statistics only
    a backward reads, and return None for them: ``F.layer_norm`` instead of ``native_layer_norm``."""
    n = x.shape[-1]
    stats_shape = x.shape[:-1]
    rows = stats_shape.numel()
    r2 = residual.reshape(rows, n) if residual is not None else None
    done, impl = try_kernel("layer_norm_gelu", x.device, unsupported_dtype(x.dtype),
                            lambda: kernels("layer_norm_gelu").layer_norm_gelu_fwd(
                                x.reshape(rows, n), weight, bias, r2, eps, activation))
    if impl is None:
        y, s, mean, rstd = done
        s = s.view(x.shape) if s is not None else x.new_empty(0)
        return y.view(x.shape), s, mean.view(stats_shape), rstd.view(stats_shape)
    if not stats:
        out = impl.layer_norm_gelu(x, weight, bias, eps, activation, residual)
        y, s = out if residual is not None else (out, x.new_empty(0))
        return y, s, None, None
    *ys, mean, rstd = impl.layer_norm_gelu(x, weight, bias, eps, activation, residual, return_stats=True)
    y, s = ys if residual is not None else (ys[0], x.new_empty(0))
    # Every backend returns contiguous outputs (the kernels write rows), as the fake promises.
    return y.contiguous(), s.contiguous(), mean.float().contiguous(), rstd.float().contiguous()


@torch.library.custom_op("fusedtx::layer_norm_gelu_fwd", mutates_args=())
def _layer_norm_gelu_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, activation: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward` with the statistics, as the backward needs them."""
    return _forward(x, weight, bias, residual, eps, activation)


@_layer_norm_gelu_fwd.register_fake
def _(x, weight, bias, residual, eps, activation):
    s = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), s, stats, stats.clone()


@torch.library.custom_op("fusedtx::layer_norm_gelu_bwd", mutates_args=())
def _layer_norm_gelu_bwd(
    dy: Tensor, ds: Tensor | None, normed: Tensor, weight: Tensor | None, bias: Tensor | None,
    mean: Tensor, rstd: Tensor, eps: float, activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight/dbias are empty tensors where there is no parameter.

    ``normed`` is what the forward normalized: x, or the residual sum (whose gradient, ``ds``, is added
    to dx)."""
    shape = (normed.shape[:-1].numel(), normed.shape[-1])
    done, impl = try_kernel("layer_norm_gelu", normed.device, unsupported_dtype(normed.dtype),
                            lambda: kernels("layer_norm_gelu").layer_norm_gelu_bwd(
                                dy.reshape(shape), ds.reshape(shape) if ds is not None else None,
                                normed.reshape(shape), weight, bias, mean.reshape(-1), rstd.reshape(-1), activation))
    if impl is None:
        dx, dw, db = done
        dx = dx.view(normed.shape)
    else:
        dx, dw, db = vjp(lambda x, w, b: impl.layer_norm_gelu(x, w, b, eps, activation),
                         (normed, weight, bias), (True, weight is not None, bias is not None), dy)
        if ds is not None:
            dx = dx + ds
        dx, dw, db = (t.contiguous() if t is not None else None for t in (dx, dw, db))
    return dx, or_empty(dw, normed), or_empty(db, normed)


@_layer_norm_gelu_bwd.register_fake
def _(dy, ds, normed, weight, bias, mean, rstd, eps, activation):
    dw = weight.new_empty(weight.shape) if weight is not None else normed.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else normed.new_empty(0)
    return normed.new_empty(normed.shape), dw, db


def _layer_norm_gelu_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, activation = inputs
    y, s, mean, rstd = output
    ctx.has_residual = residual is not None  # s is saved in place of x
    ctx.eps, ctx.activation = eps, activation
    ctx.save_for_backward(s if ctx.has_residual else x, weight, bias, mean, rstd)


def _layer_norm_gelu_backward(ctx, dy, ds, _dmean, _drstd):
    normed, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_gelu_bwd(
        dy, ds if ctx.has_residual else None, normed, weight, bias, mean, rstd, ctx.eps, ctx.activation
    )
    return (
        dx,
        dw if weight is not None else None,
        db if bias is not None else None,
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
        x: (..., N), float16 / bfloat16 / float32 (float64 takes the fast PyTorch path), any strides.
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
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the normalized one)")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, like=("x", x), shape=(n,))
    if residual is not None:
        check_tensor("residual", residual, like=("x", x), shape=tuple(x.shape))
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs layer_norm in float32 (its fp32 list); CPU autocast leaves it alone.
        x, weight, bias, residual = (t.float() if t is not None else None for t in (x, weight, bias, residual))
    y, s, _, _ = call(_layer_norm_gelu_fwd, x, weight, bias, residual, float(eps), activation,
                      inference=functools.partial(_forward, stats=False))
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
