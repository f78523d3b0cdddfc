"""fusedtx on a CPU against what a user runs there instead: every op, ViT-B and Swin-T at the mission's size,
and Swin V2-T (timm and Hugging Face) at 512 px.

    fusedtx bench cpu [--quick] [--out DIR]
    python -m fusedtx.bench.bench_cpu [--quick] [--out DIR]

For each case the stock way and the fusedtx way are timed interleaved in one process (stock, fusedtx,
stock, ... so that a thermal or background drift hits both alike), and the medians and their ratio
(stock / fusedtx: above 1 means fusedtx is faster) reported. Peak memory is the RSS high-water mark of
a fresh process that builds the case and runs it once, one process per (case, implementation), so
neither sees the other's allocations. fusedtx runs its fast PyTorch path (backend ``torch``, what
``auto`` takes on a CPU). ``--quick`` runs every case at a tiny size (so the bench cannot rot in CI).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fusedtx
from fusedtx.bench.harness import FUSEDTX, bench_main

STOCK = "stock"


def _ln_inputs(rows: int, n: int):
    return torch.randn(rows, n), torch.randn(n), torch.randn(n)


def layer_norm_gelu_case(quick: bool) -> dict[str, Callable[[], object]]:
    x, w, b = _ln_inputs(*((64, 96) if quick else (8192, 768)))
    n = x.shape[-1]
    return {STOCK: lambda: F.gelu(F.layer_norm(x, (n,), w, b)), FUSEDTX: lambda: fusedtx.layer_norm_gelu(x, w, b)}


def layer_norm_case(quick: bool) -> dict[str, Callable[[], object]]:
    x, w, b = _ln_inputs(*((64, 96) if quick else (8192, 768)))
    n = x.shape[-1]
    return {STOCK: lambda: F.layer_norm(x, (n,), w, b), FUSEDTX: lambda: fusedtx.layer_norm(x, w, b)}


def attention_case(quick: bool) -> dict[str, Callable[[], object]]:
    q, k, v = (torch.randn((1, 2, 64, 32) if quick else (1, 12, 4096, 64)) for _ in range(3))
    return {STOCK: lambda: F.scaled_dot_product_attention(q, k, v), FUSEDTX: lambda: fusedtx.attention(q, k, v)}


def attention_bias_case(quick: bool) -> dict[str, Callable[[], object]]:
    b, h, n, d = (2, 2, 33, 32) if quick else (4, 12, 577, 64)
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    bias = torch.randn(1, h, n, n)
    return {STOCK: lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
            FUSEDTX: lambda: fusedtx.attention(q, k, v, bias=bias)}


def add_sincos_2d_case(quick: bool) -> dict[str, Callable[[], object]]:
    grid, dim = (4, 32) if quick else (64, 768)
    x = torch.randn(1, 1 + grid * grid, dim)
    table = fusedtx.reference.sincos_2d(grid, grid, dim, num_prefix_tokens=1)  # the stock way: a cached table
    return {STOCK: lambda: x + table, FUSEDTX: lambda: fusedtx.add_sincos_2d(x, grid, grid, 1)}


def _swapped(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    fused = copy.deepcopy(model)
    fusedtx.swap(fused)
    return fused


def _model_case(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    model = model.eval()
    return {STOCK: lambda: model(x), FUSEDTX: (lambda fused: lambda: fused(x))(_swapped(model))}


def swin_block_case(quick: bool) -> dict[str, Callable[[], object]]:
    from timm.models.swin_transformer import SwinTransformerBlock

    size, dim, heads = (16, 32, 2) if quick else (256, 96, 3)
    block = SwinTransformerBlock(dim, (size, size), num_heads=heads, window_size=7, shift_size=3)
    return _model_case(block, torch.randn(1, size, size, dim))


def _timm_case(name: str, quick: bool, size: int = 1024) -> dict[str, Callable[[], object]]:
    import timm

    if quick:
        name = {"vit_base_patch16_224": "vit_tiny_patch16_224"}.get(name, name)
    size = 64 if quick else size
    kwargs = {"depths": (1, 1, 1, 1), "embed_dim": 24, "num_heads": (1, 1, 1, 1)} if quick and "swin" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size, **kwargs)
    return _model_case(model, torch.randn(1, 3, size, size))


def _hf_swin_v2_case(quick: bool) -> dict[str, Callable[[], object]]:
    from transformers import Swinv2Config, Swinv2Model

    size = 64 if quick else 512
    kwargs = {"depths": [1, 1, 1, 1], "embed_dim": 24, "num_heads": [1, 1, 1, 1]} if quick else {}
    torch.manual_seed(0)
    model = Swinv2Model(Swinv2Config(image_size=size, window_size=8, **kwargs))
    return _model_case(model, torch.randn(1, 3, size, size))


CASES: dict[str, Callable[[bool], dict[str, Callable[[], object]]]] = {
    "layer_norm_gelu 8192x768 vs F.gelu(F.layer_norm(x))": layer_norm_gelu_case,
    "layer_norm 8192x768 vs F.layer_norm": layer_norm_case,
    "attention 1x12x4096x64 vs SDPA": attention_case,
    "attention 4x12x577x64, (1,12,577,577) bias vs SDPA attn_mask": attention_bias_case,
    "add_sincos_2d 4097x768 vs adding a cached table": add_sincos_2d_case,
    "timm SwinTransformerBlock 256x256x96, window 7, shift 3": swin_block_case,
    "timm ViT-B/16 at 1024 px (4096 patches), batch 1": lambda quick: _timm_case("vit_base_patch16_224", quick),
    "timm Swin-T at 1024 px, batch 1": lambda quick: _timm_case("swin_tiny_patch4_window7_224", quick),
    "timm Swin V2-T (window 8) at 512 px, batch 1": lambda quick: _timm_case("swinv2_tiny_window8_256", quick, 512),
    "Hugging Face Swinv2Model (tiny, window 8) at 512 px, batch 1": _hf_swin_v2_case,
}


def time_interleaved(fns: dict[str, Callable[[], object]], budget_s: float, min_reps: int) -> dict[str, float]:
    """Median ms of each callable, the callables taking turns (after one warm-up call each), for as many
    rounds as fit in ``budget_s`` (at least ``min_reps``, at most 200): short ops get enough rounds for a
    stable median. Every other round runs them in reverse order, so that neither always follows the other
    (the one that runs second inherits the first's freed memory and idle threads)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        round_s = time.perf_counter() - t0
        reps = max(min_reps, min(200, int(budget_s / max(round_s, 1e-6))))
        for rep in range(reps):
            for name, fn in (fns.items() if rep % 2 == 0 else reversed(fns.items())):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_mb(case: str, impl: str, quick: bool) -> float:
    """The RSS high-water mark (MiB) of a fresh process that builds ``case`` and runs ``impl`` once."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child would report its parent's peak.
    code = ("import sys, torch, fusedtx\n"
            "from fusedtx.bench import bench_cpu as b\n"
            "from fusedtx.profile import PeakMemory\n"
            "case, impl, quick = sys.argv[1], sys.argv[2], sys.argv[3] == '1'\n"
            "with fusedtx.use_backend('torch'), torch.inference_mode():\n"
            "    b.CASES[case](quick)[impl]()\n"
            "print(PeakMemory(torch.device('cpu')).read())")
    out = subprocess.run([sys.executable, "-c", code, case, impl, "1" if quick else "0"], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@dataclass
class CpuTable:
    """The CPU bench's rows: one per (case, implementation) with its median ms and peak RSS."""

    name: str = "cpu"
    rows: list[dict] = field(default_factory=list)

    def pairs(self) -> list[tuple[str, dict, dict]]:
        by_case: dict[str, dict[str, dict]] = {}
        for r in self.rows:
            by_case.setdefault(r["case"], {})[r["impl"]] = r
        return [(case, d[STOCK], d[FUSEDTX]) for case, d in by_case.items()]

    def markdown(self) -> str:
        lines = [
            f"## fusedtx on the CPU ({torch.get_num_threads()} threads, torch {torch.__version__}, fp32)",
            "",
            "Interleaved medians; ratio = stock / fusedtx (above 1: fusedtx is faster); peak RSS of a fresh "
            "process per case and implementation. fusedtx backend: torch (what `auto` takes on a CPU).",
            "",
            "| case | stock ms | fusedtx ms | ratio | stock peak RSS MiB | fusedtx peak RSS MiB | RSS ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for case, s, f in self.pairs():
            rss = (f"{s['peak_mb']:.0f} | {f['peak_mb']:.0f} | {f['peak_mb'] / s['peak_mb']:.3f}"
                   if math.isfinite(s["peak_mb"]) else "not measured (--quick) | | ")
            lines.append(f"| {case} | {s['ms']:.2f} | {f['ms']:.2f} | {s['ms'] / f['ms']:.2f} | {rss} |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{self.name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "impl", "ms", "peak_mb"])
            w.writeheader()
            w.writerows(self.rows)
        md = out_dir / f"{self.name}.md"
        md.write_text(self.markdown())
        (out_dir / f"{self.name}.json").write_text(json.dumps(self.rows, indent=1))
        self._plot(out_dir / f"{self.name}.png")
        return md

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pairs = self.pairs()
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(pairs) + 1.5))
        ax.barh([c for c, _, _ in pairs], [s["ms"] / f["ms"] for _, s, f in pairs])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("stock time / fusedtx time (CPU)")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def run(out_dir: Path | str, quick: bool = False, device: torch.device | None = None) -> CpuTable:
    """Time and measure every case on the CPU (``device`` must be the CPU) and write cpu.md/.csv/.png."""
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"device must be the CPU for the CPU bench, got {device}")
    table = CpuTable()
    for case, make in CASES.items():
        with fusedtx.use_backend("torch"):
            fns = make(quick)
            ms = time_interleaved(fns, budget_s=0.5 if quick else 12.0, min_reps=3 if quick else 8)
            del fns
        # A fresh process per (case, implementation) takes seconds: --quick measures the first case only.
        measured = not quick or not table.rows
        for impl in (STOCK, FUSEDTX):
            peak = peak_rss_mb(case, impl, quick) if measured else math.nan
            table.rows.append({"case": case, "impl": impl, "ms": ms[impl], "peak_mb": peak})
        print(f"{case}: stock {ms[STOCK]:.2f} ms, fusedtx {ms[FUSEDTX]:.2f} ms", file=sys.stderr, flush=True)
    table.write(Path(out_dir))
    return table


def main(argv=None) -> None:
    out = bench_main(run, __doc__, argv)
    print((out / "cpu.md").read_text())


if __name__ == "__main__":
    main()
