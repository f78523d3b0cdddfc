"""Attention: fusedtx vs F.scaled_dot_product_attention (each backend: flash, efficient, cuDNN, math),
FlexAttention (compiled), the eager reference and torch.compile of the reference.

    python -m fusedtx.bench.bench_attention [--out DIR] [--quick]
    python -m pytest bench/bench_attention.py --benchmark-only   # pytest-benchmark

FLOPs counted: 4·B·H·Nq·Nk·D for the forward (q·kᵀ and p·v), 2.5 times that for the backward
(fwd+bwd = 3.5x), halved for causal. Peak memory is what one call allocates above its inputs.
A peer that cannot run a case (a backend missing on the card, a mask it does not take, out of
memory) shows as n/a with its error.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fusedtx
from fusedtx import reference
from fusedtx.bench.harness import FUSEDTX, Table, bench_main, default_device, measure_ceilings, synchronized

# (name, B, H, N, D, bias, causal): the shapes, the headline case first (the table is rewritten
# after every case, so a run stopped by a time limit still leaves the cases it finished).
GPU_CASES = [
    ("ViT-B/16 1024", 8, 12, 4096, 64, False, False),
    ("N=4096 +(1,H,N,N) bias", 8, 12, 4096, 64, True, False),
    ("ViT-B/16 224", 64, 12, 197, 64, False, False),
    ("ViT-L/16 224", 32, 16, 197, 64, False, False),
    ("ViT-H/14 224", 32, 16, 257, 80, False, False),
    ("long causal", 2, 16, 8192, 128, False, True),
]
CPU_CASES = [("tiny", 1, 2, 40, 32, False, False), ("tiny +bias", 1, 2, 40, 32, True, False)]

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _sdpa(backend):
    def run(q, k, v, bias, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)

    return run


@functools.cache
def _compiled_reference():
    return torch.compile(reference.attention)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(q, k, v, bias, causal):
    score_mod = None
    if bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[0, h, q_idx, kv_idx]
    block_mask = _causal_block_mask(q.shape[2], q.device) if causal else None
    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)


@functools.cache
def _causal_block_mask(n: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n, device=device)


def implementations(device: torch.device) -> dict:
    """The peers that make sense on ``device`` (compiled peers and the CUDA-only backends on GPU only)."""
    impls = {FUSEDTX: lambda q, k, v, bias, causal: fusedtx.attention(q, k, v, bias=bias, causal=causal)}
    gpu = device.type == "cuda"
    for name, backend in SDPA_BACKENDS.items():
        if gpu or name in ("flash", "math"):
            impls[f"SDPA {name}"] = _sdpa(backend)
    if gpu:
        impls["FlexAttention (compiled)"] = _flex
    impls["reference eager"] = lambda q, k, v, bias, causal: reference.attention(q, k, v, bias, causal=causal)
    if gpu:
        impls["torch.compile(reference)"] = lambda q, k, v, bias, causal: _compiled_reference()(
            q, k, v, bias, causal=causal
        )
    return impls


def _step(fn, q, k, v, bias, causal, do, backward: bool):
    if not backward:
        def infer():
            with torch.no_grad():
                return fn(q, k, v, bias, causal)

        return infer

    def run():
        for t in (q, k, v, bias):
            if t is not None:
                t.grad = None
        fn(q, k, v, bias, causal).backward(do)

    return run


def flops(b: int, h: int, n: int, d: int, causal: bool, backward: bool) -> float:
    fwd = 4 * b * h * n * n * d / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def run(out_dir, quick: bool = False, device: torch.device | None = None) -> Table:
    device = device or default_device()
    gpu = device.type == "cuda"
    table = Table("attention", "TFLOP/s", device, measure_ceilings(device))
    cases = GPU_CASES if gpu else CPU_CASES
    if quick:
        cases = cases[:1]
    dtype = torch.bfloat16 if gpu else torch.float32
    for name, b, h, n, d, has_bias, causal in cases:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, h, n, n, device=device, dtype=dtype, requires_grad=True) if has_bias else None
        do = torch.randn_like(q)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            for impl, fn in implementations(device).items():
                table.time(f"{name} B={b} H={h} N={n} D={d}", dtype, mode, impl,
                           _step(fn, q, k, v, bias, causal, do, backward), flops(b, h, n, d, causal, backward),
                           memory=True)
        del q, k, v, bias, do
        table.write(out_dir)
    return table


def test_attention(benchmark):
    """pytest-benchmark entry: one representative shape, fused forward."""
    device = default_device()
    b, h, n, d = (8, 12, 4096, 64) if device.type == "cuda" else (1, 2, 40, 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    benchmark(synchronized(lambda: fusedtx.attention(q, k, v), device))


def main(argv=None) -> None:
    bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
