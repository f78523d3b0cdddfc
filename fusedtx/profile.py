"""``fusedtx profile``: stock vs swapped model on the same random batch, timed and profiled.

Builds a model with random weights (default timm ``vit_base_patch16_224`` at 1024×1024, i.e. 4096
patches), makes a swapped copy with :func:`fusedtx.swap`, checks that both give the same output, and
reports latency (median; CUDA events on a GPU), images/s, peak memory, the largest output
difference, time by op family from ``torch.profiler`` for both, and the speedup. Writes a markdown
report and a chrome trace per model. On a machine without CUDA the same path runs on the CPU, where
fusedtx takes its PyTorch reference, at a smaller default size.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fusedtx import _backend
from fusedtx.surgery import swap

GPU_DEFAULTS = {"img_size": 1024, "batch": 8, "dtype": "bfloat16", "steps": 20}
CPU_DEFAULTS = {"img_size": 384, "batch": 1, "dtype": "float32", "steps": 3}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Op families, matched in order against lower-cased profiler event names (aten ops and kernel names).
FAMILIES = [
    ("attention", ("attention", "attn", "softmax", "flash", "sdpa", "fmha", "bmm", "baddbmm")),
    ("norm", ("layer_norm", "layernorm", "native_layer_norm")),
    ("position", ("sinusoidal", "sincos", "pos_embed", "upsample", "interpolate")),
    ("matmul", ("addmm", "aten::mm", "matmul", "linear", "gemm", "conv", "cutlass", "sm90_xmma", "nvjet")),
]


def family_of(name: str) -> str:
    low = name.lower()
    return next((fam for fam, keys in FAMILIES if any(k in low for k in keys)), "other")


def build_model(name: str, img_size: int) -> tuple[nn.Module, dict]:
    """A model with random weights and the keyword arguments its forward needs beyond the images.

    ``name``: a timm model name (``vit_base_patch16_224``, ``swin_tiny_patch4_window7_224``, ...), or
    ``hf_vit`` for a Hugging Face ``ViTModel`` (ViT-B/16 config) called with ``interpolate_pos_encoding``.
    """
    if name == "hf_vit":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig(image_size=224), add_pooling_layer=False), {"interpolate_pos_encoding": True}
    try:
        import timm
    except ImportError as exc:
        raise SystemExit("fusedtx profile needs timm for its models: pip install timm") from exc
    return timm.create_model(name, pretrained=False, img_size=img_size), {}


def _output_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@dataclass
class Run:
    label: str
    times_ms: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")
    by_family_ms: dict[str, float] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _profile(fn, device: torch.device, trace: Path) -> dict[str, float]:
    """Self time per op family (device time on CUDA, CPU time otherwise) of one call, in ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(str(trace))
    totals: dict[str, float] = {}
    on_device = device.type == "cuda"
    for event in prof.key_averages():
        # On CUDA only the kernels' own events count: a host op's device time is that of its kernels,
        # which are events of their own, so counting both would count them twice.
        if on_device and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.self_device_time_total if on_device else event.self_cpu_time_total
        if us > 0:
            fam = family_of(event.key)
            totals[fam] = totals.get(fam, 0.0) + us / 1e3
    return totals


def measure(label: str, model: nn.Module, images: torch.Tensor, kwargs: dict, steps: int, out_dir: Path,
            progress) -> tuple[Run, torch.Tensor]:
    device = images.device
    run = Run(label)

    def step():
        return model(images, **kwargs)

    with torch.inference_mode():
        output = _output_tensor(step())  # warm-up (compiles, autotunes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            run.times_ms.append(_time_once(step, device))
            progress(label)
        if device.type == "cuda":
            run.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        run.by_family_ms = _profile(step, device, out_dir / f"trace_{label}.json")
    return run, output


def report(args, device: torch.device, backend: str, stock: Run, fused: Run, max_diff: float,
           swap_text: str) -> str:
    batch = args.batch
    speedup = stock.median_ms / fused.median_ms
    families = [f for f, _ in FAMILIES] + ["other"]
    where = "CUDA" if device.type == "cuda" else "no CUDA"
    lines = [
        f"# fusedtx profile: {args.model} at {args.img_size}x{args.img_size}, batch {batch}, {args.dtype}",
        "",
        f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} ({where}); "
        f"backend: {backend}; torch.compile: {'on' if args.compile else 'off'}; "
        f"median of {args.steps} steps.",
        "",
        "| model | median ms | images/s | peak MiB |",
        "|---|---:|---:|---:|",
    ]
    for run in (stock, fused):
        peak = f"{run.peak_mb:.0f}" if run.peak_mb == run.peak_mb else "n/a"
        lines.append(f"| {run.label} | {run.median_ms:.2f} | {1e3 * batch / run.median_ms:.1f} | {peak} |")
    lines += [
        "",
        f"Speedup (stock / fusedtx): **{speedup:.2f}x**. Largest output difference: {max_diff:.3e}.",
        "",
        "Time by op family (profiler self time, ms, one step):",
        "",
        "| family | stock | fusedtx |",
        "|---|---:|---:|",
    ]
    for fam in families:
        lines.append(f"| {fam} | {stock.by_family_ms.get(fam, 0.0):.2f} | {fused.by_family_ms.get(fam, 0.0):.2f} |")
    lines += ["", "```", swap_text, "```", ""]
    return "\n".join(lines)


def tolerance(dtype: torch.dtype) -> float:
    """Largest output difference accepted between stock and swapped, relative to the output's scale."""
    return {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    p = argparse.ArgumentParser(prog="fusedtx profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name, or hf_vit")
    p.add_argument("--img-size", type=int, default=defaults["img_size"])
    p.add_argument("--batch", type=int, default=defaults["batch"])
    p.add_argument("--dtype", choices=list(DTYPES), default=defaults["dtype"])
    p.add_argument("--steps", type=int, default=defaults["steps"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--backend", choices=_backend.BACKENDS, default=None, help="fusedtx backend (default: auto)")
    p.add_argument("--out", default="fusedtx-profile", help="folder for report.md and the chrome traces")
    p.add_argument("--trace", default=None, help="also copy the fusedtx model's chrome trace to this file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cuda:
        print(f"No CUDA device: profiling on the CPU, where fusedtx runs its PyTorch reference "
              f"(defaults: {args.img_size}px, batch {args.batch}, {args.steps} steps).", file=sys.stderr)

    torch.manual_seed(0)
    stock_model, kwargs = build_model(args.model, args.img_size)
    stock_model = stock_model.eval().to(device=device, dtype=dtype)
    fused_model = copy.deepcopy(stock_model)
    swapped = swap(fused_model)
    if args.compile:
        stock_model, fused_model = torch.compile(stock_model), torch.compile(fused_model)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)

    total = 2 * args.steps
    done = [0]

    def progress(label: str) -> None:
        done[0] += 1
        bar = "#" * (30 * done[0] // total)
        print(f"\r[{bar:<30}] {done[0]}/{total} steps ({label})", end="", file=sys.stderr, flush=True)

    with _backend.use_backend(args.backend or _backend.requested()):
        stock, ref_out = measure("stock", stock_model, images, kwargs, args.steps, out_dir, progress)
        fused, out = measure("fusedtx", fused_model, images, kwargs, args.steps, out_dir, progress)
        backend = _backend.explain(device)[0]  # the one the runs took, asked while it is in force
    print(file=sys.stderr)

    max_diff = (out.float() - ref_out.float()).abs().max().item()
    scale = ref_out.float().abs().max().item()
    text = report(args, device, backend, stock, fused, max_diff, str(swapped))
    (out_dir / "report.md").write_text(text)
    if args.trace:
        Path(args.trace).write_bytes((out_dir / "trace_fusedtx.json").read_bytes())
    print(text)
    print(f"wrote {out_dir / 'report.md'} and chrome traces {out_dir}/trace_stock.json, trace_fusedtx.json")
    if not max_diff <= tolerance(dtype) * max(scale, 1.0):
        print(f"ERROR: outputs differ by {max_diff:.3e} (scale {scale:.3e}); beyond {args.dtype} tolerance",
              file=sys.stderr)
        return 1
    return 0
