"""``fusedtx check``: a packaged self-test of the Triton kernels on the user's own device.

Every family runs forward and backward on the Triton backend (forced: no fallback can hide a failure) and
is compared with the float64 reference: odd lengths, several head dims, Swin windows, every dtype the
device runs, and a fully masked row. It prints a pass/fail table with the errors and exits non-zero on a
failure. On a GPU it takes about a minute; on a CPU it runs Triton's interpreter on tiny shapes (bf16 is
left out there: the interpreter's bf16 arithmetic is wrong, see the README).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fusedtx.kernels.support import dot_precision, window_fp32_backward_covers

# Relative-error bounds per dtype (DESIGN.md; the test suite's too, through tests/helpers.py), for results built
# from dot products; gradients get 4x.
BOUNDS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TF32_BOUND = 1e-3


@dataclass
class Result:
    family: str
    case: str
    dtype: torch.dtype
    what: str
    max_abs: float
    rel: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.bound  # NaN fails


def _compare(family, case, dtype, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], grad_factor=4.0,
             dots=False) -> Iterator[Result]:
    """Results for the (got, want) pairs; ``dots``: built from dot products, which run tf32 when the user's
    PyTorch switch allows it for float32 (on CUDA; the interpreter computes float32 exactly)."""
    tf32 = dots and torch.cuda.is_available() and dot_precision(torch.float32) == "tf32"
    bound = TF32_BOUND if tf32 and dtype == torch.float32 else BOUNDS[dtype]
    for what, (got, want) in pairs.items():
        diff = got.detach().double().cpu() - want.detach().double().cpu()
        rel = (diff.norm() / want.detach().double().cpu().norm().clamp_min(1e-30)).item()
        max_abs = diff.abs().max().item() if diff.numel() else 0.0
        if not torch.isfinite(got).all():
            rel = float("nan")
        yield Result(family, case, dtype, what, max_abs, rel, bound * (1.0 if what == "out" else grad_factor))


def _grads(out, leaves, cotangent):
    return torch.autograd.grad(out, leaves, cotangent.to(out.dtype))


def _leaves(tensors, dtype, device):
    """The inputs in ``dtype`` and, for the reference, the same values in float64 (so only the computation's
    error is measured, not the rounding of the inputs)."""
    low = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]
    return low, [t.detach().double().requires_grad_(True) for t in low]


def check_attention(device, dtypes, big: bool) -> Iterator[Result]:
    import fusedtx
    from fusedtx import reference

    lengths = (197, 4097) if big else (5, 33)
    head_dims = (64, 80, 128) if big else (16, 80)
    for dtype in dtypes:
        for n in lengths:
            for d in head_dims:
                b, h = (2, 3) if big else (2, 2)  # the last image fully masked, the first not
                base = [torch.randn(b, h, n, d) for _ in range(3)] + [torch.randn(1, h, n, n)]
                (q, k, v, bias), (q64, k64, v64, bias64) = _leaves(base, dtype, device)
                kpm = torch.zeros(b, n, dtype=torch.bool, device=device)
                kpm[-1] = True  # the last image's keys all ignored: fully masked rows
                out = fusedtx.attention(q, k, v, bias=bias, key_padding_mask=kpm)
                ref = reference.attention(q64, k64, v64, bias64, kpm)
                g = torch.randn_like(ref)
                got, want = _grads(out, (q, k, v, bias), g), _grads(ref, (q64, k64, v64, bias64), g)
                pairs = {"out": (out, ref), "masked rows are 0": (out[-1], torch.zeros_like(ref[-1])),
                         **{f"d{x}": p for x, p in zip("qkv", zip(got, want, strict=True), strict=False)},
                         "dbias": (got[3], want[3])}
                yield from _compare("attention", f"N={n} D={d}, bias, a fully masked image", dtype, pairs, dots=True)


def check_layer_norm_gelu(device, dtypes, big: bool) -> Iterator[Result]:
    import fusedtx
    from fusedtx import reference

    for dtype in dtypes:
        for n in ((768, 4097) if big else (97, 300)):
            rows = 1031 if big else 13
            (x, w, b, r), (x64, w64, b64, r64) = _leaves([torch.randn(rows, n), torch.randn(n), torch.randn(n),
                                                          torch.randn(rows, n)], dtype, device)
            y, s = fusedtx.layer_norm_gelu(x, w, b, residual=r)
            y_ref, s_ref = reference.layer_norm_gelu(x64, w64, b64, 1e-5, "gelu", r64)
            g = torch.randn_like(y_ref)
            got, want = _grads(y, (x, w, b), g), _grads(y_ref, (x64, w64, b64), g)
            yield from _compare("layer_norm_gelu", f"{rows}x{n} gelu + residual", dtype,
                                {"out": (y, y_ref), "sum": (s, s_ref), "dx": (got[0], want[0]),
                                 "dweight": (got[1], want[1]), "dbias": (got[2], want[2])})


def check_sinusoidal(device, dtypes, big: bool) -> Iterator[Result]:
    import fusedtx
    from fusedtx import reference

    for dtype in dtypes:
        seq, dim = (4097, 768) if big else (33, 24)
        x = torch.randn(2, seq, dim, device=device, dtype=dtype)
        out = fusedtx.add_sinusoidal(x, offset=2**30)
        ref = reference.add_sinusoidal(x.double(), None, 2**30)
        grid = 64 if big else 5
        x2 = torch.randn(2, 1 + grid * grid, dim, device=device, dtype=dtype)
        out2 = fusedtx.add_sincos_2d(x2, grid, grid, 1)
        ref2 = reference.add_sincos_2d(x2.double(), grid, grid, 1)
        yield from _compare("sinusoidal", f"1D seq={seq} offset 2^30; 2D {grid}x{grid} + class", dtype,
                            {"out": (out, ref), "out 2D": (out2, ref2)}, grad_factor=1.0)


def check_window_attention(device, dtypes, big: bool) -> Iterator[Result]:
    import fusedtx
    from fusedtx import reference

    heads, head_dim = (3, 32) if big else (2, 16)
    for dtype in dtypes:
        for window, size in ((7, (57, 61)), (12, (30, 29))) if big else ((4, (6, 7)),):
            shift = window // 2
            for order, cosine in itertools.product(("timm", "torchvision"), (False, True)):
                base = [torch.randn(2, *size, 3 * heads * head_dim), torch.randn((2 * window - 1) ** 2, heads),
                        torch.randn(3 * heads * head_dim), torch.rand(heads) * 3 + 1]
                (qkv, table, qb, logit), (qkv64, table64, qb64, logit64) = _leaves(base, dtype, device)
                out = fusedtx.window_attention(qkv, window_size=window, shift_size=shift, rel_pos_bias_table=table,
                                               num_heads=heads, qkv_bias=qb, order=order,
                                               logit_scale=logit if cosine else None)
                # Swin V2's logit scale: clamped at log 100 (the 4-ish draws cross it), exponentiated
                cosine64 = logit64.clamp(max=math.log(100)).exp() if cosine else None
                ref = reference.window_attention(qkv64, (window, window), (shift, shift), table64, heads, qb64,
                                                 None, order, cosine_scale=cosine64)
                g = torch.randn_like(ref)
                fp32_bwd = dtype != torch.float32 or window_fp32_backward_covers(window * window, head_dim)
                n = 4 if cosine else 3
                leaves, leaves64 = (qkv, table, qb, logit)[:n], (qkv64, table64, qb64, logit64)[:n]
                pairs = {"out": (out, ref)}
                if fp32_bwd:  # the kernel's float32 backward covers these windows (support.py)
                    got, want = _grads(out, leaves, g), _grads(ref, leaves64, g)
                    names = ("dqkv", "dtable", "dqkv_bias", "dlogit_scale")
                    pairs.update({name: (a, b) for name, a, b in zip(names[:n], got, want, strict=True)})
                label = f"{size[0]}x{size[1]} window {window} shift {shift} {order}" + (" cosine" if cosine else "")
                yield from _compare("window_attention", label, dtype, pairs, dots=True)


CHECKS: dict[str, Callable[..., Iterator[Result]]] = {
    "attention": check_attention,
    "layer_norm_gelu": check_layer_norm_gelu,
    "sinusoidal": check_sinusoidal,
    "window_attention": check_window_attention,
}


def table(results: list[Result]) -> str:
    lines = ["| family | case | dtype | tensor | max abs err | rel err | bound | result |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.family} | {r.case} | {str(r.dtype).removeprefix('torch.')} | {r.what} | "
                     f"{r.max_abs:.2e} | {r.rel:.2e} | {r.bound:.0e} | {'pass' if r.ok else '**FAIL**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusedtx check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", default=list(CHECKS), help=f"some of {list(CHECKS)} (default: all)")
    args = p.parse_args(argv)
    unknown = set(args.families) - set(CHECKS)
    if unknown:
        raise SystemExit(f"unknown families {sorted(unknown)}; choose from {list(CHECKS)}")
    cuda = torch.cuda.is_available()
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("fusedtx check: Triton was imported before the interpreter could be switched on")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module imports Triton
    import fusedtx

    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if cuda else [torch.float16, torch.float32]
    where = torch.cuda.get_device_name(device) if cuda else "CPU, Triton interpreter, tiny shapes"
    print(f"fusedtx check on {where} (backend triton forced)", flush=True)
    torch.manual_seed(0)
    results: list[Result] = []
    with fusedtx.use_backend("triton"):
        for family in args.families:
            results.extend(CHECKS[family](device, dtypes, cuda))
    print(table(results))
    failed = [r for r in results if not r.ok]
    print(f"\nfusedtx check: {len(results) - len(failed)} of {len(results)} comparisons within their bounds"
          + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0
