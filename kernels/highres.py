"""Triton kernels for high-resolution inference: patch scoring, token gather, bipartite matching, weighted merge.

* ``patch_scores``: one program per patch reads its pixels straight from the image through the strides
  (no unfold copy), channel by channel, and writes one float32 score: the variance about the patch mean
  (two passes over registers) or the gradient energy (the same tile loaded shifted by one pixel).
* ``gather_tokens``: one program per block of output rows; prefix rows are copied, kept rows read their
  token and position-embedding rows by index and add them in fp32, channel block by channel block.
* ``match_tokens``: flash-attention's loop without the softmax. A program holds a block of normalized A rows
  and streams over blocks of B rows, taking the cosine scores with ``tl.dot`` and keeping a running max and
  argmax per row, so memory stays O(Na + Nb) and no |A| x |B| matrix exists.
* ``merge_weighted``: a deterministic scatter-reduce. The launcher sorts the sources by destination
  (a CSR layout, in PyTorch); one program per destination row then adds its sources in a fixed order, in
  fp32, and divides by the summed size once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .support import dot_precision, interpreter_enabled

VARIANCE, GRADIENT = 0, 1
METHODS = {"variance": VARIANCE, "gradient": GRADIENT}


def _pow2(n: int, low: int = 1) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def configs(kind: str, size: int) -> tuple[int, ...]:
    """The launch config of kernel ``kind`` at ``size``, the same on every architecture (the resource check,
    ``python -m fusedtx.bench.resources highres``, compiles them for each target):

    * ``"scores"``, size = patch size: (BLOCK_P, num_warps);
    * ``"gather"`` and ``"merge"``, size = channels: (BLOCK_R rows (1 for merge), BLOCK_C, num_warps); the
      interpreter takes whole rows of up to 4096 channels (fewer, larger programs run faster there);
    * ``"match"``, size = the metric's dim: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages).
    """
    if kind == "scores":
        return _pow2(size), 4 if size >= 16 else 1
    if kind in ("gather", "merge"):
        widest = 4096 if interpreter_enabled() else (256 if kind == "gather" else 1024)
        return (16 if kind == "gather" else 1), min(_pow2(size, 16), widest), 4
    if kind == "match":  # 64x64 tiles up to 64 dims; past that narrower B blocks (64x64 at 128 dims spills)
        block_d = _pow2(size, 16)
        return (64 if block_d <= 128 else 32), (64 if block_d <= 64 else 32), block_d, 4, 2
    raise ValueError(f"kind must be scores, gather, merge or match, got {kind!r}")


# --------------------------------------------------------------------------------------------------
# patch_scores
# --------------------------------------------------------------------------------------------------


@triton.jit
def _patch_scores_kernel(X, OUT, C, GW, n_patches, stride_b, stride_c, stride_h, stride_w, inv_pixels, inv_pairs,
                         P: tl.constexpr, BLOCK_P: tl.constexpr, METHOD: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_patches
    patch = pid % n_patches
    py = patch // GW
    px = patch % GW
    i = tl.arange(0, BLOCK_P)[:, None]
    j = tl.arange(0, BLOCK_P)[None, :]
    inside = (i < P) & (j < P)
    base = X + b.to(tl.int64) * stride_b + (py * P).to(tl.int64) * stride_h + (px * P).to(tl.int64) * stride_w
    offs = i * stride_h + j * stride_w
    total = 0.0
    for c in range(0, C):
        ptr = base + c * stride_c
        v = tl.load(ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if METHOD == 0:
            mean = tl.sum(tl.sum(v, axis=1), axis=0) * inv_pixels
            d = tl.where(inside, v - mean, 0.0)
            total += tl.sum(tl.sum(d * d, axis=1), axis=0) * inv_pixels
        else:
            right = tl.load(ptr + offs + stride_w, mask=(i < P) & (j + 1 < P), other=0.0).to(tl.float32)
            down = tl.load(ptr + offs + stride_h, mask=(i + 1 < P) & (j < P), other=0.0).to(tl.float32)
            dx = tl.where((i < P) & (j + 1 < P), right - v, 0.0)
            dy = tl.where((i + 1 < P) & (j < P), down - v, 0.0)
            total += tl.sum(tl.sum(dx * dx + dy * dy, axis=1), axis=0) * inv_pairs
    tl.store(OUT + pid, total / C)


def patch_scores(images: torch.Tensor, patch_size: int, method: str) -> torch.Tensor:
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    out = torch.empty((b, gh * gw), device=images.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    sb, sc, sh, sw = images.stride()
    block_p, warps = configs("scores", p)
    _patch_scores_kernel[(b * gh * gw,)](
        images, out, c, gw, gh * gw, sb, sc, sh, sw, 1.0 / (p * p), 1.0 / max(p * (p - 1), 1),
        P=p, BLOCK_P=block_p, METHOD=METHODS[method], num_warps=warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# gather_tokens
# --------------------------------------------------------------------------------------------------


@triton.jit
def _gather_kernel(TOK, IDX, POS, PRE, OUT, NP, K, C,
                   stride_tb, stride_tn, stride_tc, stride_ib, stride_ik, stride_pb, stride_pn, stride_pc,
                   stride_qb, stride_qn, stride_qc,
                   HAS_POS: tl.constexpr, HAS_PRE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_out = NP + K
    live = rows < n_out
    is_pre = rows < NP
    kept = live & (rows >= NP)
    src = tl.load(IDX + b * stride_ib + (rows - NP) * stride_ik, mask=kept, other=0).to(tl.int64)
    out_rows = (b.to(tl.int64) * n_out + rows) * C
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cm = ch < C
        m = kept[:, None] & cm[None, :]
        val = tl.load(TOK + b.to(tl.int64) * stride_tb + src[:, None] * stride_tn + ch[None, :] * stride_tc,
                      mask=m, other=0.0).to(tl.float32)
        if HAS_POS:
            val += tl.load(POS + b.to(tl.int64) * stride_pb + src[:, None] * stride_pn + ch[None, :] * stride_pc,
                           mask=m, other=0.0).to(tl.float32)
        if HAS_PRE:
            pm = (live & is_pre)[:, None] & cm[None, :]
            pre = tl.load(PRE + b.to(tl.int64) * stride_qb + rows[:, None].to(tl.int64) * stride_qn
                          + ch[None, :] * stride_qc, mask=pm, other=0.0).to(tl.float32)
            val = tl.where(is_pre[:, None], pre, val)
        tl.store(OUT + out_rows[:, None] + ch[None, :], val.to(OUT.dtype.element_ty), mask=live[:, None] & cm[None, :])


def gather_tokens(tokens, index, pos, prefix):
    bsz, _, c = tokens.shape
    k = index.shape[1]
    np_ = prefix.shape[1] if prefix is not None else 0
    out = torch.empty((bsz, np_ + k, c), device=tokens.device, dtype=tokens.dtype)
    if out.numel() == 0:
        return out
    pos_strides = (0, pos.stride(1), pos.stride(2)) if pos is not None and pos.shape[0] == 1 else (
        pos.stride() if pos is not None else (0, 0, 0))
    pre_strides = prefix.stride() if prefix is not None else (0, 0, 0)
    block_r, block_c, warps = configs("gather", c)
    _gather_kernel[(bsz, triton.cdiv(np_ + k, block_r))](
        tokens, index, pos if pos is not None else tokens, prefix if prefix is not None else tokens, out,
        np_, k, c, *tokens.stride(), *index.stride(), *pos_strides, *pre_strides,
        HAS_POS=pos is not None, HAS_PRE=prefix is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


# --------------------------------------------------------------------------------------------------
# match_tokens
# --------------------------------------------------------------------------------------------------


@triton.jit
def _match_kernel(A, B, SCORE, INDEX, NA, NB, D, stride_ab, stride_an, stride_ad, stride_bb, stride_bn, stride_bd,
                  eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dm = dims < D
    a = tl.load(A + b.to(tl.int64) * stride_ab + rows[:, None].to(tl.int64) * stride_an + dims[None, :] * stride_ad,
                mask=(rows < NA)[:, None] & dm[None, :], other=0.0).to(tl.float32)
    a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), eps)[:, None]
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, NB, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        bt = tl.load(B + b.to(tl.int64) * stride_bb + cols[:, None].to(tl.int64) * stride_bn
                     + dims[None, :] * stride_bd, mask=(cols < NB)[:, None] & dm[None, :], other=0.0).to(tl.float32)
        bt = bt / tl.maximum(tl.sqrt(tl.sum(bt * bt, axis=1)), eps)[:, None]
        s = tl.dot(a, tl.trans(bt), input_precision=PRECISION)
        s = tl.where((cols < NB)[None, :], s, float("-inf"))
        blk_best = tl.max(s, axis=1)
        blk_arg = tl.argmax(s, axis=1).to(tl.int32) + n0
        better = blk_best > best  # an earlier block keeps ties: the first index wins
        arg = tl.where(better, blk_arg, arg)
        best = tl.where(better, blk_best, best)
    live = rows < NA
    tl.store(SCORE + b * NA + rows, best, mask=live)
    tl.store(INDEX + b * NA + rows, arg.to(tl.int64), mask=live)


def match_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, na, d = a.shape
    nb = b.shape[1]
    score = torch.empty((bsz, na), device=a.device, dtype=torch.float32)
    index = torch.empty((bsz, na), device=a.device, dtype=torch.int64)
    if score.numel() == 0:
        return score, index
    block_m, block_n, block_d, warps, stages = configs("match", d)
    _match_kernel[(bsz, triton.cdiv(na, block_m))](
        a, b, score, index, na, nb, d, *a.stride(), *b.stride(), 1e-12,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=dot_precision(a.dtype),
        num_warps=warps, num_stages=stages,
    )
    return score, index


# --------------------------------------------------------------------------------------------------
# merge_weighted
# --------------------------------------------------------------------------------------------------


@triton.jit
def _merge_kernel(XB, SB, XS, SS, ORDER, OFFSETS, OUT, OUT_S, NB, R, C,
                  stride_xbb, stride_xbn, stride_xbc, stride_sbb, stride_sbn,
                  stride_xsb, stride_xsn, stride_xsc, stride_ssb, stride_ssn, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    b64 = b.to(tl.int64)
    start = tl.load(OFFSETS + b * (NB + 1) + j)
    end = tl.load(OFFSETS + b * (NB + 1) + j + 1)
    s_own = tl.load(SB + b64 * stride_sbb + j * stride_sbn).to(tl.float32)
    size = s_own
    for t in range(start, end):
        src = tl.load(ORDER + b * R + t)
        size += tl.load(SS + b64 * stride_ssb + src * stride_ssn).to(tl.float32)
    inv = 1.0 / size
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cm = ch < C
        acc = s_own * tl.load(XB + b64 * stride_xbb + j * stride_xbn + ch * stride_xbc, mask=cm, other=0.0).to(
            tl.float32)
        for t in range(start, end):
            src = tl.load(ORDER + b * R + t).to(tl.int64)
            w = tl.load(SS + b64 * stride_ssb + src * stride_ssn).to(tl.float32)
            acc += w * tl.load(XS + b64 * stride_xsb + src * stride_xsn + ch * stride_xsc, mask=cm, other=0.0).to(
                tl.float32)
        tl.store(OUT + (b64 * NB + j) * C + ch, (acc * inv).to(OUT.dtype.element_ty), mask=cm)
    tl.store(OUT_S + b * NB + j, size.to(OUT_S.dtype.element_ty))


def merge_weighted(xb, sb, xs, ss, dst):
    bsz, nb, c = xb.shape
    r = xs.shape[1]
    out = torch.empty((bsz, nb, c), device=xb.device, dtype=xb.dtype)
    out_s = torch.empty((bsz, nb), device=xb.device, dtype=sb.dtype)
    if out.numel() == 0:
        return out, out_s
    # CSR of the sources by destination: a stable sort keeps each destination's sources in index order.
    order = dst.argsort(dim=1, stable=True).to(torch.int32).contiguous()
    counts = torch.zeros((bsz, nb + 1), device=xb.device, dtype=torch.int32)
    counts[:, 1:].scatter_add_(1, dst, torch.ones_like(dst, dtype=torch.int32))
    offsets = counts.cumsum(dim=1, dtype=torch.int32).contiguous()
    _, block_c, warps = configs("merge", c)
    _merge_kernel[(bsz, nb)](
        xb, sb, xs, ss, order, offsets, out, out_s, nb, r, c, *xb.stride(), *sb.stride(), *xs.stride(), *ss.stride(),
        BLOCK_C=block_c, num_warps=warps,
    )
    return out, out_s
