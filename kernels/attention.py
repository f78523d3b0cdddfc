"""Triton flash attention: softmax(q·kᵀ·scale + bias, masked)·v, forward and backward, O(N) memory.

Tensors are (batch, heads, seq, head_dim) with any strides; Nq may differ from Nk. Everything is
computed in fp32 (fp16/bf16 operands feed the tensor cores). fp32 dots follow PyTorch's matmul switch
(``torch.backends.cuda.matmul.allow_tf32``: tf32 when on, ieee when off), read at launch into the
``PRECISION`` constexpr of every kernel (:func:`fusedtx.kernels.support.dot_precision`).

Forward (one program per (batch·head, query block), a 1-D grid so batch·heads is not capped at
65,535): a query block stays in registers while the program walks the key/value blocks once,
keeping the running row max ``m``, row sum ``l`` and the unnormalised output ``acc`` (online
softmax). Scores are kept in log2 units (scale·log2(e) folded into one multiply, ``exp2``). The
log-sum-exp per row (natural log, fp32, (B, H, Nq)) is saved for the backward pass.

Backward, deterministic and without atomics:

* ``_attn_bwd_delta_kernel``: delta = rowsum(dO·O) per query row;
* ``_attn_bwd_dkdv_kernel``: one program per (batch·head, key block) walks the query blocks and
  accumulates dK and dV;
* ``_attn_bwd_dq_kernel``: one program per (batch·head, query block) walks the key blocks for dQ;
* ``_attn_bwd_dbias_kernel`` (only when the bias needs a gradient): one program per tile of the
  bias's own (unbroadcast) shape recomputes dS = P·(dP − delta) for every (batch, head) the tile is
  broadcast over, in a fixed order, and sums them in registers (and over the query rows when the
  bias is broadcast along queries). It costs two extra score-sized matmuls but no memory beyond the
  dbias output. A bias broadcast along keys has a zero gradient (softmax is shift-invariant); the
  launcher returns zeros without a kernel.

Masking: ``causal`` is top-left aligned as in ``F.scaled_dot_product_attention`` (query i sees keys
j <= i); ``key_padding_mask`` (B, Nk) is True for keys to ignore; a bias of -inf masks too. Rows
with no allowed key give zero output, lse = -inf, and zero gradients. Key blocks that need no mask
(left of the causal diagonal, inside Nk) run a loop without any masking work; only the diagonal and
the tail block pay for it.

Compiled variants: sequence lengths and block counts are runtime ints that Triton does not
specialise, and the block sizes depend only on the padded head dim (64 / 128 / 256 buckets), the dtype
(float32 with its dot precision) and whether a bias is read (:func:`configs`). So 197 and 4096 tokens
run the same compiled kernel; the one length-dependent specialisation left is Triton's 16-alignment of
strides, which a (1, H, N, N) bias's row stride N can flip: at most two variants of each bias-reading
kernel.

The per-block pieces (``scores``, ``online_softmax_step``, ``finish_rows``, ``lse_log2``,
``softmax_bwd``) are the online-softmax core in :mod:`fusedtx.kernels.softmax_core`, which window
attention shares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .softmax_core import (
    LOG2E,
    block_d,
    finish_rows,
    lse_log2,
    online_softmax_step,
    scores,
    softmax_bwd,
)
from .support import dot_precision, dtype_tag, empty_bnhd, full_float32, interpreter_enabled
from .tuning import Tuning, device_family, launch, tuned_or

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _slice(ptr, b, h, stride_b, stride_h):
    """Pointer to the (b, h) slice; 64-bit so that large batches do not overflow."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _load_rows(ptr, rows, n, stride_n, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``rows`` of a (n, HEAD_DIM) slice as a (len(rows), BLOCK_D) tile, zero outside."""
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n) & (cols[None, :] < HEAD_DIM)
    return tl.load(ptr + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, rows, n, stride_n, stride_d, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n) & (cols[None, :] < HEAD_DIM)
    tl.store(ptr + rows[:, None] * stride_n + cols[None, :] * stride_d, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_range(m0, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """For the query block starting at m0: keys [0, full) need no mask, keys [full, hi) do."""
    full = (Nk // BLOCK_N) * BLOCK_N
    hi = Nk
    if CAUSAL:
        # A key block is unmasked when its last key <= the block's first query m0.
        full = tl.minimum(full, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Nk, m0 + BLOCK_M)
    return full, hi


@triton.jit
def _split_pid(pid, n_blocks, H, REVERSE: tl.constexpr):
    """(batch, head, block) of a program of the 1-D grid batch·heads·blocks; blocks in reverse order
    (the longest causal rows first) when REVERSE."""
    blk = pid % n_blocks
    if REVERSE:
        blk = n_blocks - 1 - blk
    bh = pid // n_blocks
    return bh // H, bh % H, blk


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_loop(acc, m_i, l_i, q, Ks, Vs, Bs, Ms, offs_m, lo, hi, Nq, Nk, qk_scale,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(Ks, offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)
        v = _load_rows(Vs, offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
        s = scores(q, k, qk_scale, Bs, Ms, offs_m[:, None], offs_n[None, :], Nq, Nk,
                   stride_bm, stride_bn, stride_mn, HAS_BIAS, HAS_KPM, CAUSAL, MASKED, PRECISION)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["Nq", "Nk", "n_qblocks"])
def _attn_fwd_kernel(
    Q, K, V, Bias, KPM, Out, Lse,
    H, Nq, Nk, n_qblocks, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, qb = _split_pid(tl.program_id(0), n_qblocks, H, CAUSAL)
    Bs = _slice(Bias, b, h, stride_bb, stride_bh)
    Ms = KPM + b.to(tl.int64) * stride_mb
    Ks = _slice(K, b, h, stride_kb, stride_kh)
    Vs = _slice(V, b, h, stride_vb, stride_vh)
    m0 = qb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(_slice(Q, b, h, stride_qb, stride_qh), offs_m, Nq, stride_qn, stride_qd, HEAD_DIM, BLOCK_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full, hi = _key_range(m0, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, Ks, Vs, Bs, Ms, offs_m, 0, full, Nq, Nk, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, HAS_BIAS, HAS_KPM, CAUSAL, False, PRECISION)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, Ks, Vs, Bs, Ms, offs_m, full, hi, Nq, Nk, qk_scale,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, HAS_BIAS, HAS_KPM, CAUSAL, True, PRECISION)
    out, lse = finish_rows(acc, m_i, l_i)
    _store_rows(_slice(Out, b, h, stride_ob, stride_oh), offs_m, Nq, stride_on, stride_od, out, HEAD_DIM, BLOCK_D)
    tl.store(Lse + (b * H + h).to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["Nq", "n_qblocks"])
def _attn_bwd_delta_kernel(
    Out, DO, Delta, H, Nq, n_qblocks,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b, h, qb = _split_pid(tl.program_id(0), n_qblocks, H, False)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_rows(_slice(Out, b, h, stride_ob, stride_oh), offs_m, Nq, stride_on, stride_od, HEAD_DIM, BLOCK_D)
    do = _load_rows(_slice(DO, b, h, stride_gb, stride_gh), offs_m, Nq, stride_gn, stride_gd, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + (b * H + h).to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _dkdv_query_loop(dk, dv, k, v, Qs, DOs, Bs, Ms, Ls, Ds, offs_n, lo, hi, Nq, Nk, qk_scale,
                     stride_qn, stride_qd, stride_gn, stride_gd, stride_bm, stride_bn, stride_mn,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    # Transposed tiles (keys x queries), so that dV += Pᵀ·dO and dK += dSᵀ·Q need no register transpose.
    # Query rows >= Nq load as zero with lse = +inf: they add exactly nothing.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(Qs, offs_m, Nq, stride_qn, stride_qd, HEAD_DIM, BLOCK_D)
        do = _load_rows(DOs, offs_m, Nq, stride_gn, stride_gd, HEAD_DIM, BLOCK_D)
        st = scores(k, q, qk_scale, Bs, Ms, offs_m[None, :], offs_n[:, None], Nq, Nk,
                    stride_bm, stride_bn, stride_mn, HAS_BIAS, HAS_KPM, CAUSAL, MASKED, PRECISION)
        lse2 = lse_log2(Ls, offs_m, Nq)
        delta = tl.load(Ds + offs_m, mask=offs_m < Nq, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        pt, dst = softmax_bwd(st, lse2[None, :], dpt, delta[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["Nq", "Nk", "n_kblocks"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, Bias, KPM, DO, Lse, Delta, DK, DV,
    H, Nq, Nk, n_kblocks, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mn,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xh, stride_xn, stride_xd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, kb = _split_pid(tl.program_id(0), n_kblocks, H, False)
    n0 = kb * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(_slice(K, b, h, stride_kb, stride_kh), offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)
    v = _load_rows(_slice(V, b, h, stride_vb, stride_vh), offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
    Qs = _slice(Q, b, h, stride_qb, stride_qh)
    DOs = _slice(DO, b, h, stride_gb, stride_gh)
    Bs = _slice(Bias, b, h, stride_bb, stride_bh)
    Ms = KPM + b.to(tl.int64) * stride_mb
    Ls = Lse + (b * H + h).to(tl.int64) * Nq
    Ds = Delta + (b * H + h).to(tl.int64) * Nq

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    full = 0
    if CAUSAL:
        # Queries i < n0 see none of these keys; query blocks starting at or after the block's last
        # key see all of them; the ones in between straddle the diagonal and are masked.
        lo = (n0 // BLOCK_M) * BLOCK_M
        full = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, tl.cdiv(Nq, BLOCK_M) * BLOCK_M)
        dk, dv = _dkdv_query_loop(dk, dv, k, v, Qs, DOs, Bs, Ms, Ls, Ds, offs_n, lo, full, Nq, Nk, qk_scale,
                                  stride_qn, stride_qd, stride_gn, stride_gd, stride_bm, stride_bn, stride_mn,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, HAS_BIAS, HAS_KPM, CAUSAL, True, PRECISION)
    # Key rows >= Nk of this block are never stored, so the remaining tiles need no key mask.
    dk, dv = _dkdv_query_loop(dk, dv, k, v, Qs, DOs, Bs, Ms, Ls, Ds, offs_n, full, Nq, Nq, Nk, qk_scale,
                              stride_qn, stride_qd, stride_gn, stride_gd, stride_bm, stride_bn, stride_mn,
                              HEAD_DIM, BLOCK_D, BLOCK_M, HAS_BIAS, HAS_KPM, CAUSAL, False, PRECISION)
    _store_rows(_slice(DK, b, h, stride_xb, stride_xh), offs_n, Nk, stride_xn, stride_xd, dk * sm_scale,
                HEAD_DIM, BLOCK_D)
    _store_rows(_slice(DV, b, h, stride_xb, stride_xh), offs_n, Nk, stride_xn, stride_xd, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_key_loop(dq, q, do, lse2, delta, Ks, Vs, Bs, Ms, offs_m, lo, hi, Nq, Nk, qk_scale,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(Ks, offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_D)
        v = _load_rows(Vs, offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, BLOCK_D)
        s = scores(q, k, qk_scale, Bs, Ms, offs_m[:, None], offs_n[None, :], Nq, Nk,
                   stride_bm, stride_bn, stride_mn, HAS_BIAS, HAS_KPM, CAUSAL, MASKED, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        _, ds = softmax_bwd(s, lse2[:, None], dp, delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["Nq", "Nk", "n_qblocks"])
def _attn_bwd_dq_kernel(
    Q, K, V, Bias, KPM, DO, Lse, Delta, DQ,
    H, Nq, Nk, n_qblocks, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mn,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xh, stride_xn, stride_xd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    b, h, qb = _split_pid(tl.program_id(0), n_qblocks, H, CAUSAL)
    m0 = qb * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _load_rows(_slice(Q, b, h, stride_qb, stride_qh), offs_m, Nq, stride_qn, stride_qd, HEAD_DIM, BLOCK_D)
    do = _load_rows(_slice(DO, b, h, stride_gb, stride_gh), offs_m, Nq, stride_gn, stride_gd, HEAD_DIM, BLOCK_D)
    row = (b * H + h).to(tl.int64) * Nq
    lse2 = lse_log2(Lse + row, offs_m, Nq)
    delta = tl.load(Delta + row + offs_m, mask=offs_m < Nq, other=0.0)
    Ks = _slice(K, b, h, stride_kb, stride_kh)
    Vs = _slice(V, b, h, stride_vb, stride_vh)
    Bs = _slice(Bias, b, h, stride_bb, stride_bh)
    Ms = KPM + b.to(tl.int64) * stride_mb

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full, hi = _key_range(m0, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_key_loop(dq, q, do, lse2, delta, Ks, Vs, Bs, Ms, offs_m, 0, full, Nq, Nk, qk_scale,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                      HEAD_DIM, BLOCK_D, BLOCK_N, HAS_BIAS, HAS_KPM, CAUSAL, False, PRECISION)
    dq = _dq_key_loop(dq, q, do, lse2, delta, Ks, Vs, Bs, Ms, offs_m, full, hi, Nq, Nk, qk_scale,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn, stride_mn,
                      HEAD_DIM, BLOCK_D, BLOCK_N, HAS_BIAS, HAS_KPM, CAUSAL, True, PRECISION)
    _store_rows(_slice(DQ, b, h, stride_xb, stride_xh), offs_m, Nq, stride_xn, stride_xd, dq * sm_scale,
                HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["Nq", "Nk", "n_qtiles", "n_kblocks", "rep_b", "rep_h", "n_qsteps"])
def _attn_bwd_dbias_kernel(
    Q, K, V, Bias, KPM, DO, Lse, Delta, DBias,
    H, Nq, Nk, n_qtiles, n_kblocks, rep_b, rep_h, n_qsteps, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mn,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xh, stride_xm,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, SUM_ROWS: tl.constexpr, PRECISION: tl.constexpr,
):
    # The program owns one tile of dbias in the bias's own shape (DB, DH, Nq or 1, Nk): bias batch
    # index bb, head index hh, query tile qt (0 when SUM_ROWS), key block kb. The (batch, head) pairs
    # broadcast onto it are b = bb + i (i < rep_b; rep_b = B when the bias has batch 1, else 1), and
    # likewise for heads; with SUM_ROWS it also walks every query block and sums the rows.
    pid = tl.program_id(0)
    kb = pid % n_kblocks
    qt = (pid // n_kblocks) % n_qtiles
    bh = pid // (n_kblocks * n_qtiles)
    n_hh = H // rep_h
    bb = bh // n_hh
    hh = bh % n_hh
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, rep_b):
        b = bb + i
        Ms = KPM + b.to(tl.int64) * stride_mb
        for j in range(0, rep_h):
            h = hh + j
            k = _load_rows(_slice(K, b, h, stride_kb, stride_kh), offs_n, Nk, stride_kn, stride_kd,
                           HEAD_DIM, BLOCK_D)
            v = _load_rows(_slice(V, b, h, stride_vb, stride_vh), offs_n, Nk, stride_vn, stride_vd,
                           HEAD_DIM, BLOCK_D)
            row = (b * H + h).to(tl.int64) * Nq
            for t in range(0, n_qsteps):
                offs_m = (qt + t) * BLOCK_M + tl.arange(0, BLOCK_M)
                q = _load_rows(_slice(Q, b, h, stride_qb, stride_qh), offs_m, Nq, stride_qn, stride_qd,
                               HEAD_DIM, BLOCK_D)
                do = _load_rows(_slice(DO, b, h, stride_gb, stride_gh), offs_m, Nq, stride_gn, stride_gd,
                                HEAD_DIM, BLOCK_D)
                s = scores(q, k, qk_scale, _slice(Bias, b, h, stride_bb, stride_bh), Ms,
                           offs_m[:, None], offs_n[None, :], Nq, Nk, stride_bm, stride_bn, stride_mn,
                           True, HAS_KPM, CAUSAL, True, PRECISION)
                delta = tl.load(Delta + row + offs_m, mask=offs_m < Nq, other=0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                _, ds = softmax_bwd(s, lse_log2(Lse + row, offs_m, Nq)[:, None], dp, delta[:, None])
                acc += ds
    DBs = DBias + bb.to(tl.int64) * stride_xb + hh.to(tl.int64) * stride_xh
    if SUM_ROWS:
        tl.store(DBs + offs_n, tl.sum(acc, axis=0).to(DBias.dtype.element_ty), mask=offs_n < Nk)
    else:
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        tl.store(DBs + offs_m[:, None] * stride_xm + offs_n[None, :], acc.to(DBias.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launch configurations and launchers
# --------------------------------------------------------------------------------------------------


# Per architecture family (fusedtx.kernels.support.arch_family): (kernel, padded head dim, fp32?) ->
# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M counts queries and BLOCK_N keys in every kernel. Chosen so
# that the builds for every target of the family neither spill nor exceed its shared memory, also with a bias
# whose rows are not 16-element aligned (N = 197) (python -m fusedtx.bench.resources attention; the tables in
# bench/results/resources-sm_*.md); not yet tuned on a GPU.
_HOPPER = {
    ("fwd", 64, False): (128, 64, 8, 3), ("fwd", 128, False): (128, 64, 8, 3), ("fwd", 256, False): (64, 32, 8, 3),
    ("fwd", 64, True): (64, 32, 4, 3), ("fwd", 128, True): (64, 32, 8, 3), ("fwd", 256, True): (64, 16, 8, 3),
    ("dkdv", 64, False): (64, 128, 8, 3), ("dkdv", 128, False): (32, 128, 8, 3), ("dkdv", 256, False): (16, 64, 8, 3),
    ("dkdv", 64, True): (32, 64, 8, 3), ("dkdv", 128, True): (32, 32, 8, 3), ("dkdv", 256, True): (16, 32, 8, 3),
    ("dq", 64, False): (128, 64, 8, 3), ("dq", 128, False): (128, 32, 8, 3), ("dq", 256, False): (64, 32, 8, 3),
    ("dq", 64, True): (64, 32, 4, 3), ("dq", 128, True): (64, 32, 8, 3), ("dq", 256, True): (32, 16, 8, 3),
    ("dbias", 64, False): (64, 64, 8, 3), ("dbias", 128, False): (64, 32, 8, 3), ("dbias", 256, False): (64, 32, 8, 3),
    ("dbias", 64, True): (64, 32, 8, 3), ("dbias", 128, True): (64, 32, 8, 3), ("dbias", 256, True): (32, 16, 8, 3),
}
# Blackwell datacenter (sm_100a: 227 KiB, tcgen05): Hopper's tables.
_BLACKWELL = dict(_HOPPER)
# Ampere and Ada (sm_80 to sm_89: 99 KiB on sm_86/sm_89, mma.sync, whose accumulators need more registers than
# Hopper's wgmma) and Blackwell consumer (sm_120: 99 KiB, mma.sync): smaller tiles, two stages.
_AMPERE = {
    ("fwd", 64, False): (128, 64, 8, 3), ("fwd", 128, False): (64, 64, 8, 2), ("fwd", 256, False): (64, 32, 8, 2),
    ("fwd", 64, True): (64, 32, 4, 2), ("fwd", 128, True): (32, 32, 4, 2), ("fwd", 256, True): (32, 16, 8, 2),
    ("dkdv", 64, False): (32, 64, 8, 2), ("dkdv", 128, False): (32, 64, 8, 2), ("dkdv", 256, False): (16, 32, 8, 2),
    ("dkdv", 64, True): (32, 32, 8, 2), ("dkdv", 128, True): (16, 32, 8, 2), ("dkdv", 256, True): (16, 16, 8, 2),
    ("dq", 64, False): (32, 64, 8, 2), ("dq", 128, False): (64, 32, 8, 2), ("dq", 256, False): (32, 16, 8, 2),
    ("dq", 64, True): (64, 32, 4, 2), ("dq", 128, True): (32, 32, 8, 2), ("dq", 256, True): (16, 16, 8, 2),
    ("dbias", 64, False): (64, 32, 8, 2), ("dbias", 128, False): (32, 32, 8, 2), ("dbias", 256, False): (32, 16, 8, 2),
    ("dbias", 64, True): (32, 32, 8, 2), ("dbias", 128, True): (32, 16, 8, 2), ("dbias", 256, True): (16, 16, 8, 2),
}
_BLACKWELL_CONSUMER = dict(_AMPERE)
_CONFIGS = {"hopper": _HOPPER, "blackwell": _BLACKWELL, "ampere": _AMPERE, "blackwell_consumer": _BLACKWELL_CONSUMER}
# With a bias the bias tile's registers take narrower blocks where the bias-free config would spill: the
# forward's 128-lane head dims on Hopper and Blackwell, and the builds the resource sweep found spilling with a
# bias (bench/results/resources-sm_*.md) where a smaller config compiled without spills.
_AMPERE_BIAS = {("dq", 64, True): (32, 32, 4, 2), ("dq", 128, True): (16, 32, 8, 2),
                ("dkdv", 128, True): (16, 16, 8, 2), ("fwd", 256, True): (16, 16, 8, 2),
                ("dbias", 128, False): (32, 16, 8, 2)}
_BIAS_CONFIGS = {
    "hopper": {("fwd", 128, False): (128, 32, 8, 3)},
    "blackwell": {("fwd", 128, False): (128, 32, 8, 3), ("dq", 256, False): (64, 16, 8, 3),
                  ("dkdv", 256, True): (16, 16, 8, 3)},
    "ampere": _AMPERE_BIAS,
    "blackwell_consumer": {**_AMPERE_BIAS, ("dq", 128, True): (32, 16, 8, 2), ("dq", 256, False): (16, 16, 8, 2),
                           ("fwd", 256, True): (32, 16, 8, 2),
                           ("fwd", 64, False): (128, 32, 8, 3), ("dkdv", 64, False): (32, 32, 8, 2),
                           ("dkdv", 128, False): (32, 32, 8, 2)},
}
# float32 with TF32 off ("ieee", PyTorch's default): Triton lowers these dots to FMA loops, without tensor cores,
# whose fragments take more registers than an MMA's, and most of the tf32 tiles above spill there. (kernel,
# padded head dim) -> the config where it differs from the tf32 one with a bias: that tile (fewer stages or other
# warps allowed) where it compiled without a spill for every target of the family with a bias at head dims 64,
# 80, 128 and 256, else the largest smaller tile that did (python -m fusedtx.bench.resources attention, the
# "fp32 ieee" rows). Calls without a bias take the same config: the one that was compiled.
_IEEE_CONFIGS = {
    "ampere": {("fwd", 64): (64, 32, 8, 2), ("fwd", 128): (32, 32, 4, 1), ("fwd", 256): (16, 16, 8, 1),
               ("dkdv", 64): (32, 32, 8, 1), ("dkdv", 128): (16, 16, 4, 2), ("dq", 128): (16, 32, 4, 2),
               ("dbias", 64): (16, 64, 8, 2), ("dbias", 128): (16, 32, 8, 1), ("dbias", 256): (16, 16, 4, 1)},
    "hopper": {("fwd", 64): (64, 32, 8, 3), ("fwd", 128): (128, 16, 8, 1), ("fwd", 256): (64, 16, 8, 1),
               ("dq", 64): (32, 64, 4, 1), ("dq", 128): (32, 64, 8, 3), ("dbias", 128): (64, 32, 8, 1),
               ("dbias", 256): (32, 16, 8, 1)},
    "blackwell": {("fwd", 64): (64, 32, 8, 3), ("fwd", 128): (128, 16, 8, 1), ("fwd", 256): (64, 16, 8, 1),
                  ("dq", 64): (64, 32, 8, 3), ("dq", 128): (32, 64, 8, 3), ("dbias", 128): (64, 32, 8, 1),
                  ("dbias", 256): (32, 16, 8, 1)},
    "blackwell_consumer": {("fwd", 64): (64, 32, 8, 2), ("fwd", 128): (64, 16, 8, 1), ("fwd", 256): (32, 16, 8, 1),
                           ("dq", 128): (32, 16, 8, 1), ("dbias", 128): (32, 16, 8, 1), ("dbias", 256): (16, 16, 8, 1)},
}
# The interpreter runs a single small config (unequal blocks, so the causal ranges are exercised).
_INTERPRETER_CONFIG = {"fwd": (64, 32, 1, 1), "dkdv": (32, 64, 1, 1), "dq": (64, 32, 1, 1), "dbias": (32, 64, 1, 1)}


def _key(kind: str, head_dim: int, dtype: torch.dtype) -> tuple[str, int, bool]:
    return kind, max(64, block_d(head_dim)), dtype == torch.float32


def configs(kind: str, head_dim: int, dtype: torch.dtype, has_bias: bool = False,
            family: str | None = None, precision: str | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ``kind`` ("fwd", "dkdv", "dq", "dbias") for a head
    dim, dtype and whether a bias is read, on architecture ``family`` (default: the interpreter's config when
    it runs, else the current CUDA device's family). ``precision``: the dot precision of float32 operands,
    "tf32" or "ieee" (default: what a launch now takes, :func:`~fusedtx.kernels.support.dot_precision`).
    Independent of sequence length."""
    if family is None:
        if interpreter_enabled():
            return _INTERPRETER_CONFIG[kind]
        family = device_family(torch.device("cuda"))
    key = _key(kind, head_dim, dtype)
    if full_float32(dtype, precision):  # one config, with or without a bias
        return _IEEE_CONFIGS[family].get(key[:2]) or _BIAS_CONFIGS[family].get(key) or _CONFIGS[family][key]
    return (_BIAS_CONFIGS[family] if has_bias else {}).get(key) or _CONFIGS[family][key]


def candidates(kind: str, head_dim: int, dtype: torch.dtype, has_bias: bool = False,
               family: str | None = None, precision: str | None = None) -> list[tuple[int, int, int, int]]:
    """A short list of configs worth timing for ``kind`` on ``family`` (the chosen one first): the chosen one,
    the other families' choices that are smaller, and the chosen one with half the key or query block. The
    resource check compiles them for a config that spills; ``fusedtx tune`` would time the ones that fit."""
    chosen = configs(kind, head_dim, dtype, has_bias, family, precision)
    bm, bn, warps, stages = chosen
    out = [chosen]
    for other in _CONFIGS:
        c = configs(kind, head_dim, dtype, has_bias, other, precision)
        if c[0] * c[1] <= bm * bn and c not in out:
            out.append(c)
    for c in ((bm, bn // 2, warps, stages), (bm // 2, bn, warps, stages), (bm, bn, warps, 2)):
        if min(c[:2]) >= 16 and c not in out:
            out.append(c)
    return out


def _tuning(kind: str, q: torch.Tensor, has_bias: bool = False) -> Tuning:
    """What ``fusedtx tune`` (``FUSEDTX_TUNE=1``) may time for a launch on ``q``: the key its tuned config is
    stored under (kernel, padded head dim, dtype, bias, sequence length to the next power of two) and the
    candidates for the device's architecture family."""
    d = q.shape[-1]
    family = None if interpreter_enabled() else device_family(q.device)
    key = f"attention|{kind}|d{block_d(d)}|{dtype_tag(q.dtype)}|bias{int(has_bias)}|" \
          f"n{triton.next_power_of_2(q.shape[2])}"
    return Tuning(q.device, key, tuple(candidates(kind, d, q.dtype, has_bias, family)))


def _launch_config(kind: str, q: torch.Tensor, has_bias: bool = False,
                   tuning: Tuning | None = None) -> tuple[int, int, int, int]:
    """The config a launch on ``q``'s device starts from: its tuned one (``fusedtx tune``), else the table's.
    ``tuning``: the launch's :func:`_tuning`, where the caller has it already."""
    if interpreter_enabled():
        default = _INTERPRETER_CONFIG[kind]
    else:
        default = configs(kind, q.shape[-1], q.dtype, has_bias, device_family(q.device))
    return tuned_or(q.device, (tuning or _tuning(kind, q, has_bias)).key, default)


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a 4-D tensor with 0 on size-1 (broadcast) dims; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(s if n > 1 else 0 for n, s in zip(t.shape, t.stride(), strict=True))


def _optional_args(q: torch.Tensor, bias: torch.Tensor | None, key_padding_mask: torch.Tensor | None):
    """Bias and key padding mask pointers (``q`` stands in for an absent one: never read) and strides."""
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None  # same bytes, 0/1
    kpm_strides = kpm.stride() if kpm is not None else (0, 0)
    return (bias if bias is not None else q, kpm if kpm is not None else q), (*_strides4(bias), *kpm_strides)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward. q (B, H, Nq, D), k and v (B, H, Nk, D), any strides; ``bias`` 4-D, broadcastable to
    (B, H, Nq, Nk) through size-1 dims; ``key_padding_mask`` bool (B, Nk), True = ignore.
    Returns out (B, H, Nq, D) in q's dtype (memory laid out (B, Nq, H, D)) and lse (B, H, Nq) fp32."""
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    out = empty_bnhd((bsz, heads, nq, d), q)
    lse = torch.empty((bsz, heads, nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    (bias_ptr, kpm_ptr), mask_strides = _optional_args(q, bias, key_padding_mask)

    def run(config):
        block_m, block_n, warps, stages = config
        n_qblocks = triton.cdiv(nq, block_m)
        _attn_fwd_kernel[(bsz * heads * n_qblocks,)](
            q, k, v, bias_ptr, kpm_ptr, out, lse,
            heads, nq, nk, n_qblocks, scale * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_BIAS=bias is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal,
            PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
        )

    has_bias = bias is not None
    tuning = _tuning("fwd", q, has_bias)
    launch("attention fwd", (d, dtype_tag(q.dtype), has_bias), _launch_config("fwd", q, has_bias, tuning), run,
           tuning=tuning)
    return out, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward. Same conventions as :func:`attention_fwd`; ``out`` and ``lse`` are what it returned,
    ``do`` the gradient of ``out`` (any strides). Returns dq, dk, dv (memory laid out (B, N, H, D))
    and, when ``bias_grad``, dbias of the bias's shape and dtype (else None)."""
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    dq = empty_bnhd((bsz, heads, nq, d), q)
    dk = empty_bnhd((bsz, heads, nk, d), k)
    dv = empty_bnhd((bsz, heads, nk, d), v)
    # dbias in the bias's 4-D shape, contiguous (the dbias kernel writes rows of contiguous keys).
    dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if bias_grad else None
    if bsz * heads == 0 or nq == 0:  # nothing reaches k, v or the bias
        for t in (dk, dv, dbias):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dbias
    bd = block_d(d)
    (bias_ptr, kpm_ptr), mask_strides = _optional_args(q, bias, key_padding_mask)
    common = dict(HEAD_DIM=d, BLOCK_D=bd, HAS_KPM=key_padding_mask is not None, CAUSAL=causal,
                  PRECISION=dot_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *do.stride())

    delta = torch.empty((bsz, heads, nq), dtype=torch.float32, device=q.device)
    has_bias = bias is not None
    dq_tuning = _tuning("dq", q, has_bias)
    dq_config = _launch_config("dq", q, has_bias, dq_tuning)
    dq_block_m, dq_warps = dq_config[0], dq_config[2]  # the delta pass shares dq's query blocks
    n_qblocks = triton.cdiv(nq, dq_block_m)
    _attn_bwd_delta_kernel[(bsz * heads * n_qblocks,)](
        out, do, delta, heads, nq, n_qblocks, *out.stride(), *do.stride(),
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=dq_block_m, num_warps=dq_warps,
    )
    key = (d, dtype_tag(q.dtype), has_bias)
    if nk > 0:
        def run_dkdv(config):
            block_m, block_n, warps, stages = config
            n_kblocks = triton.cdiv(nk, block_n)
            _attn_bwd_dkdv_kernel[(bsz * heads * n_kblocks,)](
                q, k, v, bias_ptr, kpm_ptr, do, lse, delta, dk, dv,
                heads, nq, nk, n_kblocks, scale * LOG2E, scale, *strides, *dk.stride(),
                BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, num_warps=warps, num_stages=stages,
                **common,
            )

        tuning = _tuning("dkdv", q, has_bias)
        launch("attention dkdv", key, _launch_config("dkdv", q, has_bias, tuning), run_dkdv, tuning=tuning)

    def run_dq(config):
        block_m, block_n, warps, stages = config
        n_blocks = triton.cdiv(nq, block_m)
        _attn_bwd_dq_kernel[(bsz * heads * n_blocks,)](
            q, k, v, bias_ptr, kpm_ptr, do, lse, delta, dq,
            heads, nq, nk, n_blocks, scale * LOG2E, scale, *strides, *dq.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, num_warps=warps, num_stages=stages,
            **common,
        )

    launch("attention dq", key, dq_config, run_dq, tuning=dq_tuning)
    if dbias is not None and dbias.numel() > 0:
        if bias.shape[3] == 1:
            dbias.zero_()  # a bias constant along the keys shifts every score of a row: no gradient
        else:
            sum_rows = bias.shape[2] == 1 and nq > 1
            rep_b = bsz if bias.shape[0] == 1 else 1
            rep_h = heads if bias.shape[1] == 1 else 1

            def run_dbias(config):
                block_m, block_n, warps, stages = config
                # Program tiles along the queries, and query blocks each one walks (all of them with SUM_ROWS).
                n_qtiles, n_qsteps = (1, triton.cdiv(nq, block_m)) if sum_rows else (triton.cdiv(nq, block_m), 1)
                n_kblocks = triton.cdiv(nk, block_n)
                grid = (bias.shape[0] * bias.shape[1] * n_qtiles * n_kblocks,)
                _attn_bwd_dbias_kernel[grid](
                    q, k, v, bias_ptr, kpm_ptr, do, lse, delta, dbias,
                    heads, nq, nk, n_qtiles, n_kblocks, rep_b, rep_h, n_qsteps, scale * LOG2E,
                    *strides, *dbias.stride()[:3],
                    BLOCK_M=block_m, BLOCK_N=block_n, SUM_ROWS=sum_rows, num_warps=warps, num_stages=stages,
                    **common,
                )

            tuning = _tuning("dbias", q, True)
            launch("attention dbias", key, _launch_config("dbias", q, True, tuning), run_dbias, tuning=tuning)
    return dq, dk, dv, dbias
