"""Comparison helpers: every kernel output is judged against the float64 reference.

Two criteria, both applied by :func:`assert_close`:

* the norm-relative error ‖out − ref‖ / ‖ref‖ <= bound, the dtype's bound (DESIGN.md);
* a per-row bound: each row (along the last dimension) has ‖out_r − ref_r‖ / max(‖ref_r‖, RMS of the
  row norms) <= ROW_FACTOR · bound. The norm criterion alone cannot see one wrong row among thousands:
  a row of 4097 carries 1/64 of the norm, so the tail row of an N = 4097 output could be entirely wrong
  (zeros, or half its value) within bf16's bound. A row's own norm is floored at the RMS row norm, so
  rows that are nearly zero (a causal first query's dq, say) are held to the scale of the tensor, not to
  their own rounding noise.

NaN never passes either criterion.
"""

import math

import torch

from fusedtx import reference
from fusedtx.check import BOUNDS, TF32_BOUND
from tests.conftest import ON_CUDA

# ||out - ref|| / ||ref|| bounds per dtype (DESIGN.md), the ones `fusedtx check` applies on a user's device;
# fp32 leaves room for tf32 dots where a test says so.
TOLERANCE = {**BOUNDS, torch.float64: 1e-12}
# An ill-conditioned gradient (a sum with cancellation, e.g. Swin V2's logit scale) may err this many times what
# the stock module, or the PyTorch computation of the same formula, errs on the same inputs, or what the float64
# reference's gradient moves when the inputs move by an ulp, where that is larger.
STOCK_FACTOR = 4
# float32 on CUDA runs tf32 dot products (~3e-4 per product; the backward chains several of them).
TF32_TOLERANCE = TF32_BOUND
# One row may err ROW_FACTOR times the tensor's bound, relative to max(its norm, the RMS row norm).
# Rounding noise spreads over the rows: across the suite the worst row stays within a few times the
# whole tensor's error (short rows, e.g. a bias table's rows of 1 or 2 heads, scatter most). A wrong row
# errs by a sizeable fraction of its own norm: at bf16's bound, 8 catches any row off by more than 13%.
ROW_FACTOR = 8.0


def dot_tolerance(dtype: torch.dtype) -> float:
    """The bound for a result built from dot products: tf32's on CUDA for float32, else TOLERANCE."""
    return TF32_TOLERANCE if ON_CUDA and dtype == torch.float32 else TOLERANCE[dtype]


# How many times a PyTorch computation's rounding error is sampled where a bound is STOCK_FACTOR times it: the
# inputs as they are, then moved by an ulp (ulp_moved). Its error on one draw scatters over an order of magnitude
# on an ill-conditioned gradient: against the largest of 3, the float32 cosine window test failed in 1 of 120
# fresh inputs (its kernel's logit-scale error is typically 0.3-0.45x the fast path's); against the largest of
# 8, in none of 200.
ROUNDING_DRAWS = 8


def ulp_moved(t: torch.Tensor) -> torch.Tensor:
    """``t`` with each element moved to a neighbouring value of its dtype or left, by a fair three-way draw: the
    same inputs rounded differently, to sample a computation's rounding noise again."""
    draw = torch.randint(0, 3, t.shape, device=t.device)
    return torch.where(draw == 0, t, torch.nextafter(t, torch.where(draw == 1, math.inf, -math.inf).to(t)))


# How close to a ReLU's kink a LayerNorm output may lie in a ReLU test, and how far a bias column moves away.
KINK_MARGIN, KINK_STEP = 1e-4, 0.01


def away_from_relu_kink(s: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``bias`` with each column where some row of the LayerNorm output z = xhat·weight + bias of ``s`` lies
    within KINK_MARGIN of 0 moved by KINK_STEP (in bias's dtype), until none does. At the kink a ReLU's derivative
    jumps from 0 to 1, and a float32 z and the float64 reference's fall on either side when z is within rounding
    of 0: their gradients then differ by a whole element, on any correct implementation (z = 2.7e-8 did)."""
    mean, rstd = reference.layer_norm_stats(s.detach().double(), eps)
    xhat = (s.detach().double() - mean[..., None]) * rstd[..., None]
    xhat = xhat * weight.detach().double() if weight is not None else xhat
    for _ in range(8):
        near = ((xhat + bias.detach().double()).abs() < KINK_MARGIN).reshape(-1, s.shape[-1]).any(0)
        if not near.any():
            return bias
        bias = torch.where(near, bias + KINK_STEP, bias)
    raise AssertionError("a bias column stays within KINK_MARGIN of a ReLU's kink")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).cpu()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the norm-only criterion); NaN anywhere in out gives NaN (which
    never passes)."""
    out64, ref64 = _f64(out), _f64(ref)
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row along the last dimension, ‖out_r − ref_r‖ / max(‖ref_r‖, RMS of the rows' ‖ref_r‖), in
    float64, as a 1-D tensor (a 0-d or 1-D tensor is one row); NaN in a row gives NaN there."""
    out64, ref64 = _f64(out), _f64(ref)
    cols = ref64.shape[-1] if ref64.dim() > 0 else 1
    if ref64.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    diff, ref_rows = (out64 - ref64).reshape(-1, cols), ref64.reshape(-1, cols)
    norms = ref_rows.norm(dim=1)
    floor = norms.square().mean().sqrt().clamp_min(1e-30)
    return diff.norm(dim=1) / torch.maximum(norms, floor)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "output", tol=None):
    """Shape equal, every element finite, relative error within the dtype's bound (or ``tol``), and every
    row within ROW_FACTOR times it (see the module docstring)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
    bound = tol if tol is not None else TOLERANCE[dtype]
    err = rel_error(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"
    rows = row_errors(out, ref)
    if rows.numel():
        worst = int(rows.argmax())  # NaN is the argmax where there is one
        row_err = rows[worst].item()
        assert row_err <= ROW_FACTOR * bound, (
            f"{name}: row {worst} of {rows.numel()} (last dim {out.shape[-1] if out.dim() else 1}) has relative "
            f"error {row_err:.3e} > {ROW_FACTOR:g} x {bound:.1e} ({dtype}; whole tensor {err:.3e})"
        )
