"""Triton Swin window attention, fused from the cyclic shift to the window reverse, forward and backward.

The kernels read q, k and v straight from the qkv Linear's output, a (B, H, W, 3·C) map with channels
(3, heads, head_dim), and write the output straight into a (B, H, W, C) map ready for the proj Linear.
Shift, padding and window partition are index arithmetic: a program looks at window (wy, wx) of the
shifted, padded grid, and token r of that window sits at grid position (wy·wh + r // ww, wx·ww + r % ww),
which :func:`_axis` maps back to the map (and tells whether it is padding):

* ``order="timm"`` rolls the map by -shift, then pads: grid row p holds map row (p + s) mod H when
  p < H, padding otherwise;
* ``order="torchvision"`` pads, then rolls the padded map: grid row p holds map row (p + s) mod Hp when
  that is < H, padding otherwise.

The output of a grid position goes back to the map position it was read from, which undoes the shift
and the partition and crops the padding in one store. Padding tokens take part as keys and values with
the qkv Linear's bias (what the stock modules' Linear gives for their zero padding); their own outputs are
dropped, so their queries never matter.

Scores are the online-softmax core's :func:`~fusedtx.kernels.softmax_core.scores` (q·kᵀ·scale in log2 units,
keys past the window -inf) plus the relative position bias gathered from the ((2wh-1)(2ww-1), heads)
table and the shift mask (-100 between regions of the shifted map). Each token carries one int code,
``v·16 + region``: its bias coordinate ``v = ty·(2ww-1) + tx``, so that the table row of a (query i,
key j) pair is ``v(i) - v(j) + const``, and its shift region id (from its grid position, no mask
tensor). The softmax is the attention family's online-softmax core (``online_softmax_step``,
``finish_rows``, ``lse_log2``, ``softmax_bwd``); this file adds only the index arithmetic around it.

Swin V2's cosine attention (``COSINE``): every q and k row (padding keys' bias rows too) is L2-normalized
as it is loaded, and the head's multiplier ``Scale[h]`` (exp of the clamped logit scale) takes the place of
``scale``. The backward's dQ and dK, taken for the unit vectors, go back through the normalization on the
way out: ``dx = (dx̂ - x̂·(x̂·dx̂)) / |x|``. The gradient of ``Scale[h]`` is ``Σ dS·(q̂·k̂)``, summed as
``Σ_j k̂_j·(dSᵀq̂)_j`` over each backward program's keys (complete per window there) into per-program partials.

Forward: one program per (batch, window, head, query block), a 1-D grid (no 65,535 cap), walking the
key blocks of its window; it stores the output rows and the log-sum-exp of every window row
(B·windows, heads, N) fp32.

Backward, deterministic, no atomics. ``_window_attn_bwd_kernel``: one program per (group of windows,
head, key block) takes all the queries of a window at once (an (all queries) x (its keys) tile), so dK
and dV of its keys are complete per window and written at once; when the key block covers the whole
window (windows up to 64 tokens on a GPU) dQ is too. It also sums, over its windows in order, dS (the
gradient of the bias of each (query, key) pair) and the dK/dV of padding tokens, in registers, and writes
one partial per program; the launcher sums the partials in a fixed order, ``_table_grad_kernel`` gathers
the (heads, N, N) bias gradient into the table, and the padding sums become the qkv bias gradient. Larger
windows take dQ from ``_window_attn_bwd_dq_kernel`` (one program per (batch, window, head, query
block)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax_core import (
    LOG2E,
    add_bias,
    block_d,
    finish_rows,
    lse_log2,
    online_softmax_step,
    scores,
    softmax_bwd,
)
from .support import dot_precision, dtype_tag, full_float32, interpreter_enabled
from .tuning import Tuning, device_family, launch, tuned_or

_LOG2E = tl.constexpr(LOG2E)
_SHIFT_MASK_LOG2 = tl.constexpr(-100.0 * LOG2E)  # the stock modules' -100 between regions, in log2 units


# --------------------------------------------------------------------------------------------------
# Index arithmetic: where the tokens of a window come from
# --------------------------------------------------------------------------------------------------


@triton.jit
def _axis(p, size, padded, shift, TORCHVISION: tl.constexpr):
    """Map index and realness (not padding) of grid position ``p`` along one axis."""
    if TORCHVISION:  # pad to ``padded``, then roll the padded axis by -shift
        src = (p + shift) % padded
        real = src < size
    else:  # roll the map axis by -shift, then pad
        src = (p + shift) % size
        real = p < size
    return src, real


@triton.jit
def _region(p, padded, window, shift):
    """Shift region (0, 1, 2) of grid position ``p`` along one axis, as the stock modules' slices
    [0, -window), [-window, -shift), [-shift, end) number them; one region when the shift is 0."""
    r = tl.where(p >= padded - shift, 2, tl.where(p >= padded - window, 1, 0))
    return tl.where(shift > 0, r, 0)


@triton.jit
def _window_of(g, n_wy, n_wx):
    """(batch, window row, window column) of window number ``g`` (batch-major, then row-major)."""
    per_image = n_wy * n_wx
    w = g % per_image
    return g // per_image, w // n_wx, w % n_wx


@triton.jit
def _tokens(r, wy, wx, H, W, n_wy, n_wx, sh, sw, WH: tl.constexpr, WW: tl.constexpr,
            TORCHVISION: tl.constexpr):
    """For window-local token indices ``r`` of window (wy, wx): map row and column, whether the token is
    real (inside the window and not padding), and its code ``v·16 + region``: the virtual bias coordinate
    v = ty·(2WW-1) + tx (rows past the window clamped into it; they are masked) and the shift region id."""
    ty = r // WW
    tx = r % WW
    py = wy * WH + ty
    px = wx * WW + tx
    y, real_y = _axis(py, H, n_wy * WH, sh, TORCHVISION)
    x, real_x = _axis(px, W, n_wx * WW, sw, TORCHVISION)
    real = real_y & real_x & (r < WH * WW)
    region = _region(py, n_wy * WH, WH, sh) * 3 + _region(px, n_wx * WW, WW, sw)
    return y, x, real, (tl.minimum(ty, WH - 1) * (2 * WW - 1) + tx) * 16 + region


@triton.jit
def _load_rows(ptr, rows, keep, stride_c, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(rows), BLOCK_D) tile of the head_dim vectors at element offsets ``rows``; 0 where not ``keep``."""
    cols = tl.arange(0, BLOCK_D)
    mask = keep[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(ptr + rows[:, None] + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, rows, keep, stride_c, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    mask = keep[:, None] & (cols < HEAD_DIM)[None, :]
    tl.store(ptr + rows[:, None] + cols[None, :] * stride_c, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_keys(ptr, rows, real, inside, Fill, stride_c, stride_f, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_FILL: tl.constexpr):
    """Key or value rows: real tokens from the map, padding tokens (inside the window, not real) the qkv
    bias ``Fill`` rounded to the I/O dtype (the Linear's output for zero input), rows past the window 0."""
    x = _load_rows(ptr, rows, real, stride_c, HEAD_DIM, BLOCK_D)
    if HAS_FILL:
        cols = tl.arange(0, BLOCK_D)
        fill = tl.load(Fill + cols * stride_f, mask=cols < HEAD_DIM, other=0.0).to(x.dtype)
        x = tl.where((inside & ~real)[:, None], fill[None, :], x)
    return x


@triton.jit
def _unit_rows(x, COSINE: tl.constexpr):
    """With COSINE, the rows of tile ``x`` L2-normalized as ``F.normalize`` does (x / max(|x|, 1e-12)), in x's
    dtype, and the fp32 factor 1 / max(|x|, 1e-12) of each row; else ``x`` and ones."""
    if COSINE:
        xf = x.to(tl.float32)
        rinv = 1.0 / tl.maximum(tl.sqrt(tl.sum(xf * xf, axis=1)), 1e-12)
        x = (xf * rinv[:, None]).to(x.dtype)
    else:
        rinv = tl.full([x.shape[0]], 1.0, tl.float32)
    return x, rinv


@triton.jit
def _unit_rows_grad(dxhat, xhat, rinv, COSINE: tl.constexpr):
    """The gradient of rows x from that of x̂ = x·rinv (:func:`_unit_rows`): ``(dx̂ - x̂·(x̂·dx̂))·rinv``
    (the radial part removed); ``dxhat`` itself without COSINE. Rows of zeros give dx̂·rinv, as
    F.normalize's gradient does below its eps."""
    if COSINE:
        xh = xhat.to(tl.float32)
        dxhat = (dxhat - xh * tl.sum(xh * dxhat, axis=1)[:, None]) * rinv[:, None]
    return dxhat


@triton.jit
def _head_scales(Scale, h, qk_scale, sm_scale, COSINE: tl.constexpr):
    """(qk_scale, sm_scale) of head h: the launch's, or with COSINE the head's Scale[h] (times log2(e))."""
    if COSINE:
        sm_scale = tl.load(Scale + h).to(tl.float32)
        qk_scale = sm_scale * _LOG2E
    return qk_scale, sm_scale


@triton.jit
def _window_scores(a, b, qk_scale, Tb, stride_t, Mg, stride_mi, stride_mj, iq, ik, cq, ck,
                   WH: tl.constexpr, WW: tl.constexpr, SHIFTED: tl.constexpr, HAS_MASK: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Log2-unit scores of a tile: the core's :func:`scores` (keys past the window -inf) plus the relative
    position bias, the shift mask and the optional mask.

    ``a``, ``b`` are the row and column operands ((q, k), or (k, q) for a transposed tile); ``iq``/``ik``
    (window-local indices) and ``cq``/``ck`` (codes from :func:`_tokens`) of the queries and keys
    broadcast to the tile. ``Tb`` points at this head's table entry of relative offset (0, 0): the table
    row of a pair is that plus the difference of their bias coordinates, always inside the table."""
    n = WH * WW
    s = scores(a, b, qk_scale, Tb, Tb, iq, ik, n, n, 0, 0, 0, False, False, False, True, PRECISION)
    bias = tl.load(Tb + ((cq >> 4) - (ck >> 4)) * stride_t)
    s += bias.to(tl.float32) * _LOG2E
    if SHIFTED:
        s = tl.where((cq & 15) == (ck & 15), s, s + _SHIFT_MASK_LOG2)
    if HAS_MASK:
        s = add_bias(s, Mg, iq, ik, n, n, stride_mi, stride_mj)
    return s


@triton.jit
def _table_origin(Table, h, stride_t0, stride_t1, WH: tl.constexpr, WW: tl.constexpr):
    """Pointer to head h's table entry of relative offset (0, 0)."""
    return Table + ((WH - 1) * (2 * WW - 1) + WW - 1) * stride_t0 + h * stride_t1


@triton.jit
def _keys(QKV, Fill, b, h, offs_n, wy, wx, H, W, n_wy, n_wx, sh, sw, heads,
          stride_b, stride_h, stride_w, stride_c, stride_f, WH: tl.constexpr, WW: tl.constexpr,
          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TORCHVISION: tl.constexpr, HAS_FILL: tl.constexpr,
          COSINE: tl.constexpr):
    """Keys (unit rows with COSINE) and values ``offs_n`` of window (b, wy, wx), head h, their map position,
    realness and code, and the keys' :func:`_unit_rows` factors."""
    yk, xk, real_k, ck = _tokens(offs_n, wy, wx, H, W, n_wy, n_wx, sh, sw, WH, WW, TORCHVISION)
    base = QKV + b.to(tl.int64) * stride_b + h * HEAD_DIM * stride_c
    fill = Fill + h * HEAD_DIM * stride_f
    rows = yk * stride_h + xk * stride_w
    C = heads * HEAD_DIM
    inside = offs_n < WH * WW
    k = _load_keys(base + C * stride_c, rows, real_k, inside, fill + C * stride_f, stride_c, stride_f,
                   HEAD_DIM, BLOCK_D, HAS_FILL)
    v = _load_keys(base + 2 * C * stride_c, rows, real_k, inside, fill + 2 * C * stride_f, stride_c, stride_f,
                   HEAD_DIM, BLOCK_D, HAS_FILL)
    k, rinv_k = _unit_rows(k, COSINE)
    return k, v, yk, xk, real_k, ck, rinv_k


@triton.jit
def _query_program(heads, n_wy, n_wx, N: tl.constexpr, BLOCK_M: tl.constexpr):
    """(query rows, head, window number, batch, window row, window column) of this program of a
    (windows, heads, query blocks) grid, query blocks fastest."""
    n_qblocks = (N + BLOCK_M - 1) // BLOCK_M
    pid = tl.program_id(0)
    h = (pid // n_qblocks) % heads
    g = pid // n_qblocks // heads
    b, wy, wx = _window_of(g, n_wy, n_wx)
    return (pid % n_qblocks) * BLOCK_M + tl.arange(0, BLOCK_M), h, g, b, wy, wx


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["H", "W", "n_wy", "n_wx", "sh", "sw", "n_mask"])
def _window_attn_fwd_kernel(
    QKV, Table, Fill, Mask, Scale, Out, Lse,
    H, W, n_wy, n_wx, sh, sw, heads, n_mask, qk_scale,
    stride_b, stride_h, stride_w, stride_c,
    stride_ob, stride_oh, stride_ow, stride_oc,
    stride_t0, stride_t1, stride_f, stride_m0, stride_m1, stride_m2,
    WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, TORCHVISION: tl.constexpr,
    HAS_FILL: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr, PRECISION: tl.constexpr,
):
    N = WH * WW
    offs_m, h, g, b, wy, wx = _query_program(heads, n_wy, n_wx, N, BLOCK_M)
    qk_scale = _head_scales(Scale, h, qk_scale, 1.0, COSINE)[0]
    Tb = _table_origin(Table, h, stride_t0, stride_t1, WH, WW)
    Mg = Mask + (g % n_mask) * stride_m0
    yq, xq, real_q, cq = _tokens(offs_m, wy, wx, H, W, n_wy, n_wx, sh, sw, WH, WW, TORCHVISION)
    # Padding queries are computed with q = 0: their outputs are dropped and their lse never used.
    q = _load_rows(QKV + b.to(tl.int64) * stride_b + h * HEAD_DIM * stride_c, yq * stride_h + xq * stride_w,
                   real_q, stride_c, HEAD_DIM, BLOCK_D)
    q = _unit_rows(q, COSINE)[0]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, _, _, _, ck, _ = _keys(QKV, Fill, b, h, offs_n, wy, wx, H, W, n_wy, n_wx, sh, sw, heads,
                                     stride_b, stride_h, stride_w, stride_c, stride_f, WH, WW, HEAD_DIM, BLOCK_D,
                                     TORCHVISION, HAS_FILL, COSINE)
        s = _window_scores(q, k, qk_scale, Tb, stride_t0, Mg, stride_m1, stride_m2, offs_m[:, None],
                           offs_n[None, :], cq[:, None], ck[None, :], WH, WW, SHIFTED, HAS_MASK,
                           PRECISION)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PRECISION)
    out, lse = finish_rows(acc, m_i, l_i)
    _store_rows(Out + b.to(tl.int64) * stride_ob + h * HEAD_DIM * stride_oc, yq * stride_oh + xq * stride_ow,
                real_q, stride_oc, out, HEAD_DIM, BLOCK_D)
    tl.store(Lse + (g.to(tl.int64) * heads + h) * N + offs_m, lse, mask=offs_m < N)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _queries(QKV, Out, DO, Lse, b, g, h, offs_q, wy, wx, H, W, n_wy, n_wx, sh, sw, heads,
             stride_b, stride_h, stride_w, stride_c, stride_ob, stride_oh, stride_ow, stride_oc,
             stride_gb, stride_gh, stride_gw, stride_gc,
             WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             TORCHVISION: tl.constexpr, COSINE: tl.constexpr):
    """What the backward needs of the queries ``offs_q`` of window g, head h: q (unit rows with COSINE), dO,
    lse (log2 units), delta = rowsum(dO·O), their map position, realness and code, and q's
    :func:`_unit_rows` factors.

    Padding queries have no output, so no gradient reaches them: their lse is +inf, making their
    probabilities, and everything they would add, exactly 0."""
    yq, xq, real_q, cq = _tokens(offs_q, wy, wx, H, W, n_wy, n_wx, sh, sw, WH, WW, TORCHVISION)
    b64 = b.to(tl.int64)
    q = _load_rows(QKV + b64 * stride_b + h * HEAD_DIM * stride_c, yq * stride_h + xq * stride_w, real_q,
                   stride_c, HEAD_DIM, BLOCK_D)
    q, rinv_q = _unit_rows(q, COSINE)
    do = _load_rows(DO + b64 * stride_gb + h * HEAD_DIM * stride_gc, yq * stride_gh + xq * stride_gw, real_q,
                    stride_gc, HEAD_DIM, BLOCK_D)
    o = _load_rows(Out + b64 * stride_ob + h * HEAD_DIM * stride_oc, yq * stride_oh + xq * stride_ow, real_q,
                   stride_oc, HEAD_DIM, BLOCK_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    lse2 = lse_log2(Lse + (g.to(tl.int64) * heads + h) * (WH * WW), offs_q, WH * WW)
    lse2 = tl.where(real_q, lse2, float("inf"))
    return q, do, lse2, delta, yq, xq, real_q, cq, rinv_q


@triton.jit(do_not_specialize=["H", "W", "n_wy", "n_wx", "sh", "sw", "n_mask", "n_windows", "per_group"])
def _window_attn_bwd_kernel(
    QKV, Table, Fill, Mask, Scale, Out, DO, Lse, DQKV, DBias, DFill, DScale,
    H, W, n_wy, n_wx, sh, sw, heads, n_mask, n_windows, per_group, qk_scale, sm_scale,
    stride_b, stride_h, stride_w, stride_c,
    stride_ob, stride_oh, stride_ow, stride_oc,
    stride_gb, stride_gh, stride_gw, stride_gc,
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_t0, stride_t1, stride_f, stride_m0, stride_m1, stride_m2,
    WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, SHIFTED: tl.constexpr, TORCHVISION: tl.constexpr,
    HAS_FILL: tl.constexpr, HAS_MASK: tl.constexpr, FUSE_DQ: tl.constexpr, TABLE_GRAD: tl.constexpr,
    FILL_GRAD: tl.constexpr, STAGES: tl.constexpr, COSINE: tl.constexpr, PRECISION: tl.constexpr,
):
    # Tiles are (all queries of the window) x (this program's keys); the program walks windows
    # g0 .. g0 + per_group - 1 in order, so its partial sums are deterministic.
    N = WH * WW
    n_kblocks = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    kb = pid % n_kblocks
    h = (pid // n_kblocks) % heads
    grp = pid // n_kblocks // heads
    C = heads * HEAD_DIM
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_Q)
    Tb = _table_origin(Table, h, stride_t0, stride_t1, WH, WW)
    qk_scale, sm_scale = _head_scales(Scale, h, qk_scale, sm_scale, COSINE)
    dbias = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_N], dtype=tl.float32)
    fill_dk = tl.zeros([BLOCK_D], dtype=tl.float32)
    fill_dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    g0 = grp * per_group  # window numbers stay 32-bit (index math in 64 bits costs registers)
    for i in tl.range(0, tl.minimum(per_group, n_windows - g0), num_stages=STAGES):
        g = g0 + i
        b, wy, wx = _window_of(g, n_wy, n_wx)
        q, do, lse2, delta, yq, xq, real_q, cq, rinv_q = _queries(
            QKV, Out, DO, Lse, b, g, h, offs_q, wy, wx, H, W, n_wy, n_wx, sh, sw, heads,
            stride_b, stride_h, stride_w, stride_c, stride_ob, stride_oh, stride_ow, stride_oc,
            stride_gb, stride_gh, stride_gw, stride_gc, WH, WW, HEAD_DIM, BLOCK_D, TORCHVISION, COSINE)
        k, v, yk, xk, real_k, ck, rinv_k = _keys(QKV, Fill, b, h, offs_n, wy, wx, H, W, n_wy, n_wx, sh, sw,
                                                 heads, stride_b, stride_h, stride_w, stride_c, stride_f, WH, WW,
                                                 HEAD_DIM, BLOCK_D, TORCHVISION, HAS_FILL, COSINE)
        Mg = Mask + (g % n_mask) * stride_m0
        s = _window_scores(q, k, qk_scale, Tb, stride_t0, Mg, stride_m1, stride_m2, offs_q[:, None],
                           offs_n[None, :], cq[:, None], ck[None, :], WH, WW, SHIFTED, HAS_MASK,
                           PRECISION)
        p, ds = softmax_bwd(s, lse2[:, None], tl.dot(do, tl.trans(v), input_precision=PRECISION), delta[:, None])
        dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        if COSINE:  # d(scale) = Σ dS·(q̂·k̂) = Σ_j k̂_j·(dSᵀq̂)_j
            dscale += tl.sum(k.to(tl.float32) * dk, axis=1)
        dk = _unit_rows_grad(dk * sm_scale, k, rinv_k, COSINE)
        out = DQKV + b.to(tl.int64) * stride_xb + h * HEAD_DIM * stride_xc
        rows = yk * stride_xh + xk * stride_xw
        _store_rows(out + C * stride_xc, rows, real_k, stride_xc, dk, HEAD_DIM, BLOCK_D)
        _store_rows(out + 2 * C * stride_xc, rows, real_k, stride_xc, dv, HEAD_DIM, BLOCK_D)
        if FUSE_DQ:  # this block holds every key of the window: dQ = dS·K is complete
            dq = _unit_rows_grad(tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale, q, rinv_q, COSINE)
            _store_rows(out, yq * stride_xh + xq * stride_xw, real_q, stride_xc, dq, HEAD_DIM, BLOCK_D)
        if FILL_GRAD:  # padding keys and values are the qkv bias: their gradients go to it
            pad = ((offs_n < N) & ~real_k)[:, None]
            fill_dk += tl.sum(tl.where(pad, dk, 0.0), axis=0)
            fill_dv += tl.sum(tl.where(pad, dv, 0.0), axis=0)
        if TABLE_GRAD:
            dbias += ds
    if TABLE_GRAD:  # DBias: (groups, heads, N, N) partials, [query, key]
        mask = (offs_q[:, None] < N) & (offs_n[None, :] < N)
        DBs = DBias + (grp.to(tl.int64) * heads + h) * N * N
        tl.store(DBs + offs_q[:, None] * N + offs_n[None, :], dbias, mask=mask)
    if FILL_GRAD:  # DFill: (groups, heads, key blocks, 2, HEAD_DIM) partials
        part = DFill + ((grp.to(tl.int64) * heads + h) * n_kblocks + kb) * 2 * HEAD_DIM
        cols = tl.arange(0, BLOCK_D)
        tl.store(part + cols, fill_dk, mask=cols < HEAD_DIM)
        tl.store(part + HEAD_DIM + cols, fill_dv, mask=cols < HEAD_DIM)
    if COSINE:  # DScale: (groups, heads, key blocks) partials
        tl.store(DScale + (grp.to(tl.int64) * heads + h) * n_kblocks + kb, tl.sum(dscale))


@triton.jit(do_not_specialize=["H", "W", "n_wy", "n_wx", "sh", "sw", "n_mask"])
def _window_attn_bwd_dq_kernel(
    QKV, Table, Fill, Mask, Scale, Out, DO, Lse, DQKV,
    H, W, n_wy, n_wx, sh, sw, heads, n_mask, qk_scale, sm_scale,
    stride_b, stride_h, stride_w, stride_c,
    stride_ob, stride_oh, stride_ow, stride_oc,
    stride_gb, stride_gh, stride_gw, stride_gc,
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_t0, stride_t1, stride_f, stride_m0, stride_m1, stride_m2,
    WH: tl.constexpr, WW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SHIFTED: tl.constexpr, TORCHVISION: tl.constexpr,
    HAS_FILL: tl.constexpr, HAS_MASK: tl.constexpr, COSINE: tl.constexpr, PRECISION: tl.constexpr,
):
    # dQ of one query block of one window and head, walking the window's key blocks.
    N = WH * WW
    offs_m, h, g, b, wy, wx = _query_program(heads, n_wy, n_wx, N, BLOCK_M)
    q, do, lse2, delta, yq, xq, real_q, cq, rinv_q = _queries(
        QKV, Out, DO, Lse, b, g, h, offs_m, wy, wx, H, W, n_wy, n_wx, sh, sw, heads,
        stride_b, stride_h, stride_w, stride_c, stride_ob, stride_oh, stride_ow, stride_oc,
        stride_gb, stride_gh, stride_gw, stride_gc, WH, WW, HEAD_DIM, BLOCK_D, TORCHVISION, COSINE)
    Tb = _table_origin(Table, h, stride_t0, stride_t1, WH, WW)
    qk_scale, sm_scale = _head_scales(Scale, h, qk_scale, sm_scale, COSINE)
    Mg = Mask + (g % n_mask) * stride_m0
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, _, _, _, ck, _ = _keys(QKV, Fill, b, h, offs_n, wy, wx, H, W, n_wy, n_wx, sh, sw, heads,
                                     stride_b, stride_h, stride_w, stride_c, stride_f, WH, WW, HEAD_DIM, BLOCK_D,
                                     TORCHVISION, HAS_FILL, COSINE)
        s = _window_scores(q, k, qk_scale, Tb, stride_t0, Mg, stride_m1, stride_m2, offs_m[:, None],
                           offs_n[None, :], cq[:, None], ck[None, :], WH, WW, SHIFTED, HAS_MASK,
                           PRECISION)
        _, ds = softmax_bwd(s, lse2[:, None], tl.dot(do, tl.trans(v), input_precision=PRECISION), delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_rows(DQKV + b.to(tl.int64) * stride_xb + h * HEAD_DIM * stride_xc, yq * stride_xh + xq * stride_xw,
                real_q, stride_xc, _unit_rows_grad(dq * sm_scale, q, rinv_q, COSINE), HEAD_DIM, BLOCK_D)


@triton.jit
def _table_grad_kernel(DBias, DTable, heads, stride_t0, stride_t1,
                       WH: tl.constexpr, WW: tl.constexpr, BLOCK_Q: tl.constexpr):
    # Table entry t of head h is relative offset (dy, dx): the sum of the bias gradient over the pairs
    # (query i, key j = i - (dy, dx)) inside the window. DBias is (heads, N, N), [query, key].
    N = WH * WW
    pid = tl.program_id(0)
    h = pid % heads
    t = pid // heads
    dy = t // (2 * WW - 1) - (WH - 1)
    dx = t % (2 * WW - 1) - (WW - 1)
    i = tl.arange(0, BLOCK_Q)
    jy = i // WW - dy
    jx = i % WW - dx
    ok = (i < N) & (jy >= 0) & (jy < WH) & (jx >= 0) & (jx < WW)
    d = tl.load(DBias + h * N * N + i * N + jy * WW + jx, mask=ok, other=0.0)
    tl.store(DTable + t * stride_t0 + h * stride_t1, tl.sum(d, axis=0).to(DTable.dtype.element_ty))


# --------------------------------------------------------------------------------------------------
# Launch configurations and launchers
# --------------------------------------------------------------------------------------------------


# Software pipelining depth of the backward's window loop (the next window's loads in flight): 2 keeps every
# covered config within the H100's 227 KiB of shared memory per block (3 does not).
BWD_STAGES = 2


def block_q(tokens: int) -> int:
    """A window's token count padded to a power of two (>= 16, the smallest tl.dot size), as head dims are."""
    return block_d(tokens)


def _hopper(kind: str, n: int) -> tuple[int, int, int, int]:
    if kind == "fwd":
        return (n, n, 4, 3) if n <= 64 else (64, 64, 8, 3)
    if kind == "bwd":
        return (n, n, 8 if n == 64 else 4, BWD_STAGES) if n <= 64 else (n, 16, 8, BWD_STAGES)
    return 64, 64, 8, 3


# Per architecture family (fusedtx.kernels.support.arch_family): the configs that differ from Hopper's rule,
# (kind, padded window, padded head dim, fp32?) -> (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen so that the
# builds for every target of the family fit its shared memory and spill only where no compiled alternative
# avoids it (python -m fusedtx.bench.resources window_attention; bench/results/resources-sm_*.md).
_OVERRIDES: dict[str, dict[tuple[str, int, int, bool], tuple[int, int, int, int]]] = {
    "hopper": {},
    "blackwell": {},
    "ampere": {},
    "blackwell_consumer": {},
}
# Ampere/Ada and Blackwell consumer (99 KiB, mma.sync): half the key blocks for large windows and float32, fewer
# stages; float32 windows up to 64 tokens at head dim 64 split the backward's keys (dQ from its own kernel).
for _n in (64, 128, 256):
    for _d in (32, 64):
        for _fp32 in (False, True):
            _big = _n > 64 or _fp32
            _OVERRIDES["ampere"][("fwd", _n, _d, _fp32)] = (64, 32, 8, 2) if _big else (_n, _n, 4, 2)
            _OVERRIDES["ampere"][("dq", _n, _d, _fp32)] = (64, 32, 8, 2)
            _OVERRIDES["ampere"][("bwd", _n, _d, _fp32)] = ((_n, 16, 8, 1) if _n > 64 else
                                                            (_n, 32, 8, 1) if _fp32 else (_n, _n, 8, 1))
# 64-token windows: the fused-dQ backward (one 64x64 key block) spills where the resource sweep compiled a
# spill-free 64x32 one (whose dQ comes from the dq kernel), or a single-stage 64x64 one (Blackwell, 16-bit).
for _d in (32, 64):
    _OVERRIDES["ampere"][("bwd", 64, _d, False)] = (64, 32, 8, 1)
    _OVERRIDES["hopper"][("bwd", 64, _d, False)] = (64, 32, 8, BWD_STAGES)
    _OVERRIDES["hopper"][("bwd", 64, _d, True)] = (64, 16, 8, BWD_STAGES)
    _OVERRIDES["blackwell"][("bwd", 64, _d, True)] = (64, 32, 8, 1)
    _OVERRIDES["blackwell"][("bwd", 256, _d, False)] = (256, 16, 8, 1)
_OVERRIDES["blackwell"][("bwd", 64, 32, False)] = (64, 64, 8, 1)
_OVERRIDES["blackwell"][("bwd", 64, 64, False)] = (64, 32, 8, 1)
_OVERRIDES["blackwell"][("bwd", 256, 32, True)] = (256, 16, 8, 1)
_OVERRIDES["ampere"][("dq", 64, 32, True)] = (64, 64, 8, 3)
_OVERRIDES["blackwell_consumer"] = dict(_OVERRIDES["ampere"])
_OVERRIDES["blackwell_consumer"][("bwd", 64, 64, True)] = (64, 16, 8, 1)
_OVERRIDES["blackwell_consumer"][("dq", 64, 64, False)] = (64, 32, 8, 1)
_OVERRIDES["blackwell_consumer"][("dq", 256, 32, False)] = (64, 32, 4, 2)  # the cosine variant spills at 8 warps


# float32 with TF32 off ("ieee", PyTorch's default): the dots are FMA loops, without tensor cores, whose fragments
# take more registers. (kind, padded window, padded head dim) -> the config where it differs from the tf32 one:
# the tf32 tile (fewer stages or other warps allowed) where it compiled without a spill for every target of the
# family, at both windows of the padded size and in Swin V2's cosine variant (head dim 32), else the largest
# smaller tile that did (python -m fusedtx.bench.resources window_attention, the "fp32 ieee" rows). None did
# for the backward of 256-query tiles, nor on Ampere/Ada for 64-token windows at head dim 64: those keep their
# tf32 config and are listed as spilling.
_IEEE_OVERRIDES: dict[str, dict[tuple[str, int, int], tuple[int, int, int, int]]] = {
    "ampere": {("fwd", 64, 64): (32, 64, 8, 2), ("fwd", 256, 64): (16, 128, 8, 1), ("bwd", 64, 32): (64, 16, 8, 1),
               ("dq", 64, 64): (32, 64, 8, 2)},
    "hopper": {("fwd", 64, 32): (64, 64, 8, 3), ("fwd", 64, 64): (64, 32, 8, 1), ("fwd", 256, 32): (64, 64, 8, 1),
               ("fwd", 256, 64): (128, 16, 8, 1), ("bwd", 64, 64): (64, 16, 4, 1), ("dq", 64, 32): (64, 32, 8, 3),
               ("dq", 64, 64): (32, 64, 8, 3), ("dq", 256, 32): (64, 64, 8, 1)},
    "blackwell": {("fwd", 64, 32): (64, 64, 8, 3), ("fwd", 64, 64): (64, 32, 8, 1), ("fwd", 256, 32): (64, 64, 8, 1),
                  ("fwd", 256, 64): (128, 16, 8, 1), ("bwd", 64, 32): (64, 16, 8, 1), ("bwd", 64, 64): (64, 16, 4, 1),
                  ("dq", 64, 64): (32, 64, 8, 3), ("dq", 256, 32): (64, 64, 8, 1)},
    "blackwell_consumer": {("fwd", 64, 64): (64, 32, 8, 1), ("fwd", 256, 64): (64, 32, 8, 1),
                           ("bwd", 64, 32): (64, 16, 8, 1), ("bwd", 64, 64): (64, 16, 4, 1),
                           ("dq", 64, 64): (32, 64, 8, 2)},
}


# With an attention mask (HAS_MASK: Hugging Face's Swin and Swin V2, torchvision's partitioned windows) every score
# tile adds a tile loaded from the mask, whose addresses and values take registers. (kind, padded window, padded
# head dim, dots: "16-bit", "tf32" or "ieee", :func:`_dots`) -> the config of a masked launch where it differs from
# the unmasked one; found as the ieee table was (python -m fusedtx.bench.resources window_attention, the "+mask"
# rows, head dim 32, Swin's; other head dims take the unmasked configs): the unmasked tile with fewer stages or the
# other warp count where that compiled without a spill for every target of the family, at both windows of the
# padded size and in Swin V2's cosine variant, else the largest smaller tile that did. None did for the backward's
# 256-query tile, which is the whole window and whose key block is already the smallest: masked, it keeps the
# unmasked config and is listed as spilling where the unmasked build spills, and also for 12x12 windows on Hopper
# (16-bit Swin V2, tf32) and Blackwell (tf32).
_MASK_OVERRIDES: dict[str, dict[tuple[str, int, int, str], tuple[int, int, int, int]]] = {
    "ampere": {("bwd", 64, 32, "16-bit"): (64, 16, 8, 1), ("dq", 256, 32, "16-bit"): (64, 32, 8, 1),
               ("fwd", 64, 32, "ieee"): (64, 32, 4, 1), ("fwd", 256, 32, "ieee"): (64, 16, 8, 2),
               ("dq", 256, 32, "ieee"): (64, 16, 8, 2)},
    "hopper": {("bwd", 64, 32, "16-bit"): (64, 32, 4, 2), ("fwd", 256, 32, "ieee"): (64, 64, 4, 1)},
    "blackwell": {("bwd", 64, 32, "16-bit"): (64, 32, 4, 1)},  # dQ then from the dq kernel
    "blackwell_consumer": {("bwd", 64, 32, "16-bit"): (64, 16, 8, 1), ("fwd", 64, 32, "ieee"): (64, 32, 8, 1),
                           ("fwd", 256, 32, "ieee"): (64, 16, 8, 2)},
}


def _dots(dtype: torch.dtype, precision: str | None = None) -> str:
    """How a launch's dots run, as :data:`_MASK_OVERRIDES` names them: "ieee" (full float32), "tf32" (float32
    with TF32) or "16-bit"."""
    return "ieee" if full_float32(dtype, precision) else "tf32" if dtype == torch.float32 else "16-bit"


def configs(kind: str, tokens: int, head_dim: int = 32, dtype: torch.dtype = torch.float16,
            family: str | None = None, precision: str | None = None,
            has_mask: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ``kind`` ("fwd", "bwd", "dq") for windows of
    ``tokens`` at ``head_dim`` in ``dtype`` on architecture ``family`` (default: the interpreter's configs when
    it runs, else the current CUDA device's family). ``precision``: the dot precision of float32 operands,
    "tf32" or "ieee" (default: what a launch now takes, :func:`~fusedtx.kernels.support.dot_precision`).
    ``has_mask``: the launch adds an attention mask (``HAS_MASK``), whose builds take more registers and have
    their own configs where they differ (:data:`_MASK_OVERRIDES`).

    The "bwd" kernel's query tile is always the whole window (BLOCK_M = block_q(tokens)); with one key
    block (BLOCK_N >= the padded window: unmasked 64-token windows in 16-bit on Blackwell) it computes dQ too and
    "dq" is not launched. The interpreter
    runs small blocks, so windows of 49 tokens there take the multi-block paths (dq kernel included).
    Not yet tuned on a GPU."""
    n = block_q(tokens)
    if family is None:
        if interpreter_enabled():
            return {"fwd": (min(n, 32), min(n, 16), 1, 1), "bwd": (n, 16, 1, 1), "dq": (min(n, 32), 16, 1, 1)}[kind]
        family = device_family(torch.device("cuda"))
    key = (kind, n, block_d(head_dim), dtype == torch.float32)
    masked = _MASK_OVERRIDES[family].get((*key[:3], _dots(dtype, precision))) if has_mask else None
    ieee = _IEEE_OVERRIDES[family].get(key[:3]) if full_float32(dtype, precision) else None
    return masked or ieee or _OVERRIDES[family].get(key) or _hopper(kind, n)


def candidates(kind: str, tokens: int, head_dim: int, dtype: torch.dtype, family: str | None = None,
               precision: str | None = None, has_mask: bool = False) -> list[tuple[int, int, int, int]]:
    """A short list of configs worth timing for ``kind`` (the chosen one first): the other families' choices,
    half the key block (the backward's query tile is the whole window), fewer warps, fewer stages. The resource
    check compiles them for a config that spills; ``fusedtx tune`` would time the ones that fit."""
    chosen = configs(kind, tokens, head_dim, dtype, family, precision, has_mask)
    bm, bn, warps, stages = chosen
    out = [chosen]
    for other in _OVERRIDES:
        c = configs(kind, tokens, head_dim, dtype, other, precision, has_mask)
        if c not in out:
            out.append(c)
    tries = [(bm, bn // 2, warps, stages), (bm, bn, 4 if warps == 8 else 8, stages), (bm, bn, warps, 1)]
    if kind != "bwd":
        tries.append((bm // 2, bn, warps, stages))
    for c in tries:
        if min(c[:2]) >= 16 and c not in out:
            out.append(c)
    return out


def _tuning(kind: str, qkv: torch.Tensor, tokens: int, head_dim: int, has_mask: bool = False) -> Tuning:
    """What ``fusedtx tune`` (``FUSEDTX_TUNE=1``) may time for a launch on ``qkv``: the key of its tuned config
    (kernel, padded window, padded head dim, dtype, mask) and the candidates for the device's architecture
    family."""
    family = None if interpreter_enabled() else device_family(qkv.device)
    key = (f"window_attention|{kind}|n{block_q(tokens)}|d{block_d(head_dim)}|{dtype_tag(qkv.dtype)}|"
           f"mask{int(has_mask)}")
    return Tuning(qkv.device, key, tuple(candidates(kind, tokens, head_dim, qkv.dtype, family, has_mask=has_mask)))


def _launch_config(kind: str, qkv: torch.Tensor, tokens: int, head_dim: int, has_mask: bool = False,
                   tuning: Tuning | None = None) -> tuple[int, int, int, int]:
    """The config a launch on ``qkv``'s device starts from: its tuned one (``fusedtx tune``), else the table's.
    ``tuning``: the launch's :func:`_tuning`, where the caller has it already."""
    family = None if interpreter_enabled() else device_family(qkv.device)
    default = configs(kind, tokens, head_dim, qkv.dtype, family, has_mask=has_mask)
    key = (tuning or _tuning(kind, qkv, tokens, head_dim, has_mask)).key
    return tuned_or(qkv.device, key, default)


def _groups(device: torch.device, windows: int, per_window_programs: int) -> tuple[int, int]:
    """(groups, windows per group) for the backward: a few programs per SM, each walking its windows."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 3 * per_window_programs  # interpreter: a few groups, each of several windows
    groups = max(1, min(windows, triton.cdiv(target, per_window_programs)))
    per_group = triton.cdiv(windows, groups)
    return triton.cdiv(windows, per_group), per_group


def _common_args(qkv, table, qkv_bias, mask, cosine_scale, window_size, shift_size, num_heads, order):
    """(pointer stand-ins, geometry and stride arguments, constexprs) shared by every window kernel."""
    bsz, h, w, _ = qkv.shape
    (wh, ww), (sh, sw) = window_size, shift_size
    head_dim = qkv.shape[3] // (3 * num_heads)
    n_wy, n_wx = triton.cdiv(h, wh), triton.cdiv(w, ww)
    n_mask = mask.shape[0] if mask is not None else 1
    fill_stride = qkv_bias.stride(0) if qkv_bias is not None else 0
    mask_strides = mask.stride() if mask is not None else (0, 0, 0)
    cosine_scale = cosine_scale.contiguous() if cosine_scale is not None else None  # read as Scale + h
    ptrs = tuple(t if t is not None else table for t in (table, qkv_bias, mask, cosine_scale))
    geometry = (h, w, n_wy, n_wx, sh, sw, num_heads, n_mask)
    tail = (*table.stride(), fill_stride, *mask_strides)
    consts = dict(WH=wh, WW=ww, HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), SHIFTED=bool(sh or sw),
                  TORCHVISION=order == "torchvision",
                  HAS_FILL=qkv_bias is not None and bool(h % wh or w % ww),  # only padding tokens hold the bias
                  HAS_MASK=mask is not None, COSINE=cosine_scale is not None,
                  PRECISION=dot_precision(qkv.dtype))
    return ptrs, geometry, tail, consts, bsz * n_wy * n_wx


def window_attention_fwd(qkv, table, qkv_bias, mask, window_size, shift_size, num_heads, scale, order,
                         cosine_scale=None):
    """Forward. ``qkv`` (B, H, W, 3·C) any strides, ``table`` ((2wh-1)(2ww-1), heads), ``qkv_bias`` (3·C,)
    or None, ``mask`` (M, N, N) or None; ``shift_size`` is the effective shift. ``cosine_scale`` (heads,) or
    None: Swin V2's cosine attention, q and k L2-normalized and head h's logits times ``cosine_scale[h]``
    (``scale`` unused). Returns out (B, H, W, C) in qkv's dtype and lse (B·windows, heads, N) fp32."""
    bsz, h, w, c3 = qkv.shape
    tokens = window_size[0] * window_size[1]
    out = torch.empty((bsz, h, w, c3 // 3), dtype=qkv.dtype, device=qkv.device)
    ptrs, geometry, tail, consts, windows = _common_args(qkv, table, qkv_bias, mask, cosine_scale, window_size,
                                                         shift_size, num_heads, order)
    lse = torch.empty((windows, num_heads, tokens), dtype=torch.float32, device=qkv.device)
    if out.numel() == 0:
        return out, lse
    head_dim = c3 // (3 * num_heads)

    def run(config):
        block_m, block_n, warps, stages = config
        grid = (windows * num_heads * triton.cdiv(tokens, block_m),)
        _window_attn_fwd_kernel[grid](
            qkv, *ptrs, out, lse, *geometry, scale * LOG2E, *qkv.stride(), *out.stride(), *tail,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **consts,
        )

    has_mask = mask is not None
    tuning = _tuning("fwd", qkv, tokens, head_dim, has_mask)
    launch("window_attention fwd", (tokens, head_dim, dtype_tag(qkv.dtype), has_mask),
           _launch_config("fwd", qkv, tokens, head_dim, has_mask, tuning), run, tuning=tuning)
    return out, lse


def window_attention_bwd(dout, qkv, table, qkv_bias, mask, out, lse, window_size, shift_size, num_heads,
                         scale, order, table_grad, bias_grad, cosine_scale=None):
    """Backward of :func:`window_attention_fwd` (``out``, ``lse`` are what it returned, ``dout`` the
    gradient of out, any strides). Returns dqkv (B, H, W, 3·C) in qkv's dtype, d(table) and d(qkv_bias)
    in their dtypes when asked for (else None; d(qkv_bias) is what the padding tokens give, zero for q), and
    d(cosine_scale) in its dtype (None without it)."""
    bsz, h, w, c3 = qkv.shape
    tokens = window_size[0] * window_size[1]
    head_dim = c3 // (3 * num_heads)
    dqkv = torch.empty((bsz, h, w, c3), dtype=qkv.dtype, device=qkv.device)
    ptrs, geometry, tail, consts, windows = _common_args(qkv, table, qkv_bias, mask, cosine_scale, window_size,
                                                         shift_size, num_heads, order)
    bias_grad = bias_grad and qkv_bias is not None
    fill_grad = bias_grad and consts["HAS_FILL"]  # without padding the bias gets no gradient here: zeros
    if windows == 0:
        dtable = torch.zeros_like(table) if table_grad else None
        dscale = torch.zeros_like(cosine_scale) if cosine_scale is not None else None
        return dqkv, dtable, (torch.zeros_like(qkv_bias) if bias_grad else None), dscale
    strides = (*qkv.stride(), *out.stride(), *dout.stride(), *dqkv.stride())
    has_mask = mask is not None
    key = (tokens, head_dim, dtype_tag(qkv.dtype), has_mask)

    def run(config):  # the key blocks decide the partial sums' shapes and whether dQ is fused
        bq, block_n, warps, stages = config
        n_kblocks = triton.cdiv(tokens, block_n)
        groups, per_group = _groups(qkv.device, windows, num_heads * n_kblocks)
        dbias = torch.empty((groups, num_heads, tokens, tokens) if table_grad else (1,), dtype=torch.float32,
                            device=qkv.device)
        dfill = torch.empty((groups, num_heads, n_kblocks, 2, head_dim) if fill_grad else (1,),
                            dtype=torch.float32, device=qkv.device)
        dscales = torch.empty((groups, num_heads, n_kblocks) if cosine_scale is not None else (1,), dtype=torch.float32,
                              device=qkv.device)
        _window_attn_bwd_kernel[(groups * num_heads * n_kblocks,)](
            qkv, *ptrs, out, dout, lse, dqkv, dbias, dfill, dscales, *geometry, windows, per_group, scale * LOG2E,
            scale, *strides, *tail, BLOCK_N=block_n, BLOCK_Q=bq, FUSE_DQ=n_kblocks == 1, TABLE_GRAD=table_grad,
            FILL_GRAD=fill_grad, STAGES=stages, num_warps=warps, num_stages=stages, **consts,
        )
        return bq, n_kblocks, dbias, dfill, dscales

    tuning = _tuning("bwd", qkv, tokens, head_dim, has_mask)
    bq, n_kblocks, dbias, dfill, dscales = launch("window_attention bwd", key,
                                                  _launch_config("bwd", qkv, tokens, head_dim, has_mask, tuning), run,
                                                  fixed_m=True, tuning=tuning)
    if n_kblocks > 1:
        def run_dq(config):
            block_m, block_n, warps, stages = config
            _window_attn_bwd_dq_kernel[(windows * num_heads * triton.cdiv(tokens, block_m),)](
                qkv, *ptrs, out, dout, lse, dqkv, *geometry, scale * LOG2E, scale, *strides, *tail,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **consts,
            )

        tuning = _tuning("dq", qkv, tokens, head_dim, has_mask)
        launch("window_attention dq", key, _launch_config("dq", qkv, tokens, head_dim, has_mask, tuning), run_dq,
               tuning=tuning)
    dtable = None
    if table_grad:
        dtable = table.new_empty(table.shape)
        _table_grad_kernel[(table.shape[0] * num_heads,)](
            dbias.sum(0), dtable, num_heads, *dtable.stride(), WH=window_size[0], WW=window_size[1],
            BLOCK_Q=bq,
        )
    dqkv_bias = torch.zeros_like(qkv_bias) if bias_grad else None
    if fill_grad:  # (heads, 2, head_dim) -> [0 for q | dk of padding | dv of padding]
        kv = dfill.sum((0, 2)).transpose(0, 1).reshape(2 * num_heads * head_dim)
        dqkv_bias = torch.cat([torch.zeros_like(kv[: c3 // 3]), kv]).to(qkv_bias.dtype)
    dscale = dscales.sum((0, 2)).to(cosine_scale.dtype) if cosine_scale is not None else None
    return dqkv, dtable, dqkv_bias, dscale
