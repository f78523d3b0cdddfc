"""Sinusoidal position encodings: fusedtx vs the reference (eager and torch.compile) vs a stored table.

    python -m fusedtx.bench.bench_sinusoidal [--out DIR] [--quick]
    python -m pytest bench/bench_sinusoidal.py --benchmark-only   # pytest-benchmark

Modes (the ``mode`` column):

* ``generate 1d`` / ``generate 2d``: produce the (tokens, dim) encoding. Bytes counted: the table
  written. Peers: the reference in eager mode and under torch.compile, a precomputed table copied into
  a fresh tensor (what reading a stored table costs), and ``write ceiling: fill_`` (writing the same
  bytes with ``fill_``: the card's write bandwidth, so ``vs best peer`` on these rows reads as the
  fraction of it that fusedtx reaches).
* ``add 1d`` / ``add 2d``: ``x + PE`` for x (batch, tokens, dim). Bytes counted: x read and y written,
  so ``% ceiling`` is the fraction of the copy bandwidth. Peers: ``x + table`` with a precomputed table
  in eager mode and under torch.compile, and torch.compile of ``x + reference PE`` (inductor fuses the
  sines into the add).

Also writes ``sinusoidal_accuracy.md``: the largest error against float64 at positions just below
2^20 of fusedtx and of the float32 reference, eager and compiled.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

import fusedtx
from fusedtx import reference
from fusedtx.bench.harness import FUSEDTX, Table, bench_main, default_device, measure_ceilings, synchronized

# (tokens, dim) of the generated tables; (grid_h, grid_w, dim) for 2D.
GPU_GENERATE = [(4096, 1024), (65536, 4096)]
GPU_GENERATE_2D = [(64, 64, 1024)]
CPU_GENERATE = [(197, 64)]
CPU_GENERATE_2D = [(7, 9, 64)]
# (batch, tokens, dim) of x; for 2D (batch, grid, dim) with one class token.
GPU_ADD = [(256, 197, 768), (16, 4096, 1024), (1, 65536, 4096)]
GPU_ADD_2D = [(32, 64, 1024)]
CPU_ADD = [(2, 197, 64)]
CPU_ADD_2D = [(2, 7, 64)]


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _add_table(x, table):
    return x + table


def _generate_case(table: Table, mode: str, dtype, device, fused, ref, quick_cpu: bool) -> None:
    """Time the generation peers of one (mode, shape, dtype): ``fused()`` and ``ref(dtype)``."""
    out = fused()
    stored = out.clone()
    case = "x".join(str(s) for s in out.shape)
    nbytes = out.numel() * out.element_size()
    impls = {FUSEDTX: fused, "reference (eager)": lambda: ref(dtype), "stored table (clone)": stored.clone,
             "write ceiling: fill_": lambda: out.fill_(0.5)}
    if not quick_cpu:
        impls["torch.compile(reference)"] = lambda: _compiled(ref)(dtype)
    for impl, fn in impls.items():
        table.time(case, dtype, mode, impl, fn, nbytes)


def _add_case(table: Table, mode: str, x, fused, ref, pe, quick_cpu: bool) -> None:
    """Time the fused-add peers on x: ``fused(x)``, ``ref(x)`` (reference x + PE), ``x + pe``."""
    pe = pe.to(x.dtype)
    case = "x".join(str(s) for s in x.shape)
    impls = {FUSEDTX: lambda: fused(x), "x + table (eager)": lambda: x + pe}
    if not quick_cpu:
        impls["x + table (torch.compile)"] = lambda: _compiled(_add_table)(x, pe)
        impls["torch.compile(x + reference PE)"] = lambda: _compiled(ref)(x)
    for impl, fn in impls.items():
        table.time(case, x.dtype, mode, impl, fn, 2 * x.numel() * x.element_size())


def accuracy(out_dir: Path, device: torch.device, quick: bool) -> str:
    """Largest |error| against float64 at positions just below 2^20 (fp32 outputs); written as markdown."""
    n, dim = (256, 256) if quick or device.type != "cuda" else (4096, 1024)
    positions = 2**20 - torch.arange(n, device=device)
    exact = reference.sinusoidal_encoding(n, dim, positions, dtype=torch.float64)
    rows = {
        FUSEDTX: fusedtx.sinusoidal_encoding(n, dim, positions=positions),
        "reference float32 (eager)": reference.sinusoidal_encoding(n, dim, positions),
    }
    if not (quick and device.type == "cpu"):
        rows["torch.compile(reference) float32"] = _compiled(reference.sinusoidal_encoding)(n, dim, positions)
    lines = [f"## sinusoidal accuracy at positions 2^20 - {n} .. 2^20 - 1, dim {dim}, on {device}", "",
             "| impl | max abs error vs float64 |", "|---|---:|"]
    lines += [f"| {k} | {(v.double() - exact).abs().max().item():.2e} |" for k, v in rows.items()]
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sinusoidal_accuracy.md").write_text(text)
    return text


def run(out_dir, quick: bool = False, device: torch.device | None = None) -> Table:
    device = device or default_device()
    gpu = device.type == "cuda"
    quick_cpu = quick and not gpu  # no torch.compile peers: CI's quick run stays a few seconds
    out_dir = Path(out_dir)
    table = Table("sinusoidal", "GB/s", device, measure_ceilings(device))
    gen, gen2d, add, add2d = ((GPU_GENERATE, GPU_GENERATE_2D, GPU_ADD, GPU_ADD_2D) if gpu
                              else (CPU_GENERATE, CPU_GENERATE_2D, CPU_ADD, CPU_ADD_2D))
    if quick:
        gen, add = gen[:1], add[:1]
    for dtype in (torch.bfloat16, torch.float32) if gpu else (torch.float32,):
        for length, dim in gen:
            ref = functools.partial(reference.sinusoidal_encoding, length, dim, device=device)
            fused = functools.partial(fusedtx.sinusoidal_encoding, length, dim, dtype=dtype, device=device)
            _generate_case(table, "generate 1d", dtype, device, fused, lambda dt, r=ref: r(dtype=dt), quick_cpu)
        for gh, gw, dim in gen2d:
            ref = functools.partial(reference.sincos_2d, gh, gw, dim, device=device)
            fused = functools.partial(fusedtx.sincos_2d, gh, gw, dim, dtype=dtype, device=device)
            _generate_case(table, "generate 2d", dtype, device, fused, lambda dt, r=ref: r(dtype=dt), quick_cpu)
        for batch, seq, dim in add:
            x = torch.randn(batch, seq, dim, device=device, dtype=dtype)
            pe = reference.sinusoidal_encoding(seq, dim, device=device)
            _add_case(table, "add 1d", x, fusedtx.add_sinusoidal, reference.add_sinusoidal, pe, quick_cpu)
        for batch, grid, dim in add2d:
            x = torch.randn(batch, 1 + grid * grid, dim, device=device, dtype=dtype)
            pe = reference.sincos_2d(grid, grid, dim, num_prefix_tokens=1, device=device)
            fused = functools.partial(fusedtx.add_sincos_2d, grid_h=grid, grid_w=grid, num_prefix_tokens=1)
            ref = functools.partial(reference.add_sincos_2d, grid_h=grid, grid_w=grid, num_prefix_tokens=1)
            _add_case(table, "add 2d", x, fused, ref, pe, quick_cpu)
    table.write(out_dir)
    accuracy(out_dir, device, quick)
    return table


def test_sinusoidal(benchmark):
    """pytest-benchmark entry: the fused add on one representative shape."""
    device = default_device()
    shape, dtype = ((16, 4096, 1024), torch.bfloat16) if device.type == "cuda" else ((2, 197, 64), torch.float32)
    x = torch.randn(shape, device=device, dtype=dtype)
    benchmark(synchronized(lambda: fusedtx.add_sinusoidal(x), device))


def main(argv=None) -> None:
    out = bench_main(run, __doc__, argv)
    print((out / "sinusoidal_accuracy.md").read_text())


if __name__ == "__main__":
    main()
