"""What the kernels cover and how they lay out their outputs, importable without Triton.

The ops layer asks these questions before it picks a backend (``fusedtx.ops``), and the launchers obey
the same limits; keeping them here, beside the kernels, means the two never drift apart.
"""

from __future__ import annotations

import os

import torch

FAMILIES = ("attention", "layer_norm_gelu", "sinusoidal", "window_attention", "highres")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

ATTENTION_MAX_HEAD_DIM = 256
WINDOW_MAX_TOKENS = 256  # window areas the kernels cover: Swin's 7x7 up to 16x16
WINDOW_MAX_HEAD_DIM = 128
# The 2D sin-cos kernel finds a patch's grid row with an fp32 reciprocal, exact for fewer cells than this.
SINCOS_2D_MAX_CELLS = 1 << 22
# highres: the scoring kernel holds one patch's pixels of one channel (patch sides up to this); the matching
# kernel holds whole rows of the compared features (dims up to this).
HIGHRES_MAX_PATCH = 64
HIGHRES_MAX_MATCH_DIM = 1024
# Offsets inside one (batch, head) slice, or one image, are 32-bit in the kernels.
MAX_SPAN = 2**31


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def span(t: torch.Tensor, dims: int) -> int:
    """The largest element offset reached inside the last ``dims`` dimensions of ``t`` through its strides."""
    return sum((n - 1) * s for n, s in zip(t.shape[-dims:], t.stride()[-dims:], strict=True))


# Shared memory of the float32 window backward with a 256-query tile (windows of 129 to 256 tokens) at head
# dim 32, as built for sm_89 by Triton 3.8 (bench/results/resources-sm_89.md): over the 99 KiB of sm_86/89/120.
WINDOW_FP32_WIDE_BACKWARD_SHARED = 135168


def window_fp32_backward_covers(tokens: int, head_dim: int, shared_limit: int | None = None) -> bool:
    """Whether the float32 window backward kernel covers windows of ``tokens`` at ``head_dim`` on a target
    with ``shared_limit`` bytes of shared memory per block (None: no limit, Triton's interpreter). Its tiles
    hold every query of a window, and in fp32 larger ones outgrow a GPU's shared memory."""
    if tokens > 64 and head_dim > 32:
        return False
    return tokens <= 128 or shared_limit is None or shared_limit >= WINDOW_FP32_WIDE_BACKWARD_SHARED


def dot_precision(dtype: torch.dtype) -> str:
    """Triton's dot input precision for operands of ``dtype``: the ``PRECISION`` constexpr the attention
    launchers pass to their kernels, read at every launch (so a changed switch compiles the other variant).

    float32 follows PyTorch's own switch for float32 matmuls, as stock attention does:
    ``torch.backends.cuda.matmul.allow_tf32`` (also set through ``torch.backends.cuda.matmul.fp32_precision``
    and ``torch.set_float32_matmul_precision``) gives "tf32" when on and "ieee" (full float32) when off,
    PyTorch's default. float16 / bfloat16 operands take Triton's default (the precision applies to float32
    only)."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; reading allow_tf32 may raise there
    if precision is None:
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":  # not set for matmul: the global setting decides
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return "tf32" if precision == "tf32" else "ieee"


def full_float32(dtype: torch.dtype, precision: str | None = None) -> bool:
    """Whether a launch on ``dtype`` operands runs full-float32 ("ieee") dots, which take their own launch
    configs: float32 with ``precision`` "ieee" (None: what a launch now takes, :func:`dot_precision`)."""
    return dtype == torch.float32 and (precision or dot_precision(dtype)) == "ieee"


def dtype_tag(dtype: torch.dtype) -> str:
    """How launch configs name operands of ``dtype``: torch's name, and for float32 its dot precision too
    ("float32-ieee", "float32-tf32"), whose builds differ (FMA loops against tensor cores) and take their own
    configs."""
    name = str(dtype).removeprefix("torch.")
    return f"{name}-{dot_precision(dtype)}" if dtype == torch.float32 else name


def empty_bnhd(shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor laid out (B, N, H, D) in memory: the layout the attention kernels write
    (so merging heads afterwards, ``.transpose(1, 2).reshape(B, N, H * D)``, is free). Every backend returns
    it, so the custom op's fake can promise it."""
    b, h, n, d = shape
    return torch.empty((b, n, h, d), dtype=like.dtype, device=like.device).transpose(1, 2)


# Per-block shared-memory limits (the opt-in maximum, bytes) of the compile targets the configs are checked for,
# by compute capability; the launch configs of an architecture family fit the smallest limit of its members.
SHARED_MEMORY_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                           120: 99 * 1024}
# Architecture families with their own launch configs. Unknown architectures get the most conservative one.
ARCH_FAMILIES = ("ampere", "hopper", "blackwell", "blackwell_consumer")
CONSERVATIVE_FAMILY = "ampere"


def shared_memory_per_block(capability: tuple[int, int]) -> int:
    """The per-block shared-memory limit of a compute capability; the smallest known one when unlisted."""
    return SHARED_MEMORY_PER_BLOCK.get(capability[0] * 10 + capability[1], min(SHARED_MEMORY_PER_BLOCK.values()))


def arch_family(capability: tuple[int, int]) -> str:
    """The config family of a compute capability: "ampere" (sm_80 to sm_89: Ampere and Ada), "hopper" (sm_90),
    "blackwell" (sm_100, sm_103: datacenter), "blackwell_consumer" (sm_120, sm_121); anything else the most
    conservative family (99 KiB of shared memory, no Hopper or Blackwell tensor-core instructions)."""
    major = capability[0]
    return {8: "ampere", 9: "hopper", 10: "blackwell", 12: "blackwell_consumer"}.get(major, CONSERVATIVE_FAMILY)
