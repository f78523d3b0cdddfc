"""Triton kernels for sinusoidal position encodings: the 1D Vaswani encoding and the 2D sin-cos grid
encoding of ViT/MAE, generated for any positions, or added to x with no table in memory.

The unit of work is a *pair*: one (token, coordinate, frequency) whose angle a = coordinate * freq gives
two channels, sin(a) and cos(a), so the argument reduction is shared by both. A program owns BLOCK_K
frequencies of one coordinate (computed once, in fp64) and walks ``row_iters`` blocks of BLOCK_T tokens
of one sequence of the batch.

Accuracy: the angle and its reduction modulo pi/2 are computed in fp64 (error ~|a|*2^-53, so positions in
the millions stay far inside 1e-6), and only the reduced |r| <= pi/4 goes to fp32, where Taylor series
to r^9 / r^10 give sin and cos within a few fp32 ulps. A plain fp32 ``pos * freq`` would be off by
|a|*2^-24 before any sine is taken (0.06 at a = 2^20).

Channel layouts (LAYOUT), for NF frequencies per coordinate and SLOTS coordinates (1 in 1D, 2 in 2D):
  INTERLEAVED  pair k -> channels 2k (sin), 2k+1 (cos)
  BLOCKED      coordinate slot s, frequency j -> channels 2*NF*s + j (sin), 2*NF*s + NF + j (cos)
  SPLIT        pair k = NF*s + j -> channels k (sin), NF*SLOTS + k (cos)
In 2D, slot 0 encodes the column (x) when FIRST_IS_COL, else the row (y); rows of the first PREFIX
tokens of each sequence (class tokens) get a zero encoding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

INTERLEAVED, BLOCKED, SPLIT = 0, 1, 2
# name -> (LAYOUT, FIRST_IS_COL)
LAYOUTS_1D = {"interleaved": (INTERLEAVED, False), "concat": (SPLIT, False)}
LAYOUTS_2D = {"mae": (BLOCKED, True), "mae_hw": (BLOCKED, False), "timm": (SPLIT, False)}

TILE_PAIRS = 1024  # pairs per row block on the GPU: 16 output elements per thread at 4 warps
INTERPRETER_TILE_PAIRS = 8192  # bigger blocks in Triton's CPU interpreter, whose cost is per operation
MAX_ROW_ITERS = 16

_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
_PI_OVER_2 = tl.constexpr(1.5707963267948966)
# 1.5 * 2^52: adding it to an fp64 |v| < 2^51 rounds v to an integer, which then sits in the low mantissa bits.
_ROUND_SHIFT = tl.constexpr(6755399441055744.0)
# Positions are clamped to +-2^48, so |angle| * 2/pi < 2^51 (the shift's range). Far beyond any position
# id; float64 itself resolves the angle only to |angle| * 2^-53 (1e-6 is lost above ~2^32).
_MAX_POSITION = tl.constexpr(2**48)


@triton.jit
def _sincos(angle):
    """(sin, cos) in fp32 of an fp64 angle: angle = n*pi/2 + r, |r| <= pi/4, reduced in fp64."""
    shifted = angle * _TWO_OVER_PI + _ROUND_SHIFT
    n = shifted - _ROUND_SHIFT
    r = (angle - n * _PI_OVER_2).to(tl.float32)
    quadrant = shifted.to(tl.int64, bitcast=True) & 3  # n mod 4 (the shift is a multiple of 4)
    r2 = r * r
    sin_r = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880))))
    cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    # sin(r + n*pi/2), cos(r + n*pi/2) for n mod 4 = 0, 1, 2, 3: (s, c), (c, -s), (-s, -c), (-c, s).
    odd = (quadrant & 1) != 0
    flip = (quadrant & 2) != 0
    s = tl.where(odd, cos_r, sin_r)
    c = tl.where(odd, -sin_r, cos_r)
    return tl.where(flip, -s, s), tl.where(flip, -c, c)


@triton.jit
def _emit(X, Y, rows, xrow, ch, mask, pe, D, stride_xd, HAS_X: tl.constexpr):
    """Store pe (or x + pe, added in fp32) to the contiguous (rows, D) output at channels ch; xrow is the
    offset of each row in X."""
    if HAS_X:
        x = tl.load(X + xrow[:, None] + ch.to(tl.int64)[None, :] * stride_xd, mask=mask, other=0.0)
        pe = x.to(tl.float32) + pe
    tl.store(Y + rows[:, None] * D + ch[None, :], pe.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _sinusoidal_kernel(
    X, Y, POS, T, GRID_W, inv_grid_w, PREFIX, offset, chunks, row_iters,
    stride_xb, stride_xt, stride_xd, stride_pb, stride_pt,
    NF: tl.constexpr, SLOTS: tl.constexpr, FREQ_LOG2: tl.constexpr,
    LAYOUT: tl.constexpr, FIRST_IS_COL: tl.constexpr, HAS_X: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (b * chunks + chunk, slot * ceil(NF / BLOCK_K) + frequency block) covers tokens
    # [chunk * row_iters * BLOCK_T, + row_iters * BLOCK_T) of batch b, for one coordinate: one scalar
    # division per program and none per row.
    # freq_j = base^(-j/NF) = 2^(j * FREQ_LOG2), in fp64; FREQ_LOG2 = -log2(base)/NF is an fp64 constant.
    D = 2 * NF * SLOTS
    b = tl.program_id(0) // chunks
    t0 = (tl.program_id(0) - b * chunks) * row_iters * BLOCK_T
    b = b.to(tl.int64)
    slot = tl.program_id(1) // tl.cdiv(NF, BLOCK_K)
    jb = tl.program_id(1) - slot * tl.cdiv(NF, BLOCK_K)
    j = jb * BLOCK_K + tl.arange(0, BLOCK_K)
    freq = tl.exp2(j.to(tl.float64) * FREQ_LOG2)
    if LAYOUT == 0:  # 1D only: slot 0
        ch = jb * (2 * BLOCK_K) + tl.arange(0, 2 * BLOCK_K)
    elif LAYOUT == 1:
        ch_sin = slot * (2 * NF) + j
        ch_cos = ch_sin + NF
    else:
        ch_sin = slot * NF + j
        ch_cos = ch_sin + NF * SLOTS
    use_col = (slot == 0) == FIRST_IS_COL  # 2D: this program encodes columns (x), else rows (y)
    for it in range(row_iters):
        t = t0 + it * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        rows = b * T + t  # int64
        xrow = b * stride_xb + t.to(tl.int64) * stride_xt
        if SLOTS == 1:
            if HAS_POS:
                pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=tmask, other=0).to(tl.int64) + offset
            else:
                pos = t.to(tl.int64) + offset
            pos = tl.minimum(tl.maximum(pos, -_MAX_POSITION), _MAX_POSITION)
            s, c = _sincos(pos.to(tl.float64)[:, None] * freq[None, :])
        else:
            # Patch index in row-major order (negative on prefix tokens) -> (row gy, column gx). The
            # quotient comes from an fp32 reciprocal: exact for cell < 2^22 (ops.py sends larger grids
            # to the reference), and much cheaper than an integer division per row.
            cell = t - PREFIX
            gy = ((cell.to(tl.float32) + 0.5) * inv_grid_w).to(tl.int32)
            coord = tl.where(use_col, cell - gy * GRID_W, gy)
            s, c = _sincos(coord.to(tl.float64)[:, None] * freq[None, :])
            s = tl.where(cell[:, None] >= 0, s, 0.0)  # prefix (class) tokens: zero encoding
            c = tl.where(cell[:, None] >= 0, c, 0.0)
        if LAYOUT == 0:
            mask = tmask[:, None] & (ch < D)[None, :]
            _emit(X, Y, rows, xrow, ch, mask, tl.interleave(s, c), D, stride_xd, HAS_X)
        else:
            mask = tmask[:, None] & (j < NF)[None, :]
            _emit(X, Y, rows, xrow, ch_sin, mask, s, D, stride_xd, HAS_X)
            _emit(X, Y, rows, xrow, ch_cos, mask, c, D, stride_xd, HAS_X)


def _config(seq: int, nf: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_K, num_warps) for sequences of ``seq`` tokens, ``nf`` frequencies per coordinate."""
    block_k = min(128, triton.next_power_of_2(nf))
    while block_k > 16 and triton.cdiv(nf, block_k) * block_k - nf > nf // 8:  # little padding (nf = 192)
        block_k //= 2
    tile = TILE_PAIRS if device.type == "cuda" else INTERPRETER_TILE_PAIRS
    return min(tile // block_k, triton.next_power_of_2(seq)), block_k, 4


def _row_iters(device: torch.device, tiles: int, row_blocks: int) -> int:
    """Row blocks per program: enough to amortize the fp64 frequencies, while keeping every SM busy."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: few programs, each walking several row blocks
    return max(1, min(MAX_ROW_ITERS, row_blocks, tiles // target))


def _launch(x, positions, batch, seq, npairs_per_slot, slots, layout, first_is_col, base, offset,
            grid_w, prefix, dtype, device) -> torch.Tensor:
    npairs = slots * npairs_per_slot
    y = torch.empty((batch * seq, 2 * npairs), dtype=dtype, device=device)
    if y.numel() == 0:
        return y
    block_t, block_k, num_warps = _config(seq, npairs_per_slot, device)
    row_blocks, pair_blocks = triton.cdiv(seq, block_t), slots * triton.cdiv(npairs_per_slot, block_k)
    iters = _row_iters(device, batch * row_blocks * pair_blocks, row_blocks)
    chunks = triton.cdiv(row_blocks, iters)
    sx = x.stride() if x is not None else (0, 0, 0)
    sp = (0, 0)
    if positions is not None:
        sp = positions.stride() if positions.dim() == 2 else (0, positions.stride(0))
    _sinusoidal_kernel[(batch * chunks, pair_blocks)](
        x, y, positions, seq, grid_w, 1.0 / grid_w, prefix, offset, chunks, iters,
        sx[0], sx[1], sx[2], sp[0], sp[1],
        NF=npairs_per_slot, SLOTS=slots, FREQ_LOG2=-math.log2(base) / npairs_per_slot,
        LAYOUT=layout, FIRST_IS_COL=first_is_col, HAS_X=x is not None, HAS_POS=positions is not None,
        BLOCK_T=block_t, BLOCK_K=block_k, num_warps=num_warps,
    )
    return y


def sinusoidal_1d(x: torch.Tensor | None, positions: torch.Tensor | None, length: int, dim: int, offset: int,
                  base: float, layout: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1D encoding of positions ``positions + offset`` (int32/int64, (length,) or (batch, length)),
    or of ``offset + arange(length)`` when ``positions`` is None.

    With ``x`` (batch, length, dim), any strides: returns ``x + PE`` (batch, length, dim) in x's dtype.
    Without: returns PE of shape (length, dim) or (batch, length, dim) in ``dtype``."""
    code, _ = LAYOUTS_1D[layout]
    if x is not None:
        batch, dtype = x.shape[0], x.dtype
    else:
        batch = positions.shape[0] if positions is not None and positions.dim() == 2 else 1
    y = _launch(x, positions, batch, length, dim // 2, 1, code, False, base, offset, 1, 0, dtype, device)
    lead = (length,) if x is None and (positions is None or positions.dim() == 1) else (batch, length)
    return y.view(*lead, dim)


def sincos_2d(x: torch.Tensor | None, grid_h: int, grid_w: int, dim: int, num_prefix_tokens: int, base: float,
              layout: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 2D sin-cos encoding of a grid_h x grid_w patch grid (row-major tokens) after
    ``num_prefix_tokens`` zero rows: (num_prefix_tokens + grid_h * grid_w, dim) in ``dtype``; or, with
    ``x`` (batch, that many tokens, dim) of any strides, ``x + PE`` in x's dtype."""
    code, first_is_col = LAYOUTS_2D[layout]
    seq = num_prefix_tokens + grid_h * grid_w
    batch = x.shape[0] if x is not None else 1
    dtype = x.dtype if x is not None else dtype
    y = _launch(x, None, batch, seq, dim // 4, 2, code, first_is_col, base, 0, grid_w, num_prefix_tokens,
                dtype, device)
    return y.view(batch, seq, dim) if x is not None else y
