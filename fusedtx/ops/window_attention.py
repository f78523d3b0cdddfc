"""Swin (shifted) window attention, fused from the cyclic shift to the window reverse: ``window_attention``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedtx import reference
from fusedtx.kernels.support import (
    WINDOW_FP32_WIDE_BACKWARD_SHARED,
    WINDOW_MAX_HEAD_DIM,
    WINDOW_MAX_TOKENS,
    shared_memory_per_block,
    span,
    window_fp32_backward_covers,
)
from fusedtx.ops.common import (
    DROPOUT,
    call,
    check_count,
    check_probability,
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

_MAX_LOG_SCALE = math.log(100.0)  # Swin V2's clamp of the logit scale (timm, torchvision, transformers)


def _window_unsupported(qkv: Tensor, num_heads: int, window_size: list[int], *maps: Tensor) -> str | None:
    """Why the window kernels do not cover a call on ``qkv`` (and, for the backward, the other (B, H, W, ·)
    ``maps``), or None."""
    tokens, head_dim = window_size[0] * window_size[1], qkv.shape[3] // (3 * num_heads)
    fp32_backward = bool(maps) and qkv.dtype == torch.float32
    # the per-block shared memory only matters for that backward (no device query on the forward's path)
    shared = (shared_memory_per_block(torch.cuda.get_device_capability(qkv.device))
              if fp32_backward and qkv.is_cuda else None)
    return first_reason(
        unsupported_dtype(qkv.dtype),
        f"covers windows of up to {WINDOW_MAX_TOKENS} tokens" if tokens > WINDOW_MAX_TOKENS else None,
        f"supports head dims up to {WINDOW_MAX_HEAD_DIM}" if head_dim > WINDOW_MAX_HEAD_DIM else None,
        "has no float32 backward for windows over 64 tokens with head dims over 32, nor for windows over 128 "
        f"tokens on GPUs with less than {WINDOW_FP32_WIDE_BACKWARD_SHARED // 1024} KiB of shared memory per block"
        if fp32_backward and not window_fp32_backward_covers(tokens, head_dim, shared) else None,
        unsupported_span([span(t, 3) for t in (qkv, *maps)], "one image"),
    )


def _windows_of(qkv: Tensor, window_size: list[int]) -> int:
    bsz, h, w, _ = qkv.shape
    return bsz * (-(-h // window_size[0])) * (-(-w // window_size[1]))


@torch.library.custom_op("fusedtx::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    qkv: Tensor, table: Tensor, qkv_bias: Tensor | None, mask: Tensor | None, cosine_scale: Tensor | None,
    window_size: list[int], shift_size: list[int], num_heads: int, scale: float, order: str,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, W, C) contiguous, fp32 lse (B·windows, heads, N)); shift_size is the effective shift."""
    done, impl = try_kernel("window_attention", qkv.device, _window_unsupported(qkv, num_heads, window_size),
                            lambda: kernels("window_attention").window_attention_fwd(
                                qkv, table, qkv_bias, mask, window_size, shift_size, num_heads, scale, order,
                                cosine_scale))
    if impl is None:
        return done
    out, lse = impl.window_attention(qkv, window_size, shift_size, table, num_heads, qkv_bias, scale, order, mask,
                                     return_lse=True, cosine_scale=cosine_scale)
    return out.contiguous(), lse.float().contiguous()


@_window_attention_fwd.register_fake
def _(qkv, table, qkv_bias, mask, cosine_scale, window_size, shift_size, num_heads, scale, order):
    bsz, h, w, c3 = qkv.shape
    lse = qkv.new_empty((_windows_of(qkv, window_size), num_heads, window_size[0] * window_size[1]),
                        dtype=torch.float32)
    return qkv.new_empty((bsz, h, w, c3 // 3)), lse


@torch.library.custom_op("fusedtx::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    dout: Tensor, qkv: Tensor, table: Tensor, qkv_bias: Tensor | None, mask: Tensor | None,
    cosine_scale: Tensor | None, out: Tensor, lse: Tensor, window_size: list[int], shift_size: list[int],
    num_heads: int, scale: float, order: str, table_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dqkv contiguous, d(table), d(qkv_bias) and d(cosine_scale), each an empty tensor when not asked for or
    without that input)."""
    done, impl = try_kernel("window_attention", qkv.device, _window_unsupported(qkv, num_heads, window_size, dout, out),
                            lambda: kernels("window_attention").window_attention_bwd(
                                dout, qkv, table, qkv_bias, mask, out, lse, window_size, shift_size, num_heads,
                                scale, order, table_grad, bias_grad, cosine_scale))
    if impl is None:
        dqkv, dtable, dbias, dscale = done
        return dqkv, or_empty(dtable, qkv), or_empty(dbias, qkv), or_empty(dscale, qkv)

    def forward(qkv, table, b, cosine_scale):
        return impl.window_attention(qkv, window_size, shift_size, table, num_heads, b, scale, order, mask,
                                     cosine_scale=cosine_scale)

    grads = vjp(forward, (qkv, table, qkv_bias, cosine_scale), (True, table_grad, bias_grad, cosine_scale is not None),
                dout)
    dqkv, dtable, dbias, dscale = (g.contiguous() if g is not None else None for g in grads)
    return dqkv, or_empty(dtable, qkv), or_empty(dbias, qkv), or_empty(dscale, qkv)


@_window_attention_bwd.register_fake
def _(dout, qkv, table, qkv_bias, mask, cosine_scale, out, lse, window_size, shift_size, num_heads, scale, order,
      table_grad, bias_grad):
    dtable = table.new_empty(table.shape) if table_grad else qkv.new_empty(0)
    dbias = qkv_bias.new_empty(qkv_bias.shape) if bias_grad else qkv.new_empty(0)
    dscale = cosine_scale.new_empty(cosine_scale.shape) if cosine_scale is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), dtable, dbias, dscale


def _window_attention_setup(ctx, inputs, output):
    qkv, table, qkv_bias, mask, cosine_scale, window_size, shift_size, num_heads, scale, order = inputs
    out, lse = output
    ctx.args = (window_size, shift_size, num_heads, scale, order)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, table, qkv_bias, mask, cosine_scale, out, lse)


def _window_attention_backward(ctx, dout, _dlse):
    qkv, table, qkv_bias, mask, cosine_scale, out, lse = ctx.saved_tensors
    table_grad = ctx.needs_input_grad[1]
    bias_grad = qkv_bias is not None and ctx.needs_input_grad[2]
    dqkv, dtable, dbias, dscale = _window_attention_bwd(dout, qkv, table, qkv_bias, mask, cosine_scale, out, lse,
                                                        *ctx.args, table_grad, bias_grad)
    scale_grad = cosine_scale is not None and ctx.needs_input_grad[4]
    return (dqkv, dtable if table_grad else None, dbias if bias_grad else None, None,
            dscale if scale_grad else None, *[None] * 5)


_window_attention_fwd.register_autograd(_window_attention_backward, setup_context=_window_attention_setup)


def window_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair (TypeError/ValueError naming ``name``)."""
    pair = (value, value) if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in pair:
        check_count(name, v, minimum)
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
    dropout_p: float = 0.0,
    logit_scale: Tensor | None = None,
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
            above 64 tokens with head dims above 32, or above 128 tokens on GPUs with less than 132 KiB of
            shared memory per block, take the fast PyTorch path). On CUDA, float32 dot products
            follow ``torch.backends.cuda.matmul.allow_tf32``: tf32 (about 3e-4 relative error) when on,
            full float32 when off.
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
        dropout_p: dropout on the attention probabilities (pass it only in training). The kernels do not
            apply it: a call with ``dropout_p > 0`` takes the PyTorch path with a one-time warning (an
            error under ``fusedtx.use_backend("triton")``).
        logit_scale: Swin V2's cosine attention when given: a tensor of num_heads elements (timm's and
            torchvision's (heads, 1, 1), Hugging Face's (1, heads, 1, 1)), any float dtype, receiving a
            gradient. q and k are L2-normalized inside the kernel (``F.normalize``'s eps, padded tokens'
            bias rows too) and head h's logits are ``q̂·k̂·exp(min(logit_scale[h], log 100))``, the clamp
            and exp of the stock modules (in float32); ``scale`` must then be None. ``rel_pos_bias_table`` is V2's
            ``16·sigmoid(cpb_mlp(coords))`` table.

    Returns:
        (B, H, W, C) in qkv's dtype, contiguous: the attention output at every map position, ready for
        the proj Linear. Rows whose keys are all masked (by -inf in ``mask``) give zeros, never NaN.
    """
    check_tensor("qkv", qkv)
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be 4-D (B, H, W, 3·num_heads·head_dim), got shape {tuple(qkv.shape)}")
    check_count("num_heads", num_heads, 1)
    if qkv.shape[3] % (3 * num_heads) or qkv.shape[3] == 0:
        raise ValueError(f"qkv's last dim must be a positive multiple of 3·num_heads = {3 * num_heads}, "
                         f"got shape {tuple(qkv.shape)}")
    wh, ww = window_pair("window_size", window_size, 1)
    shift = window_pair("shift_size", shift_size, 0)
    if order not in reference.WINDOW_ORDERS:
        raise ValueError(f"order must be one of {reference.WINDOW_ORDERS}, got {order!r}")
    named = [("rel_pos_bias_table", rel_pos_bias_table, ((2 * wh - 1) * (2 * ww - 1), num_heads))]
    if qkv_bias is not None:
        named.append(("qkv_bias", qkv_bias, (qkv.shape[3],)))
    if mask is not None:
        named.append(("mask", mask, None))
    for name, t, shape in named:
        check_tensor(name, t, like=("qkv", qkv), shape=shape)
    if mask is not None:
        if mask.dim() != 3 or mask.shape[0] < 1 or tuple(mask.shape[1:]) != (wh * ww, wh * ww):
            raise ValueError(f"mask must have shape (M, N, N) with N = {wh * ww}, got {tuple(mask.shape)}")
        if mask.requires_grad and torch.is_grad_enabled():
            raise ValueError("mask must not require grad: it receives no gradient")
    cosine_scale = None
    if logit_scale is not None:
        check_tensor("logit_scale", logit_scale, like=("qkv", qkv))
        if logit_scale.numel() != num_heads:
            raise ValueError(f"logit_scale must have num_heads = {num_heads} elements, got shape "
                             f"{tuple(logit_scale.shape)}")
        if scale is not None:
            raise ValueError("scale must be None with logit_scale (cosine attention scales by the logit scale)")
        cosine_scale, scale = torch.clamp(logit_scale.reshape(num_heads).float(), max=_MAX_LOG_SCALE).exp(), 1.0
    scale = (qkv.shape[3] // (3 * num_heads)) ** -0.5 if scale is None else float(scale)
    if not abs(scale) < float("inf"):
        raise ValueError(f"scale must be a finite number, got {scale}")
    shift = reference.effective_shift(tuple(qkv.shape[1:3]), (wh, ww), shift, order)
    impl = fallback("window_attention", qkv.device,
                    DROPOUT if check_probability("dropout_p", dropout_p) > 0 else None)
    if impl is not None:
        return impl.window_attention(qkv, (wh, ww), shift, rel_pos_bias_table, num_heads, qkv_bias, scale,
                                     order, mask, dropout_p, cosine_scale=cosine_scale)
    out, _ = call(_window_attention_fwd, qkv, rel_pos_bias_table, qkv_bias, mask, cosine_scale, [wh, ww], list(shift),
                  num_heads, scale, order)
    return out
