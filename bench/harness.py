"""Shared benchmark harness: timing, the card's measured ceilings, and result tables.

A bench file builds a :class:`Table`, calls :meth:`Table.time` for fusedtx and each peer on each case,
and :meth:`Table.write` leaves ``<name>.md``, ``<name>.csv`` and ``<name>.png`` in the output folder.
On CUDA, times are medians of CUDA-event timings (``triton.testing.do_bench``); on the CPU, medians of
wall-clock repeats, so the benches run anywhere (CI runs them at tiny sizes so they cannot rot).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

FUSEDTX = "fusedtx"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_out_dir() -> Path:
    """``$OUT`` when set (the GPU machine's result folder), else ``fusedtx-bench`` in the current folder
    (the installed package is no place for results; commit GPU results under the repository's
    ``bench/results/``)."""
    out = os.environ.get("OUT")
    return Path(out) if out else Path("fusedtx-bench")


def bench_main(run: Callable[..., Table], doc: str | None, argv: list[str] | None = None) -> Path:
    """The command line every bench module shares: ``--out DIR`` and ``--quick``; returns the folder."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: $OUT or ./fusedtx-bench)")
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else default_out_dir()
    table = run(out, args.quick)
    print(f"wrote {table.name}.md, .csv and .png under {out}")
    return out


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of one call of ``fn`` (after warm-up, which also triggers compilation)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronization, so that a timer around it (pytest-benchmark's) measures
    the work, not its launch."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak CUDA memory allocated above the starting point during one call (NaN on the CPU)."""
    if device.type != "cuda":
        return math.nan
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The card's measured copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s).

    Read from ``$FUSEDTX_CEILINGS`` (a JSON file ``bench/gpu_check.sh`` writes once) when set;
    measured otherwise. On the CPU both are measured too, at small sizes, in float32: what the CPU benches
    run in (a CPU's bf16 matmul rate would put fp32 rows far above "100%").
    """
    path = os.environ.get("FUSEDTX_CEILINGS")
    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    big = device.type == "cuda"
    n = (1 << 28) if big else (1 << 22)  # 512 MiB of bf16 on the GPU
    dtype = torch.bfloat16 if big else torch.float32
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device)
    k = 8192 if big else 512
    a = torch.randn(k, k, device=device, dtype=dtype)
    b = torch.randn(k, k, device=device, dtype=dtype)
    mm_ms = time_ms(lambda: a @ b, device)
    return {
        "copy_gbps": 2 * src.numel() * src.element_size() / copy_ms / 1e6,
        "matmul_tflops": 2 * k**3 / mm_ms / 1e9,
        "device": torch.cuda.get_device_name(device) if big else "cpu",
    }


@dataclass
class Table:
    """Rows of one bench: a case (shape, dtype, mode) timed for fusedtx and its peers.

    ``metric`` is ``"GB/s"`` (``work`` = bytes moved, ceiling ``copy_gbps``) or ``"TFLOP/s"``
    (``work`` = FLOPs, ceiling ``matmul_tflops``).
    """

    name: str
    metric: str
    device: torch.device
    ceilings: dict[str, float]
    rows: list[dict] = field(default_factory=list)

    def time(self, case: str, dtype: torch.dtype, mode: str, impl: str, fn: Callable[[], object],
             work: float, memory: bool = False) -> dict:
        """Time ``fn`` and record a row. A peer that fails (unsupported on this card or torch build) is
        recorded as n/a with its reason; a fusedtx failure is an error and propagates."""
        row = {"case": case, "dtype": str(dtype).removeprefix("torch."), "mode": mode, "impl": impl}
        try:
            ms = time_ms(fn, self.device)
            row["ms"] = ms
            row["peak_mb"] = peak_memory_mb(fn, self.device) if memory else math.nan
        except Exception as exc:
            if impl == FUSEDTX:
                raise
            row.update(ms=math.nan, peak_mb=math.nan, error=f"{type(exc).__name__}: {str(exc)[:80]}")
        scale = 1e6 if self.metric == "GB/s" else 1e9
        row["rate"] = work / row["ms"] / scale if row["ms"] == row["ms"] else math.nan
        ceiling = self.ceilings["copy_gbps" if self.metric == "GB/s" else "matmul_tflops"]
        row["pct_ceiling"] = 100 * row["rate"] / ceiling
        self.rows.append(row)
        return row

    def _with_ratios(self) -> list[dict]:
        """Each fusedtx row gains ``vs_best_peer`` = best peer time / fusedtx time (> 1: fusedtx faster)."""
        out = []
        for row in self.rows:
            row = dict(row)
            if row["impl"] == FUSEDTX:
                peers = [r["ms"] for r in self.rows if r["impl"] != FUSEDTX and r["ms"] == r["ms"]
                         and (r["case"], r["dtype"], r["mode"]) == (row["case"], row["dtype"], row["mode"])]
                row["vs_best_peer"] = min(peers) / row["ms"] if peers else math.nan
            out.append(row)
        return out

    def write(self, out_dir: Path | str) -> Path:
        """Write ``<name>.md``, ``<name>.csv`` and ``<name>.png``; return the markdown path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = self._with_ratios()
        cols = ["case", "dtype", "mode", "impl", "ms", "rate", "pct_ceiling", "peak_mb", "vs_best_peer", "error"]
        with open(out_dir / f"{self.name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        ceiling = "copy_gbps" if self.metric == "GB/s" else "matmul_tflops"
        lines = [
            f"## {self.name} on {self.ceilings.get('device', self.device)}",
            "",
            f"Ceiling: {self.ceilings[ceiling]:.3g} {self.metric} measured ({ceiling}). "
            "`vs best peer` > 1 means fusedtx is faster than the fastest other implementation.",
            "",
            f"| case | dtype | mode | impl | median ms | {self.metric} | % ceiling | peak MiB | vs best peer |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            ratio = f"{r['vs_best_peer']:.2f}x" if r.get("vs_best_peer", math.nan) == r.get("vs_best_peer") else ""
            shown = "n/a: " + r["error"] if "error" in r else f"{r['ms']:.4f}"
            lines.append(
                f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['impl']} | {shown} | {r['rate']:.3g} | "
                f"{r['pct_ceiling']:.0f}% | {r['peak_mb']:.0f} | {ratio} |"
            )
        md = out_dir / f"{self.name}.md"
        md.write_text("\n".join(lines) + "\n")
        self._plot(rows, out_dir / f"{self.name}.png")
        return md

    def _plot(self, rows: list[dict], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = sorted({(r["case"], r["dtype"], r["mode"]) for r in rows})
        impls = sorted({r["impl"] for r in rows}, key=lambda s: (s != FUSEDTX, s))
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * len(impls) / 2), 4.5))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            rate = {(r["case"], r["dtype"], r["mode"]): r["rate"] for r in rows if r["impl"] == impl}
            ax.bar([g + i * width for g in range(len(groups))], [rate.get(k, 0.0) for k in groups], width,
                   label=impl)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([" ".join(k) for k in groups], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(self.metric)
        ax.set_title(f"{self.name} ({self.ceilings.get('device', self.device)})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
