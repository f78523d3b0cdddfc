"""The public functional API: validation, torch.library custom ops (fake impls, autograd) and dispatch.

Every op is a ``torch.library.custom_op`` in the ``fusedtx`` namespace, so ``torch.compile`` traces
it as one opaque node (``fullgraph=True``, no graph break) and autograd runs its own backward op.
Inside each custom op, :func:`fusedtx._backend.select` picks the Triton kernel or the reference for
that call; forward and backward choose independently and either choice is correct for either.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

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


def _check_tensor(name: str, t: Tensor, like: tuple[str, Tensor] | None = None,
                  shape: tuple[int, ...] | None = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a float tensor (on the device of the
    named tensor ``like``, and of ``shape``, when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_dtype(name, t.dtype)
    if like is not None:
        _check_same_device(name, t, *like)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _reference_vjp(fn: Callable[..., Tensor], args: tuple, wrt: tuple[bool, ...],
                   cotangent: Tensor) -> list[Tensor | None]:
    """The reference backward: the vector-Jacobian product of the reference forward ``fn(*args)`` for
    ``cotangent``, with respect to the arguments marked in ``wrt`` (None for the others)."""
    chosen = [i for i, w in enumerate(wrt) if w]

    def forward(*primals):
        full = list(args)
        for i, p in zip(chosen, primals, strict=True):
            full[i] = p
        return fn(*full)

    grads = iter(torch.func.vjp(forward, *(args[i] for i in chosen))[1](cotangent))
    return [next(grads) if w else None for w in wrt]


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype}")


def _check_same_device(name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}")


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
    *ys, mean, rstd = reference.layer_norm_gelu(x, weight, bias, eps, activation, residual, return_stats=True)
    y, s = ys if residual is not None else (ys[0], x.new_empty(0))
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
        dx, dw, db = _reference_vjp(lambda x, w, b: reference.layer_norm_gelu(x, w, b, eps, activation),
                                    (normed, weight, bias), (True, weight is not None, bias is not None), dy)
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
            _check_tensor(name, p, like=("x", x), shape=(n,))
    if residual is not None:
        _check_tensor("residual", residual, like=("x", x), shape=tuple(x.shape))
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


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------

_ATTENTION_MAX_HEAD_DIM = 256


def _attention_unsupported(tensors: tuple[Tensor, ...], bias: Tensor | None) -> str | None:
    """Why the attention kernels do not cover a call on (q, k, v[, do]) and bias, or None."""
    reason = _unsupported_dtype(tensors[0].dtype)
    if reason is None and bias is not None and bias.dtype not in _KERNEL_FLOATS:
        reason = f"has no {bias.dtype} bias variant"
    if reason is None and tensors[0].shape[-1] > _ATTENTION_MAX_HEAD_DIM:
        reason = f"supports head dims up to {_ATTENTION_MAX_HEAD_DIM}"
    # Offsets inside one (batch, head) slice are 32-bit in the kernels.
    spans = [(t.shape[-2] - 1) * t.stride(-2) + (t.shape[-1] - 1) * t.stride(-1) for t in tensors]
    if bias is not None:
        spans.append(sum((n - 1) * s for n, s in zip(bias.shape[2:], bias.stride()[2:], strict=True)))
    if reason is None and max(spans, default=0) >= 2**31:
        reason = "indexes one (batch, head) slice with 32-bit offsets and this one spans more"
    return reason


def _empty_bnhd(shape: torch.Size, like: Tensor) -> Tensor:
    """An empty (B, H, N, D) tensor laid out (B, N, H, D) in memory: the layout the kernels write
    (so merging heads afterwards is free), kept by both backends so the fake impl can promise it."""
    b, h, n, d = shape
    return torch.empty((b, n, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


@torch.library.custom_op("fusedtx::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None,
    causal: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Nq, D) laid out (B, Nq, H, D), fp32 log-sum-exp (B, H, Nq)); bias is 4-D."""
    backend = _backend.select("attention", q.device, _attention_unsupported((q, k, v), bias))
    if backend == "triton":
        return _kernels("attention").attention_fwd(q, k, v, bias, key_padding_mask, causal, scale)
    out, lse = reference.attention(q, k, v, bias, key_padding_mask, causal, scale, return_lse=True)
    return _empty_bnhd(out.shape, q).copy_(out), lse.float().contiguous()


@_attention_fwd.register_fake
def _(q, k, v, bias, key_padding_mask, causal, scale):
    return _empty_bnhd(q.shape, q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fusedtx::attention_bwd", mutates_args=())
def _attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None,
    key_padding_mask: Tensor | None, causal: bool, scale: float, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv laid out (B, N, H, D), dbias contiguous in the bias's shape or an empty tensor)."""
    backend = _backend.select("attention", q.device, _attention_unsupported((q, k, v, do), bias))
    if backend == "triton":
        dq, dk, dv, db = _kernels("attention").attention_bwd(
            do, q, k, v, out, lse, bias, key_padding_mask, causal, scale, bias_grad
        )
    else:
        def forward(q, k, v, b):
            return reference.attention(q, k, v, b, key_padding_mask, causal, scale)

        *dqkv, db = _reference_vjp(forward, (q, k, v, bias), (True, True, True, bias_grad), do)
        dq, dk, dv = (_empty_bnhd(t.shape, t).copy_(g) for t, g in zip((q, k, v), dqkv, strict=True))
        db = db.contiguous() if db is not None else None
    return dq, dk, dv, _or_empty(db, q)


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, bias, key_padding_mask, causal, scale, bias_grad):
    db = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return _empty_bnhd(q.shape, q), _empty_bnhd(k.shape, k), _empty_bnhd(v.shape, v), db


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, bias, key_padding_mask)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias, key_padding_mask = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, db = _attention_bwd(
        dout, q, k, v, out, lse, bias, key_padding_mask, ctx.causal, ctx.scale, bias_grad
    )
    return dq, dk, dv, db if bias_grad else None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Scaled dot-product attention ``softmax(q·kᵀ·scale + bias, masked)·v``, flash-style (O(N) memory).

    Args:
        q: (B, H, Nq, D) queries; k, v: (B, H, Nk, D) keys and values (Nk may differ from Nq), as
            ``F.scaled_dot_product_attention`` takes them. Any strides (the head-split views of a qkv
            projection are read in place). float16 / bfloat16 / float32, all three the same dtype;
            float64 and head dims above 256 run the reference. On CUDA, float32 inputs use tf32 dot
            products (about 3e-4 relative error), as cuBLAS does with tf32 allowed.
        bias: optional additive bias broadcastable to (B, H, Nq, Nk) (e.g. a (1, H, N, N) relative
            position bias or an (Nq, Nk) mask of 0 / -inf), any float dtype, read through its strides
            without materializing the broadcast. Its gradient (when it requires grad) is reduced over
            the broadcast dimensions, deterministically.
        key_padding_mask: optional bool (B, Nk); True marks keys to ignore (``nn.MultiheadAttention``'s
            convention).
        causal: query i attends to keys j <= i (top-left aligned, as ``is_causal`` in
            ``F.scaled_dot_product_attention`` when Nq != Nk).
        scale: multiplies q·kᵀ; default 1/sqrt(D).

    Returns:
        (B, H, Nq, D) in q's dtype (its memory is (B, Nq, H, D), so ``out.transpose(1, 2)`` is
        contiguous). Rows whose keys are all masked give zeros (never NaN) and zero gradients.
        Under CUDA autocast, q, k, v and bias run in the autocast dtype, as SDPA's do.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, like=("q", q))
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    if tuple(k.shape) != (bsz, heads, nk, d):
        raise ValueError(f"k must have shape (B, H, Nk, D) = ({bsz}, {heads}, Nk, {d}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if d < 1:
        raise ValueError("q, k and v must have a head_dim of at least 1")
    full = (bsz, heads, nq, nk)
    if bias is not None:
        _check_tensor("bias", bias, like=("q", q))
        if bias.dim() > 4 or any(n not in (1, m) for n, m in zip(bias.shape, full[4 - bias.dim():], strict=True)):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (B, H, Nq, Nk) = {full}")
        bias = bias[(None,) * (4 - bias.dim())]  # a view with leading size-1 dims
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = ignore the key)")
        _check_same_device("key_padding_mask", key_padding_mask, "q", q)
        if tuple(key_padding_mask.shape) != (bsz, nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(bsz, nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
    scale = d**-0.5 if scale is None else float(scale)
    if not abs(scale) < float("inf"):  # catches inf and NaN
        raise ValueError(f"scale must be a finite number, got {scale}")
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # SDPA is on CUDA autocast's lower-precision list: every float input runs in the autocast dtype.
        low = torch.get_autocast_dtype("cuda")
        q, k, v = (t.to(low) for t in (q, k, v))
        bias = bias.to(low) if bias is not None else None
    out, _ = _attention_fwd(q, k, v, bias, key_padding_mask, bool(causal), scale)
    return out


# --------------------------------------------------------------------------------------------------
# sinusoidal
# --------------------------------------------------------------------------------------------------

# The 2D kernel finds a patch's grid row with an fp32 reciprocal, exact for fewer cells than this.
_SINCOS_2D_MAX_CELLS = 1 << 22


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_encoding_args(dim, multiple: int, base, layout: str, layouts: tuple[str, ...]) -> None:
    _check_count("dim", dim, multiple)
    if dim % multiple != 0:
        what = "even (sin, cos pairs)" if multiple == 2 else "divisible by 4 (sin, cos of rows and of columns)"
        raise ValueError(f"dim must be {what}, got dim={dim}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < float("inf"):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if layout not in layouts:
        raise ValueError(f"layout must be one of {layouts}, got {layout!r}")


def _check_positions(positions: Tensor, length, device: torch.device, batch=None) -> Tensor:
    """Validate integer ``positions`` of shape (length,) or (batch, length); return them as int32/int64."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but the encoding is for {device}")
    rows = "(length,)" if batch is None else f"({length},) or ({batch}, {length})"
    if positions.dim() not in (1, 2) or positions.shape[-1] != length:
        raise ValueError(f"positions must have shape {rows}, got {tuple(positions.shape)}")
    if batch is not None and positions.dim() == 2:
        if positions.shape[0] not in (1, batch):
            raise ValueError(f"positions must have shape {rows}, got {tuple(positions.shape)}")
        positions = positions.expand(batch, length)
    return positions if positions.dtype in (torch.int32, torch.int64) else positions.long()


def _check_add_input(x: Tensor) -> None:
    _check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, seq, dim), got {tuple(x.shape)}")


def _sincos_2d_unsupported(dtype: torch.dtype, cells: int) -> str | None:
    if cells >= _SINCOS_2D_MAX_CELLS:
        return f"covers grids of fewer than {_SINCOS_2D_MAX_CELLS} patches"
    return _unsupported_dtype(dtype)


@torch.library.custom_op("fusedtx::sinusoidal_encoding", mutates_args=())
def _sinusoidal_encoding(
    length: int, dim: int, positions: Tensor | None, offset: int, base: float, layout: str,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    if _backend.select("sinusoidal", device, _unsupported_dtype(dtype)) == "triton":
        return _kernels("sinusoidal").sinusoidal_1d(None, positions, length, dim, offset, base, layout, dtype, device)
    # The reference in float64, rounded once: exact at any position (a float32 one is not; see the tests).
    pe = reference.sinusoidal_encoding(length, dim, positions, offset, base, layout, torch.float64, device)
    return pe.to(dtype)


@_sinusoidal_encoding.register_fake
def _(length, dim, positions, offset, base, layout, dtype, device):
    lead = (length,) if positions is None or positions.dim() == 1 else (positions.shape[0], length)
    return torch.empty((*lead, dim), dtype=dtype, device=device)


@torch.library.custom_op("fusedtx::sincos_2d", mutates_args=())
def _sincos_2d(
    grid_h: int, grid_w: int, dim: int, num_prefix_tokens: int, base: float, layout: str,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    if _backend.select("sinusoidal", device, _sincos_2d_unsupported(dtype, grid_h * grid_w)) == "triton":
        return _kernels("sinusoidal").sincos_2d(None, grid_h, grid_w, dim, num_prefix_tokens, base, layout,
                                                dtype, device)
    pe = reference.sincos_2d(grid_h, grid_w, dim, base, num_prefix_tokens, layout, torch.float64, device)
    return pe.to(dtype)


@_sincos_2d.register_fake
def _(grid_h, grid_w, dim, num_prefix_tokens, base, layout, dtype, device):
    return torch.empty((num_prefix_tokens + grid_h * grid_w, dim), dtype=dtype, device=device)


@torch.library.custom_op("fusedtx::add_sinusoidal", mutates_args=())
def _add_sinusoidal(x: Tensor, positions: Tensor | None, offset: int, base: float, layout: str) -> Tensor:
    """x + PE as a new contiguous tensor of x's shape and dtype."""
    if _backend.select("sinusoidal", x.device, _unsupported_dtype(x.dtype)) == "triton":
        _, seq, dim = x.shape
        return _kernels("sinusoidal").sinusoidal_1d(x, positions, seq, dim, offset, base, layout, x.dtype,
                                                    x.device)
    out = reference.add_sinusoidal(x.to(torch.float64), positions, offset, base, layout)
    return out.to(x.dtype, memory_format=torch.contiguous_format)


@_add_sinusoidal.register_fake
def _(x, positions, offset, base, layout):
    return x.new_empty(x.shape)


@torch.library.custom_op("fusedtx::add_sincos_2d", mutates_args=())
def _add_sincos_2d(x: Tensor, grid_h: int, grid_w: int, num_prefix_tokens: int, base: float, layout: str) -> Tensor:
    """x + the 2D encoding as a new contiguous tensor of x's shape and dtype."""
    if _backend.select("sinusoidal", x.device, _sincos_2d_unsupported(x.dtype, grid_h * grid_w)) == "triton":
        return _kernels("sinusoidal").sincos_2d(x, grid_h, grid_w, x.shape[2], num_prefix_tokens, base, layout,
                                                x.dtype, x.device)
    out = reference.add_sincos_2d(x.to(torch.float64), grid_h, grid_w, num_prefix_tokens, base, layout)
    return out.to(x.dtype, memory_format=torch.contiguous_format)


@_add_sincos_2d.register_fake
def _(x, grid_h, grid_w, num_prefix_tokens, base, layout):
    return x.new_empty(x.shape)


def _no_context(ctx, inputs, output):
    pass


def _add_sinusoidal_backward(ctx, dy):
    # d(x + PE)/dx is the identity; the positions and the encoding's settings get no gradient.
    return dy, None, None, None, None


def _add_sincos_2d_backward(ctx, dy):
    return dy, None, None, None, None, None


_add_sinusoidal.register_autograd(_add_sinusoidal_backward, setup_context=_no_context)
_add_sincos_2d.register_autograd(_add_sincos_2d_backward, setup_context=_no_context)


def _resolve_device(device, positions: Tensor | None) -> torch.device:
    if device is None:
        return positions.device if isinstance(positions, Tensor) else torch.get_default_device()
    return torch.device(device)


def sinusoidal_encoding(
    length: int,
    dim: int,
    *,
    positions: Tensor | None = None,
    offset: int = 0,
    base: float = 10000.0,
    layout: str = "interleaved",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """The sinusoidal position encoding ``PE(pos, 2i) = sin(pos / base^(2i/dim))``,
    ``PE(pos, 2i+1) = cos(pos / base^(2i/dim))``, generated for any positions (no table, no maximum).

    Args:
        length: number of positions.
        dim: channels, even.
        positions: optional integer tensor of position ids, shape (length,) or (batch, length); default
            ``arange(length)``. ``offset`` is added to either.
        offset: added to every position (e.g. the cache length in incremental decoding).
        base: the wavelength base (10000 in the original Transformer).
        layout: ``"interleaved"`` (sin, cos, sin, cos, ...: the formula as written) or ``"concat"``
            ([all sines | all cosines], as fairseq and many ViTs lay it out).
        dtype: float16, bfloat16, float32 (float64 runs the reference).
        device: default ``positions``' device, else torch's default device.

    Returns:
        (length, dim), or (batch, length, dim) for 2-D ``positions``, in ``dtype``. Angles are reduced in
        float64, so float32 results are within 1e-6 of the exact values for |position| up to 2^32 (a
        float32 ``pos * freq`` is off by up to |pos|·2⁻²⁴ before the sine: 0.06 at 2^20). Beyond
        that float64 itself loses the angle's digits; the kernel clamps positions to ±2^48.
    """
    _check_count("length", length, 0)
    _check_encoding_args(dim, 2, base, layout, reference.SINUSOIDAL_LAYOUTS)
    _check_count("offset", offset, -(2**62))
    _check_dtype("dtype", dtype)
    device = _resolve_device(device, positions)
    if positions is not None:
        positions = _check_positions(positions, length, device)
    return _sinusoidal_encoding(length, dim, positions, offset, float(base), layout, dtype, device)


def sincos_2d(
    grid_h: int,
    grid_w: int,
    dim: int,
    *,
    base: float = 10000.0,
    num_prefix_tokens: int = 0,
    layout: str = "mae",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """The 2D sin-cos position encoding of a grid_h x grid_w patch grid (ViT / MAE), for any grid size.

    Returns (num_prefix_tokens + grid_h * grid_w, dim) in ``dtype``: the prefix (class) tokens get zeros
    (MAE's ``cls_token=True``), then the patches in row-major order. ``dim`` must be divisible by 4: each
    quarter holds sin or cos of one axis' index times the frequencies ``1 / base^(i / (dim/4))``, in
    the order of ``layout``:

    * ``"mae"`` (default): [sin x | cos x | sin y | cos y], x the column index, y the row: equal to MAE's
      ``get_2d_sincos_pos_embed`` (whose half named ``emb_h`` is in fact built from the column index);
    * ``"mae_hw"``: [sin y | cos y | sin x | cos x]: rows first, as timm's ``build_sincos2d_pos_embed``
      with ``interleave_sin_cos=True``;
    * ``"timm"``: [sin y | sin x | cos y | cos x]: timm's ``build_sincos2d_pos_embed`` default.

    dtype: float16, bfloat16, float32 (float64 runs the reference); device: default torch's default.
    """
    _check_count("grid_h", grid_h, 1)
    _check_count("grid_w", grid_w, 1)
    _check_count("num_prefix_tokens", num_prefix_tokens, 0)
    _check_encoding_args(dim, 4, base, layout, reference.SINCOS_2D_LAYOUTS)
    _check_dtype("dtype", dtype)
    device = _resolve_device(device, None)
    return _sincos_2d(grid_h, grid_w, dim, num_prefix_tokens, float(base), layout, dtype, device)


def add_sinusoidal(
    x: Tensor,
    *,
    offset: int = 0,
    positions: Tensor | None = None,
    base: float = 10000.0,
    layout: str = "interleaved",
) -> Tensor:
    """``x + PE`` in one pass with no table in memory: :func:`sinusoidal_encoding` of the positions
    ``offset + arange(seq)`` (or ``positions + offset``) added to x.

    Args:
        x: (batch, seq, dim), float16 / bfloat16 / float32 (float64 runs the reference), any strides;
            dim even.
        offset: added to every position (incremental decoding: the number of cached tokens).
        positions: optional integer position ids, (seq,) or (batch, seq), on x's device.
        base, layout: as in :func:`sinusoidal_encoding`.

    Returns:
        A new contiguous tensor of x's shape and dtype; the sum is formed in float32 and rounded once.
        The gradient flows to x unchanged (nothing else has one).
    """
    _check_add_input(x)
    _, seq, dim = x.shape
    _check_encoding_args(dim, 2, base, layout, reference.SINUSOIDAL_LAYOUTS)
    _check_count("offset", offset, -(2**62))
    if positions is not None:
        positions = _check_positions(positions, seq, x.device, batch=x.shape[0])
    return _add_sinusoidal(x, positions, offset, float(base), layout)


def add_sincos_2d(
    x: Tensor,
    grid_h: int,
    grid_w: int,
    num_prefix_tokens: int = 0,
    *,
    base: float = 10000.0,
    layout: str = "mae",
) -> Tensor:
    """``x + sincos_2d(grid_h, grid_w, dim)`` in one pass with no table in memory.

    Args:
        x: (batch, num_prefix_tokens + grid_h * grid_w, dim), float16 / bfloat16 / float32 (float64 runs
            the reference), any strides; dim divisible by 4. The prefix (class) tokens pass unchanged.
        grid_h, grid_w: the patch grid; patches in row-major order.
        base, layout: as in :func:`sincos_2d`.

    Returns:
        A new contiguous tensor of x's shape and dtype (sum in float32, rounded once); the gradient flows
        to x unchanged.
    """
    _check_add_input(x)
    _check_count("grid_h", grid_h, 1)
    _check_count("grid_w", grid_w, 1)
    _check_count("num_prefix_tokens", num_prefix_tokens, 0)
    _check_encoding_args(x.shape[2], 4, base, layout, reference.SINCOS_2D_LAYOUTS)
    if x.shape[1] != num_prefix_tokens + grid_h * grid_w:
        raise ValueError(
            f"x must have num_prefix_tokens + grid_h * grid_w = {num_prefix_tokens + grid_h * grid_w} tokens "
            f"(dim 1), got shape {tuple(x.shape)}"
        )
    return _add_sincos_2d(x, grid_h, grid_w, num_prefix_tokens, float(base), layout)


# --------------------------------------------------------------------------------------------------
# window_attention
# --------------------------------------------------------------------------------------------------

_WINDOW_MAX_TOKENS = 256  # window areas the kernels cover: Swin's 7x7 up to 16x16
_WINDOW_MAX_HEAD_DIM = 128


def window_fp32_backward_covers(tokens: int, head_dim: int) -> bool:
    """Whether the float32 window backward kernel covers windows of ``tokens`` at ``head_dim``: its tiles
    hold every query of a window, and in fp32 larger ones outgrow a GPU's shared memory."""
    return tokens <= 64 or head_dim <= 32


def _window_unsupported(qkv: Tensor, num_heads: int, window_size: list[int], *maps: Tensor) -> str | None:
    """Why the window kernels do not cover a call on ``qkv`` (and, for the backward, the other (B, H, W, ·)
    ``maps``), or None."""
    reason = _unsupported_dtype(qkv.dtype)
    tokens, head_dim = window_size[0] * window_size[1], qkv.shape[3] // (3 * num_heads)
    if reason is None and tokens > _WINDOW_MAX_TOKENS:
        reason = f"covers windows of up to {_WINDOW_MAX_TOKENS} tokens"
    if reason is None and head_dim > _WINDOW_MAX_HEAD_DIM:
        reason = f"supports head dims up to {_WINDOW_MAX_HEAD_DIM}"
    fp32_backward = maps and qkv.dtype == torch.float32
    if reason is None and fp32_backward and not window_fp32_backward_covers(tokens, head_dim):
        reason = "has no float32 backward for windows over 64 tokens with head dims over 32"
    # Offsets inside one image are 32-bit in the kernels.
    spans = [sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:], strict=True)) for t in (qkv, *maps)]
    if reason is None and max(spans) >= 2**31:
        reason = "indexes one image with 32-bit offsets and this one spans more"
    return reason


def _windows_of(qkv: Tensor, window_size: list[int]) -> int:
    bsz, h, w, _ = qkv.shape
    return bsz * (-(-h // window_size[0])) * (-(-w // window_size[1]))


@torch.library.custom_op("fusedtx::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    qkv: Tensor, table: Tensor, qkv_bias: Tensor | None, mask: Tensor | None, window_size: list[int],
    shift_size: list[int], num_heads: int, scale: float, order: str,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, W, C) contiguous, fp32 lse (B·windows, heads, N)); shift_size is the effective shift."""
    reason = _window_unsupported(qkv, num_heads, window_size)
    if _backend.select("window_attention", qkv.device, reason) == "triton":
        return _kernels("window_attention").window_attention_fwd(
            qkv, table, qkv_bias, mask, window_size, shift_size, num_heads, scale, order
        )
    out, lse = reference.window_attention(qkv, window_size, shift_size, table, num_heads, qkv_bias, scale,
                                          order, mask, return_lse=True)
    return out.contiguous(), lse.float().contiguous()


@_window_attention_fwd.register_fake
def _(qkv, table, qkv_bias, mask, window_size, shift_size, num_heads, scale, order):
    bsz, h, w, c3 = qkv.shape
    lse = qkv.new_empty((_windows_of(qkv, window_size), num_heads, window_size[0] * window_size[1]),
                        dtype=torch.float32)
    return qkv.new_empty((bsz, h, w, c3 // 3)), lse


@torch.library.custom_op("fusedtx::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    dout: Tensor, qkv: Tensor, table: Tensor, qkv_bias: Tensor | None, mask: Tensor | None, out: Tensor,
    lse: Tensor, window_size: list[int], shift_size: list[int], num_heads: int, scale: float, order: str,
    table_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dqkv contiguous, d(table) or an empty tensor, d(qkv_bias) or an empty tensor)."""
    reason = _window_unsupported(qkv, num_heads, window_size, dout, out)
    if _backend.select("window_attention", qkv.device, reason) == "triton":
        dqkv, dtable, dbias = _kernels("window_attention").window_attention_bwd(
            dout, qkv, table, qkv_bias, mask, out, lse, window_size, shift_size, num_heads, scale, order,
            table_grad, bias_grad,
        )
    else:
        def forward(qkv, table, b):
            return reference.window_attention(qkv, window_size, shift_size, table, num_heads, b, scale, order, mask)

        dqkv, dtable, dbias = _reference_vjp(forward, (qkv, table, qkv_bias), (True, table_grad, bias_grad), dout)
        dqkv = dqkv.contiguous()
    return dqkv, _or_empty(dtable, qkv), _or_empty(dbias, qkv)


@_window_attention_bwd.register_fake
def _(dout, qkv, table, qkv_bias, mask, out, lse, window_size, shift_size, num_heads, scale, order,
      table_grad, bias_grad):
    dtable = torch.empty_like(table) if table_grad else qkv.new_empty(0)
    dbias = torch.empty_like(qkv_bias) if bias_grad else qkv.new_empty(0)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), dtable, dbias


def _window_attention_setup(ctx, inputs, output):
    qkv, table, qkv_bias, mask, window_size, shift_size, num_heads, scale, order = inputs
    out, lse = output
    ctx.args = (window_size, shift_size, num_heads, scale, order)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, table, qkv_bias, mask, out, lse)


def _window_attention_backward(ctx, dout, _dlse):
    qkv, table, qkv_bias, mask, out, lse = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[1]
    bias_grad = qkv_bias is not None and ctx.needs_input_grad[2]
    dqkv, dtable, dbias = _window_attention_bwd(dout, qkv, table, qkv_bias, mask, out, lse, *ctx.args,
                                                table_grad, bias_grad)
    return (dqkv, dtable if table_grad else None, dbias if bias_grad else None, *[None] * 6)


_window_attention_fwd.register_autograd(_window_attention_backward, setup_context=_window_attention_setup)


def _window_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    pair = (value, value) if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in pair:
        _check_count(name, v, minimum)
    return int(pair[0]), int(pair[1])


def window_attention(
    qkv: Tensor,
    *,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int],
    rel_pos_bias_table: Tensor,
    num_heads: int,
    qkv_bias: Tensor | None = None,
    scale: float | None = None,
    order: str = "timm",
    mask: Tensor | None = None,
) -> Tensor:
    """Swin (shifted) window attention from the qkv projection of a map to the input of proj, in one kernel.

    Per window of N = wh·ww tokens of the cyclically shifted, padded map: ``softmax(q·kᵀ·scale +
    rel_pos_bias_table[relative index] + shift mask [+ mask])·v``; then the windows are reversed,
    un-shifted and cropped, as timm's ``SwinTransformerBlock._attn`` and torchvision's
    ``shifted_window_attention`` do between their qkv and proj Linears.

    Args:
        qkv: (B, H, W, 3·C) output of the qkv Linear on the (B, H, W, dim) map, channels laid out
            (3, num_heads, head_dim), C = num_heads·head_dim; any strides. float16 / bfloat16 / float32
            (float64, head dims above 128, windows above 256 tokens, and the float32 backward of windows
            above 64 tokens with head dims above 32 run the reference). On CUDA, float32 uses tf32 dot
            products (about 3e-4 relative error).
        window_size: (wh, ww) or an int; H and W need not be multiples of it.
        shift_size: (sh, sw) or an int, >= 0: the cyclic shift (0 for plain window attention).
        rel_pos_bias_table: ((2wh-1)·(2ww-1), num_heads) relative position bias table, any float dtype;
            receives a gradient (deterministic).
        num_heads: heads.
        qkv_bias: (3·C,) the qkv Linear's bias, or None: padded positions hold it, as they do in the stock
            modules (which pad before the Linear); its gradient from the padded keys and values is returned.
        scale: multiplies q·kᵀ; default head_dim^-0.5.
        order: ``"timm"``: roll by -shift, then pad (timm ``SwinTransformerBlock``; pass the block's
            ``window_size`` and ``shift_size``, which it clamps to the input resolution when built);
            ``"torchvision"``: pad, then roll, dropping the shift along an axis whose padded size is not
            larger than the window (torchvision ``ShiftedWindowAttention``). The shift mask (-100 between
            regions) is built on the padded map in both.
        mask: optional (M, N, N) additive mask, any float dtype, no gradient: window number g, counted
            over (batch, window row, window column), adds ``mask[g % M]`` (timm ``WindowAttention``'s mask
            for pre-partitioned windows: qkv (B·nW, wh, ww, 3·C) with window_size (wh, ww)).

    Returns:
        (B, H, W, C) in qkv's dtype, contiguous: the attention output at every map position, ready for
        the proj Linear. Rows whose keys are all masked (by -inf in ``mask``) give zeros, never NaN.
    """
    _check_tensor("qkv", qkv)
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be 4-D (B, H, W, 3·num_heads·head_dim), got shape {tuple(qkv.shape)}")
    _check_count("num_heads", num_heads, 1)
    if qkv.shape[3] % (3 * num_heads) or qkv.shape[3] == 0:
        raise ValueError(f"qkv's last dim must be a positive multiple of 3·num_heads = {3 * num_heads}, "
                         f"got shape {tuple(qkv.shape)}")
    wh, ww = _window_pair("window_size", window_size, 1)
    shift = _window_pair("shift_size", shift_size, 0)
    if order not in reference.WINDOW_ORDERS:
        raise ValueError(f"order must be one of {reference.WINDOW_ORDERS}, got {order!r}")
    named = [("rel_pos_bias_table", rel_pos_bias_table, ((2 * wh - 1) * (2 * ww - 1), num_heads))]
    if qkv_bias is not None:
        named.append(("qkv_bias", qkv_bias, (qkv.shape[3],)))
    if mask is not None:
        named.append(("mask", mask, None))
    for name, t, shape in named:
        _check_tensor(name, t, like=("qkv", qkv), shape=shape)
    if mask is not None:
        if mask.dim() != 3 or mask.shape[0] < 1 or tuple(mask.shape[1:]) != (wh * ww, wh * ww):
            raise ValueError(f"mask must have shape (M, N, N) with N = {wh * ww}, got {tuple(mask.shape)}")
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("mask must not require grad: it receives no gradient")
    scale = (qkv.shape[3] // (3 * num_heads)) ** -0.5 if scale is None else float(scale)
    if not abs(scale) < float("inf"):
        raise ValueError(f"scale must be a finite number, got {scale}")
    shift = reference.effective_shift(tuple(qkv.shape[1:3]), (wh, ww), shift, order)
    out, _ = _window_attention_fwd(qkv, rel_pos_bias_table, qkv_bias, mask, [wh, ww], list(shift), num_heads,
                                   scale, order)
    return out
