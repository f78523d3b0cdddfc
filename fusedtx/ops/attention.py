"""Scaled dot-product attention, flash-style: ``attention``."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fusedtx.kernels.support import ATTENTION_MAX_HEAD_DIM, KERNEL_DTYPES, empty_bnhd, span
from fusedtx.ops.common import (
    DROPOUT,
    call,
    check_probability,
    check_same_device,
    check_tensor,
    fallback,
    first_reason,
    kernels,
    or_empty,
    try_kernel,
    unsupported_dtype,
    unsupported_span,
    vjp,
)


def _attention_unsupported(tensors: tuple[Tensor, ...], bias: Tensor | None) -> str | None:
    """Why the attention kernels do not cover a call on (q, k, v[, do]) and bias, or None."""
    head_dim = tensors[0].shape[-1]
    return first_reason(
        unsupported_dtype(tensors[0].dtype),
        f"has no {bias.dtype} bias variant" if bias is not None and bias.dtype not in KERNEL_DTYPES else None,
        f"supports head dims up to {ATTENTION_MAX_HEAD_DIM}" if head_dim > ATTENTION_MAX_HEAD_DIM else None,
        unsupported_span([span(t, 2) for t in (*tensors, *([bias] if bias is not None else []))],
                         "one (batch, head) slice"),
    )


def _forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None, causal: bool,
             scale: float, lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """(out (B, H, Nq, D) laid out (B, Nq, H, D), fp32 log-sum-exp (B, H, Nq)); bias is 4-D. Without ``lse``
    (an eager call that records no gradient) the PyTorch paths return SDPA's output as it lays it out (see
    :func:`attention`) and None for the log-sum-exp only a backward reads."""
    done, impl = try_kernel("attention", q.device, _attention_unsupported((q, k, v), bias),
                            lambda: kernels("attention").attention_fwd(q, k, v, bias, key_padding_mask, causal, scale))
    if impl is None:
        return done
    if not lse:
        return impl.attention(q, k, v, bias, key_padding_mask, causal, scale), None
    out, lse = impl.attention(q, k, v, bias, key_padding_mask, causal, scale, return_lse=True)
    if out.transpose(1, 2).is_contiguous():  # already laid out (B, Nq, H, D), as SDPA lays out head-split views
        return out, lse.float().contiguous()
    return empty_bnhd(out.shape, q).copy_(out), lse.float().contiguous()


@torch.library.custom_op("fusedtx::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, key_padding_mask: Tensor | None,
    causal: bool, scale: float,
) -> tuple[Tensor, Tensor]:
    """:func:`_forward` with the log-sum-exp, as the backward needs it."""
    return _forward(q, k, v, bias, key_padding_mask, causal, scale)


@_attention_fwd.register_fake
def _(q, k, v, bias, key_padding_mask, causal, scale):
    return empty_bnhd(q.shape, q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fusedtx::attention_bwd", mutates_args=())
def _attention_bwd(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Tensor | None,
    key_padding_mask: Tensor | None, causal: bool, scale: float, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv laid out (B, N, H, D), dbias contiguous in the bias's shape or an empty tensor)."""
    done, impl = try_kernel("attention", q.device, _attention_unsupported((q, k, v, do), bias),
                            lambda: kernels("attention").attention_bwd(do, q, k, v, out, lse, bias, key_padding_mask,
                                                                       causal, scale, bias_grad))
    if impl is None:
        dq, dk, dv, db = done
        return dq, dk, dv, or_empty(db, q)

    def forward(q, k, v, b):
        return impl.attention(q, k, v, b, key_padding_mask, causal, scale)

    *dqkv, db = vjp(forward, (q, k, v, bias), (True, True, True, bias_grad), do)
    dq, dk, dv = (empty_bnhd(t.shape, t).copy_(g) for t, g in zip((q, k, v), dqkv, strict=True))
    return dq, dk, dv, or_empty(db.contiguous() if db is not None else None, q)


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, bias, key_padding_mask, causal, scale, bias_grad):
    db = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return empty_bnhd(q.shape, q), empty_bnhd(k.shape, k), empty_bnhd(v.shape, v), db


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
    dropout_p: float = 0.0,
) -> Tensor:
    """Scaled dot-product attention ``softmax(q·kᵀ·scale + bias, masked)·v``, flash-style (O(N) memory).

    Args:
        q: (B, H, Nq, D) queries; k, v: (B, H, Nk, D) keys and values (Nk may differ from Nq), as
            ``F.scaled_dot_product_attention`` takes them. Any strides (the head-split views of a qkv
            projection are read in place). float16 / bfloat16 / float32, all three the same dtype;
            float64 and head dims above 256 take the fast PyTorch path. On CUDA, float32 dot products follow
            ``torch.backends.cuda.matmul.allow_tf32`` as stock PyTorch does: tf32 (about 3e-4 relative
            error) when it is on, full float32 ("ieee") when it is off, PyTorch's default.
        bias: optional additive bias broadcastable to (B, H, Nq, Nk) (e.g. a (1, H, N, N) relative
            position bias or an (Nq, Nk) mask of 0 / -inf), any float dtype, read through its strides
            without materializing the broadcast. Its gradient (when it requires grad) is reduced over
            the broadcast dimensions, deterministically.
        key_padding_mask: optional bool (B, Nk); True marks keys to ignore (``nn.MultiheadAttention``'s
            convention).
        causal: query i attends to keys j <= i (top-left aligned, as ``is_causal`` in
            ``F.scaled_dot_product_attention`` when Nq != Nk).
        scale: multiplies q·kᵀ; default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities, as SDPA's (pass it only in training). The
            kernels do not apply it: a call with ``dropout_p > 0`` takes the PyTorch path with a one-time
            warning (an error under ``fusedtx.use_backend("triton")``).

    Returns:
        (B, H, Nq, D) in q's dtype. Its memory is (B, Nq, H, D), so ``out.transpose(1, 2)`` is
        contiguous, except in eager inference on the PyTorch path, which returns SDPA's output as is:
        laid out (B, Nq, H, D) for the head-split views of a projection that models pass, (B, H, Nq, D)
        for a contiguous q (``.transpose(1, 2).reshape(...)`` is right either way). Rows whose keys are
        all masked give zeros (never NaN) and zero gradients.
        Under CUDA autocast, q, k, v and bias run in the autocast dtype, as SDPA's do.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, like=("q", q))
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
        check_tensor("bias", bias, like=("q", q))
        if bias.dim() > 4 or any(n not in (1, m) for n, m in zip(bias.shape, full[4 - bias.dim():], strict=True)):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (B, H, Nq, Nk) = {full}")
        bias = bias[(None,) * (4 - bias.dim())]  # a view with leading size-1 dims
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = ignore the key)")
        check_same_device("key_padding_mask", key_padding_mask, "q", q)
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
    impl = fallback("attention", q.device, DROPOUT if check_probability("dropout_p", dropout_p) > 0 else None)
    if impl is not None:
        return impl.attention(q, k, v, bias, key_padding_mask, bool(causal), scale, dropout_p=dropout_p)
    out, _ = call(_attention_fwd, q, k, v, bias, key_padding_mask, bool(causal), scale,
                  inference=functools.partial(_forward, lse=False))
    return out
