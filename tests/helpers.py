"""Comparison helpers: every kernel output is judged against the float64 reference."""

import torch

from tests.conftest import ON_CUDA

# ||out - ref|| / ||ref|| bounds per dtype (DESIGN.md); fp32 leaves room for tf32 dots where a test says so.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
# float32 on CUDA runs tf32 dot products (~3e-4 per product; the backward chains several of them).
TF32_TOLERANCE = 1e-3


def dot_tolerance(dtype: torch.dtype) -> float:
    """The bound for a result built from dot products: tf32's on CUDA for float32, else TOLERANCE."""
    return TF32_TOLERANCE if ON_CUDA and dtype == torch.float32 else TOLERANCE[dtype]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere in out gives NaN (which never passes)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str = "output", tol=None):
    """Shape equal, every element finite, relative error within the dtype's bound."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
    bound = tol if tol is not None else TOLERANCE[dtype]
    err = rel_error(out, ref)
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"
