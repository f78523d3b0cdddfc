"""``fusedtx profile``: stock vs swapped model on the same random batch, timed and profiled.

Builds a model with random weights (default timm ``vit_base_patch16_224`` at 1024×1024, i.e. 4096
patches), makes a swapped copy with :func:`fusedtx.swap`, checks that both give the same output, and
reports latency (median; CUDA events on a GPU), images/s, peak memory, the largest output
difference, time by op family from ``torch.profiler`` for both, and the speedup. The two models are
timed interleaved, step by step. Writes a markdown report and a chrome trace per model. On a machine
without CUDA the same 4096-patch case runs on the CPU (batch 1, 3 steps), where fusedtx takes its fast
PyTorch path; peak memory there is the process's resident set high-water mark.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from fusedtx import _backend
from fusedtx.surgery import NEXT_NORM, SwapReport, swap

GPU_DEFAULTS = {"img_size": 1024, "batch": 8, "dtype": "bfloat16", "steps": 20}
CPU_DEFAULTS = {"img_size": 1024, "batch": 1, "dtype": "float32", "steps": 3}
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


def time_once(fn, device: torch.device) -> float:
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


class PeakMemory:
    """Peak memory of the steps run between :meth:`reset` and :meth:`read`, in MiB: allocated CUDA memory
    on a GPU; on a CPU the process's resident set high-water mark (Linux's VmHWM, reset through
    /proc/self/clear_refs), which includes every model in memory, as the CUDA figure does."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def cpu_supported() -> bool:
        return sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_supported():
            # Memory an earlier model freed stays in the allocator's heap, resident, and would count
            # toward the next model's peak: hand it back to the system first.
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if not self.cpu_supported():
            return float("nan")
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024


@contextlib.contextmanager
def _quiet_native_stderr(enabled: bool):
    """Hide what the profiler's native library prints to the stderr file descriptor (on a machine without
    CUDA, its "gpuGetDeviceCount failed" and start/stop lines); Python's own stderr is untouched."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profile(fn, device: torch.device, trace: Path) -> dict[str, float]:
    """Self time per op family (device time on CUDA, CPU time otherwise) of one call, in ms."""
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with _quiet_native_stderr(not torch.cuda.is_available()):
        with profile(activities=activities) as prof:
            fn()
            if on_device:
                torch.cuda.synchronize(device)
    prof.export_chrome_trace(str(trace))
    totals: dict[str, float] = {}
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


def measure(models: dict[str, nn.Module], images: torch.Tensor, kwargs: dict, steps: int,
            out_dir: Path) -> tuple[dict[str, Run], dict[str, torch.Tensor]]:
    """Time the models interleaved (one step of each in turn, so a drift of the machine hits all alike),
    then profile one step of each, measuring its peak memory. Returns the runs and the outputs."""
    device = images.device
    runs = {label: Run(label) for label in models}
    outputs: dict[str, torch.Tensor] = {}
    steps_of = {label: (lambda m=model: m(images, **kwargs)) for label, model in models.items()}
    peak = PeakMemory(device)
    with torch.inference_mode():
        for label, step in steps_of.items():
            outputs[label] = _output_tensor(step())  # warm-up (compiles, autotunes)
        with tqdm(total=steps * len(models), desc="fusedtx profile", unit="step", file=sys.stderr) as bar:
            for _ in range(steps):
                for label, step in steps_of.items():
                    runs[label].times_ms.append(time_once(step, device))
                    bar.set_postfix_str(label)
                    bar.update()
        for label, step in steps_of.items():  # the profiled step also gives the peak (no extra step)
            peak.reset()
            runs[label].by_family_ms = _profile(step, device, out_dir / f"trace_{label}.json")
            runs[label].peak_mb = peak.read()
    return runs, outputs


def report(args, device: torch.device, backend: str, stock: Run, fused: Run, max_diff: float,
           swapped: SwapReport) -> str:
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
        f"| model | median ms | images/s | {'peak MiB' if device.type == 'cuda' else 'peak RSS MiB'} |",
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
    lines += residual_lines(swapped, backend)
    lines += ["", "```", str(swapped), "```", ""]
    return "\n".join(lines)


def residual_lines(swapped: SwapReport, backend: str) -> list[str]:
    """What the fused pre-norm residual adds save, per forward: the count and the memory passes."""
    after_attention = swapped.replaced["pre-norm residual add"]
    after_mlp = swapped.replaced[NEXT_NORM]
    if not after_attention + after_mlp:
        return []
    where = ("in the kernel" if backend == "triton" else
             f"on the Triton backend (this run's {backend!r} backend computes the add and F.layer_norm apart)")
    return ["", f"Residual adds fused with the LayerNorm that follows: {after_attention + after_mlp} per forward "
            f"({after_attention} with the block's norm2, {after_mlp} with the next block's norm1). Each turns an add "
            "and a LayerNorm, 5 passes over the (batch, tokens, dim) activations (read 2, write 1; read 1, write 1), "
            f"into one that reads 2 and writes 2 {where}: one pass fewer each, {after_attention + after_mlp} per "
            "forward."]


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
    p.add_argument("--strategy", default=None, choices=["full", "resize", "tiles", "select", "merge", "hybrid", "all"],
                   help="compare high-resolution strategies (fusedtx.highres) instead of stock vs swapped")
    p.add_argument("--weights", default=None, help="with --strategy: a state_dict file (timm checkpoint or "
                   ".safetensors) to load, so fidelity is measured on a trained model")
    p.add_argument("--pos", default="table", choices=["table", "sincos"],
                   help="with --strategy: position encodings from the model's table, resampled as its library does, "
                   "or (a model with a 2D sin-cos table, MAE-style) generated from the patch coordinates")
    args = p.parse_args(argv)
    if args.strategy:
        from fusedtx.highres.compare import run

        with _backend.use_backend(args.backend or _backend.requested()):
            return run(args, torch.device("cuda" if cuda else "cpu"), DTYPES[args.dtype])

    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cuda:
        print(f"No CUDA device: profiling on the CPU, where fusedtx runs its fast PyTorch path "
              f"({args.img_size}px, batch {args.batch}, {args.steps} steps).", file=sys.stderr)

    torch.manual_seed(0)
    stock_model, kwargs = build_model(args.model, args.img_size)
    stock_model = stock_model.eval().to(device=device, dtype=dtype)
    fused_model = copy.deepcopy(stock_model)
    swapped = swap(fused_model)
    if args.compile:
        stock_model, fused_model = torch.compile(stock_model), torch.compile(fused_model)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)

    with _backend.use_backend(args.backend or _backend.requested()):
        runs, outputs = measure({"stock": stock_model, "fusedtx": fused_model}, images, kwargs, args.steps, out_dir)
        backend = _backend.explain(device)[0]  # the one the runs took, asked while it is in force
    stock, fused = runs["stock"], runs["fusedtx"]
    ref_out, out = outputs["stock"], outputs["fusedtx"]

    max_diff = (out.float() - ref_out.float()).abs().max().item()
    scale = ref_out.float().abs().max().item()
    text = report(args, device, backend, stock, fused, max_diff, swapped)
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
