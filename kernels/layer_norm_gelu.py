"""Triton kernels for act(LayerNorm(x [+ residual])) over the last dimension, forward and backward.

Rows are the flattened leading dimensions (M rows of width N). Statistics and arithmetic are fp32
whatever the I/O dtype. Two shapes of program:

* single pass (N <= the width limit): a program holds BLOCK_M whole rows in registers, so x is read
  once; several rows per program keep narrow widths (17, 96, 768) from idling lanes;
* chunked (wider rows): a program walks one row in BLOCK_N chunks, once for the mean, once for the
  variance, once to normalize (the re-reads mostly hit L2).

Padded lanes are masked to zero *after* centring, so they never enter the variance. The backward pass
writes dweight/dbias as one fp32 partial row per program (no atomics) that the launcher sums, so the
result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

# Single pass: narrow rows are packed up to ROWS_TILE elements per program (16 rows at most); a row wider
# than that is one program, up to FWD_TILE / BWD_TILE wide (half of FWD_TILE for 4-byte inputs, whose
# residual form would spill at 16,384); 8 elements per thread, 16 warps at most, except a row wider than
# 8192: 32 warps of 16 elements each (at 16 warps its residual form spills with Triton 3.6).
# Wider rows take the chunked path in CHUNK-wide pieces. Sized so that the sm_90a builds do not spill
# (python -m fusedtx.bench.resources layer_norm_gelu).
FWD_TILE = 16384
BWD_TILE = 4096
ROWS_TILE = 2048
CHUNK = 4096

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # tanh(|u|) = (1 - e) / (1 + e) with e = exp(-2|u|) in (0, 1]: no overflow, accurate near 0.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0.0, t, -t)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:  # exact GELU: z * Phi(z)
        y = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 2:  # tanh GELU
        y = 0.5 * z * (1.0 + _tanh((z + z * z * z * _TANH_C) * _SQRT_2_PI))
    elif ACT == 3:
        y = tl.maximum(z, 0.0)
    else:
        y = z
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 1:  # d/dz z*Phi(z) = Phi(z) + z*phi(z)
        d = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == 2:  # with t = tanh(u), u = c0 (z + c1 z^3): 0.5 (1 + t) + 0.5 z (1 - t^2) c0 (1 + 3 c1 z^2)
        t = _tanh((z + z * z * z * _TANH_C) * _SQRT_2_PI)
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_PI * (1.0 + z * z * (3.0 * _TANH_C))
    elif ACT == 3:
        d = tl.where(z > 0.0, 1.0, 0.0)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def _affine(xhat, W, B, cols, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    z = xhat
    if HAS_W:
        z = z * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        z = z + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _load_input(X, R, S, rows, cols, mask, N, stride_xm, stride_xn, stride_rm, stride_rn,
                HAS_RES: tl.constexpr):
    """x (+ residual) in fp32; with a residual the sum is rounded to the I/O dtype and stored to S."""
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * N + cols[None, :], s, mask=mask)
        x = s
    return x.to(tl.float32)


@triton.jit
def _layer_norm_gelu_fwd_kernel(
    X, R, W, B, Y, S, Mean, Rstd,
    M, N, stride_xm, stride_xn, stride_rm, stride_rn, eps,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    cols0 = tl.arange(0, BLOCK_N)
    if SINGLE:
        cmask = cols0 < N
        mask = rmask[:, None] & cmask[None, :]
        x = _load_input(X, R, S, rows, cols0, mask, N, stride_xm, stride_xn, stride_rm, stride_rn, HAS_RES)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        y = _act(_affine(xc * rstd[:, None], W, B, cols0, cmask, HAS_W, HAS_B), ACT)
        tl.store(Y + rows[:, None] * N + cols0[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Pass 1: mean (and the residual sum, stored to S and read back by the later passes).
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = rmask[:, None] & (cols < N)[None, :]
            acc += _load_input(X, R, S, rows, cols, mask, N, stride_xm, stride_xn, stride_rm, stride_rn,
                               HAS_RES)
        mean = tl.sum(acc, axis=1) / N
        if HAS_RES:
            src, stride_sm, stride_sn = S, N, 1
            tl.debug_barrier()  # S written above is read below by other threads of this program
        else:
            src, stride_sm, stride_sn = X, stride_xm, stride_xn
        # Pass 2: biased variance around the mean (centred, so no cancellation).
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(src + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask, other=0.0)
            xc = tl.where(mask, x.to(tl.float32) - mean[:, None], 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        # Pass 3: normalize, affine, activation.
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            cmask = cols < N
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(src + rows[:, None] * stride_sm + cols[None, :] * stride_sn, mask=mask, other=0.0)
            xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            y = _act(_affine(xhat, W, B, cols, cmask, HAS_W, HAS_B), ACT)
            tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _bwd_tile(DY, X, W, B, Mean, Rstd, rows, cols, rmask, cmask, N, stride_dym, stride_dyn,
              stride_xm, stride_xn, ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """For one tile: xhat, g = dy * act'(z) and dxhat = g * w (all zero on padded lanes)."""
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    mean = tl.load(Mean + rows, mask=rmask, other=0.0)
    rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    z = _affine(xhat, W, B, cols, cmask, HAS_W, HAS_B)
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
    g = dy.to(tl.float32) * _act_grad(z, ACT)
    dxhat = g
    if HAS_W:
        dxhat = g * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return xhat, g, dxhat, rstd


@triton.jit
def _store_dx(DX, DS, rows, cols, mask, dx, N, stride_dsm, stride_dsn, HAS_DS: tl.constexpr):
    if HAS_DS:  # the gradient reaching the returned residual sum joins dx
        ds = tl.load(DS + rows[:, None] * stride_dsm + cols[None, :] * stride_dsn, mask=mask, other=0.0)
        dx += ds.to(tl.float32)
    tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_gelu_bwd_kernel(
    DY, DS, X, W, B, Mean, Rstd, DX, DW, DB,
    M, N, stride_dym, stride_dyn, stride_dsm, stride_dsn, stride_xm, stride_xn,
    ACT: tl.constexpr, HAS_DS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    # X is what was normalized (x, or the residual sum). With xhat = (x - mean) * rstd and
    # dxhat = dy * act'(z) * w:  dx = rstd * (dxhat - xhat * mean(dxhat * xhat) - mean(dxhat)).
    # Program p handles row blocks p, p + P, p + 2P, ... and owns row p of the (P, N) partials DW, DB.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N
    if SINGLE:
        cmask = cols0 < N
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), nprog):
            rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            xhat, g, dxhat, rstd = _bwd_tile(DY, X, W, B, Mean, Rstd, rows, cols0, rmask, cmask, N,
                                             stride_dym, stride_dyn, stride_xm, stride_xn, ACT, HAS_W, HAS_B)
            c1 = tl.sum(dxhat * xhat, axis=1) / N
            c2 = tl.sum(dxhat, axis=1) / N
            dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            _store_dx(DX, DS, rows, cols0, rmask[:, None] & cmask[None, :], dx, N, stride_dsm, stride_dsn,
                      HAS_DS)
            dw += tl.sum(g * xhat, axis=0)
            db += tl.sum(g, axis=0)
        if HAS_W:
            tl.store(DW + part + cols0, dw, mask=cmask)
        if HAS_B:
            tl.store(DB + part + cols0, db, mask=cmask)
    else:
        for blk in range(pid, tl.cdiv(M, BLOCK_M), nprog):
            rows = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                xhat, g, dxhat, rstd = _bwd_tile(DY, X, W, B, Mean, Rstd, rows, cols, rmask, cols < N, N,
                                                 stride_dym, stride_dyn, stride_xm, stride_xn,
                                                 ACT, HAS_W, HAS_B)
                acc1 += dxhat * xhat
                acc2 += dxhat
            c1 = tl.sum(acc1, axis=1) / N
            c2 = tl.sum(acc2, axis=1) / N
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                cmask = cols < N
                xhat, g, dxhat, rstd = _bwd_tile(DY, X, W, B, Mean, Rstd, rows, cols, rmask, cmask, N,
                                                 stride_dym, stride_dyn, stride_xm, stride_xn,
                                                 ACT, HAS_W, HAS_B)
                dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                _store_dx(DX, DS, rows, cols, rmask[:, None] & cmask[None, :], dx, N, stride_dsm, stride_dsn,
                          HAS_DS)
                # This program's partial row is private to it: read-add-write is deterministic.
                if HAS_W:
                    dw = tl.load(DW + part + cols, mask=cmask, other=0.0)
                    tl.store(DW + part + cols, dw + tl.sum(g * xhat, axis=0), mask=cmask)
                if HAS_B:
                    db = tl.load(DB + part + cols, mask=cmask, other=0.0)
                    tl.store(DB + part + cols, db + tl.sum(g, axis=0), mask=cmask)


def _config(n: int, tile: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE, num_warps) for rows of width n and tiles of at most ``tile`` elements."""
    if n > tile:
        return 1, CHUNK, False, 8
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, ROWS_TILE // block_n))
    num_warps = max(1, min(16, block_m * block_n // 256)) if block_n <= 8192 else 32
    return block_m, block_n, True, num_warps


def fwd_tile(element_size: int) -> int:
    """The widest row the forward keeps in registers for inputs of ``element_size`` bytes."""
    return FWD_TILE if element_size <= 2 else FWD_TILE // 2


def _num_programs(device: torch.device, blocks: int) -> int:
    if device.type == "cuda":
        return min(blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(blocks, 4)  # interpreter: a few programs, so each still walks several row blocks


def layer_norm_gelu_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Forward on 2-D ``x`` (M, N) (any strides). Returns y (M, N), the residual sum (M, N) or None,
    and fp32 mean and rstd (M,)."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # nothing to normalize: no launch (the statistics of empty rows are never read)
        return y, s, mean.zero_(), rstd.zero_()
    block_m, block_n, single, num_warps = _config(n, fwd_tile(x.element_size()))
    r = residual if residual is not None else x
    _layer_norm_gelu_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, r, weight, bias, y, s, mean, rstd,
        m, n, x.stride(0), x.stride(1), r.stride(0), r.stride(1), eps,
        ACT=ACTIVATION_CODES[activation], HAS_RES=residual is not None,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=num_warps,
    )
    return y, s, mean, rstd


def layer_norm_gelu_bwd(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward on 2-D tensors: ``x`` is what the forward normalized (x, or the residual sum), ``ds``
    the gradient of the returned sum (or None). Returns dx (M, N) in x's dtype, dweight and dbias in
    their parameters' dtypes (None where there is no parameter)."""
    m, n = x.shape
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if x.numel() == 0:  # nothing to launch: dx is empty and the parameters' gradients are zeros
        return dx, *(torch.zeros_like(p) if p is not None else None for p in (weight, bias))
    block_m, block_n, single, num_warps = _config(n, BWD_TILE)
    programs = _num_programs(x.device, triton.cdiv(m, block_m))
    # Partials start at zero: the chunked path accumulates into them; a program with no rows adds nothing.
    dw = torch.zeros((programs, n), dtype=torch.float32, device=x.device) if weight is not None else None
    db = torch.zeros((programs, n), dtype=torch.float32, device=x.device) if bias is not None else None
    d = ds if ds is not None else dy
    _layer_norm_gelu_bwd_kernel[(programs,)](
        dy, d, x, weight, bias, mean, rstd, dx, dw, db,
        m, n, dy.stride(0), dy.stride(1), d.stride(0), d.stride(1), x.stride(0), x.stride(1),
        ACT=ACTIVATION_CODES[activation], HAS_DS=ds is not None,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=num_warps,
    )
    dweight = dw.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
