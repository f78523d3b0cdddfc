"""The online-softmax core both attention families build on (flash attention's per-block recurrence).

Scores are kept in log2 units: ``scale·log2(e)`` is folded into one multiply so every exponential is an
``exp2``. A query block keeps its running row max ``m``, row sum ``l`` and unnormalised output ``acc``;
each new key block rescales them by ``exp2(m_old - m_new)`` (:func:`online_softmax_step`). The backward
recomputes the probabilities from the saved log-sum-exp (:func:`lse_log2`, :func:`softmax_bwd`).

``fusedtx.kernels.attention`` tiles (batch, head, query block) with it; ``fusedtx.kernels.window_attention``
tiles Swin windows with its own index arithmetic and calls the same functions.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16, the smallest tl.dot size): 80 -> 128 lanes."""
    return max(16, triton.next_power_of_2(head_dim))




@triton.jit
def add_bias(s, Bias, qi, kj, Nq, Nk, stride_bm, stride_bn):
    """``s + bias[qi, kj]·log2(e)``: an additive bias joins log2-unit scores. ``Bias`` points at a
    (Nq, Nk) slice read through its strides (0 on broadcast dims); elements outside it add 0."""
    bias = tl.load(Bias + qi * stride_bm + kj * stride_bn, mask=(qi < Nq) & (kj < Nk), other=0.0)
    return s + bias.to(tl.float32) * _LOG2E


@triton.jit
def scores(a, b, qk_scale, Bias, KPM, qi, kj, Nq, Nk, stride_bm, stride_bn, stride_mn,
           HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
           PRECISION: tl.constexpr):
    """One tile of attention scores in log2 units: ``(a @ bᵀ)·qk_scale [+ bias·log2(e)]``, -inf where masked.

    ``a`` (R, BLOCK_D) and ``b`` (C, BLOCK_D) are the row and column operands: (q, k) for a
    (query, key) tile, (k, q) for the transposed tile. ``qi`` and ``kj`` hold the query and key index of
    each element and broadcast to (R, C) (``offs_m[:, None], offs_n[None, :]`` or the transpose).
    ``qk_scale`` is scale·log2(e). ``Bias`` points at this (batch, head)'s bias slice
    (:func:`add_bias`), ``KPM`` at this batch's key padding row (nonzero = ignore the key).
    ``MASKED`` applies ``kj < Nk`` and, with ``CAUSAL``, ``kj <= qi``: tiles that need neither may
    skip them. Padding and bias -inf masking apply always. (Window attention calls it for dot·scale and
    the window's key mask, then adds its table bias, shift mask and optional mask, the last with
    :func:`add_bias`.) ``PRECISION`` is tl.dot's input precision for float32 operands ("tf32" or "ieee",
    :func:`fusedtx.kernels.support.dot_precision`), as in every dot of the attention kernels.
    """
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * qk_scale
    if HAS_BIAS:
        s = add_bias(s, Bias, qi, kj, Nq, Nk, stride_bm, stride_bn)
    if HAS_KPM:
        pad = tl.load(KPM + kj * stride_mn, mask=kj < Nk, other=1)
        s = tl.where(pad != 0, float("-inf"), s)
    if MASKED:
        valid = kj < Nk
        if CAUSAL:
            valid = valid & (kj <= qi)
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Fold one key block into the running state of a query block (the flash-attention recurrence).

    ``s`` (BLOCK_M, BLOCK_N) fp32 scores in log2 units from :func:`scores` (-inf = masked);
    ``v`` (BLOCK_N, BLOCK_D) the value block in the I/O dtype, finite on masked rows (load them as 0).
    ``acc`` (BLOCK_M, BLOCK_D) fp32, ``m_i`` and ``l_i`` (BLOCK_M,) fp32 start as 0, -inf and 0.
    Returns the updated (acc, m_i, l_i); a row with no allowed key so far keeps acc = 0, l = 0, m = -inf.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen no allowed key, m is -inf: exponentiate against 0 so exp2(-inf - -inf)
    # never appears (everything is exp2(-inf) = 0 then).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def finish_rows(acc, m_i, l_i):
    """Normalised output (fp32) and natural-log log-sum-exp of each row of a finished query block.

    Rows with no allowed key (l = 0) give an output of 0 and lse = -inf."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    return out, lse


@triton.jit
def lse_log2(Lse, offs, n):
    """The saved lse of rows ``offs`` in log2 units, +inf for rows with no allowed key and rows >= n,
    so that ``exp2(s - lse)`` recomputes their probabilities as exactly 0."""
    lse = tl.load(Lse + offs, mask=offs < n, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)


@triton.jit
def softmax_bwd(s, lse2, dp, delta):
    """Backward of softmax for one tile: the probabilities ``p = exp2(s - lse2)`` recomputed from the
    log2 scores (:func:`scores`) and row lse (:func:`lse_log2`), and ``ds = p·(dp - delta)`` with
    ``dp = dO·Vᵀ`` and ``delta = rowsum(dO·O)``; lse2 and delta broadcast to the tile. ``ds`` is the
    gradient of the natural-unit scores (so also of the bias)."""
    p = tl.exp2(s - lse2)
    return p, p * (dp - delta)
