"""LayerNorm+GELU: fusedtx vs torch eager (nn.LayerNorm then GELU) vs torch.compile of the reference
(vs apex's FusedLayerNorm then GELU where apex is installed).

    python -m fusedtx.bench.bench_layer_norm_gelu [--out DIR] [--quick]
    python -m pytest bench/bench_layer_norm_gelu.py --benchmark-only   # pytest-benchmark

Bytes counted: forward reads x and writes y (2·M·N elements; weight and bias are negligible);
forward+backward adds reading x and dy and writing dx (5·M·N elements in all).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fusedtx
from fusedtx import reference
from fusedtx.bench.harness import FUSEDTX, Table, bench_main, default_device, measure_ceilings, synchronized

GPU_HIDDEN = (768, 1024, 4096, 8192, 16384)
GPU_ROWS = (4096, 16384, 65536)
CPU_HIDDEN = (96, 768)
CPU_ROWS = (64,)


def _eager(x, w, b):
    return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b, 1e-5))


@functools.cache
def _compiled():
    return torch.compile(functools.partial(reference.layer_norm_gelu, eps=1e-5, activation="gelu"))


def implementations() -> dict:
    impls = {
        FUSEDTX: lambda x, w, b: fusedtx.layer_norm_gelu(x, w, b),
        "torch eager": _eager,
        "torch.compile(reference)": lambda x, w, b: _compiled()(x, w, b),
    }
    try:
        from apex.normalization import fused_layer_norm as apex_ln

        impls["apex FusedLayerNorm + GELU"] = lambda x, w, b: F.gelu(
            apex_ln.fused_layer_norm_affine(x, w, b, (x.shape[-1],), 1e-5)
        )
    except ImportError:
        pass
    return impls


def _step(fn, x, w, b, dy, backward: bool):
    if not backward:
        return lambda: fn(x, w, b)

    def run():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(dy)

    return run


def run(out_dir, quick: bool = False, device: torch.device | None = None) -> Table:
    device = device or default_device()
    gpu = device.type == "cuda"
    table = Table("layer_norm_gelu", "GB/s", device, measure_ceilings(device))
    hidden, rows = (GPU_HIDDEN, GPU_ROWS) if gpu else (CPU_HIDDEN, CPU_ROWS)
    if quick:  # one width: each new width recompiles the torch.compile peer
        hidden, rows = hidden[:1], rows[:1]
    dtypes = (torch.bfloat16, torch.float16) if gpu else (torch.float32,)
    for dtype in dtypes:
        for n in hidden:
            for m in rows:
                x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
                w = (1 + 0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
                b = (0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_()
                dy = torch.randn_like(x)
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    nbytes = (5 if backward else 2) * m * n * x.element_size()
                    for impl, fn in implementations().items():
                        table.time(f"{m}x{n}", dtype, mode, impl, _step(fn, x, w, b, dy, backward), nbytes)
    table.write(out_dir)
    return table


def test_layer_norm_gelu(benchmark):
    """pytest-benchmark entry: one representative shape, fused forward."""
    device = default_device()
    n, m = (4096, 16384) if device.type == "cuda" else (768, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(m, n, device=device, dtype=dtype)
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    benchmark(synchronized(lambda: fusedtx.layer_norm_gelu(x, w, b), device))


def main(argv=None) -> None:
    bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
