"""Plain PyTorch references of every fusedtx op.

Each function here is written straight from its formula. It is the specification the Triton kernels
are judged against (the tests call it on float64 inputs), and the fallback the ops take where Triton
cannot run. Half-precision inputs are computed in float32 and the result is cast back, as the kernels
do; float64 inputs stay in float64.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------------
# layer_norm_gelu
# --------------------------------------------------------------------------------------------------

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """``none``: z; ``gelu``: z·Φ(z) (exact, erf); ``gelu_tanh``: the tanh approximation; ``relu``."""
    if name == "none":
        return z
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if name == "relu":
        return torch.clamp_min(z, 0.0)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(biased variance + eps) over the last dimension, shapes ``x.shape[:-1]``."""
    mean = x.mean(dim=-1)
    var = ((x - mean.unsqueeze(-1)) ** 2).mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def layer_norm_gelu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``act(LayerNorm(x [+ residual]))`` over the last dimension.

    Shapes: ``x`` and ``residual`` (..., N); ``weight`` and ``bias`` (N,) or ``None``.
    With a residual, the sum ``s = x + residual`` is formed in the dtype of ``x`` (as ``x + residual``
    in PyTorch would), normalized, and returned too: ``(y, s)``. Without, returns ``y``.
    ``y`` has the dtype of ``x``.
    """
    s = x if residual is None else x + residual
    t = s.to(compute_dtype(x.dtype))
    mean, rstd = layer_norm_stats(t, eps)
    z = (t - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        z = z * weight.to(t.dtype)
    if bias is not None:
        z = z + bias.to(t.dtype)
    y = apply_activation(z, activation).to(x.dtype)
    return y if residual is None else (y, s)
