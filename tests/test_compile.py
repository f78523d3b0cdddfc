"""Compile correctness: every custom op's fake gives exactly the real op's shapes, strides and dtypes, on
every backend and for contiguous, permuted and sliced inputs (``torch.library.opcheck``), and a compiled
timm Swin stem (conv, then the norm of its NHWC view) matches eager and the float64 reference, gradients
included.

Inputs are tiny: opcheck runs each op several times (its aot_dispatch_dynamic check traces and runs the
forward and backward with symbolic shapes), in Triton's interpreter on the CPU.
"""

import copy

import pytest
import timm
import torch

import fusedtx
from fusedtx import _backend
from tests.conftest import DEVICE
from tests.helpers import assert_close, dot_tolerance

OPS = torch.ops.fusedtx
BACKENDS = [b for b in _backend.BACKENDS if b != "auto"]
LAYOUTS = ["contiguous", "permuted", "sliced"]


def _lay(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``t`` (same shape and values) in ``layout``: contiguous; permuted (its dimensions
    stored in reverse order, as a transpose or an NHWC view of NCHW memory is); or sliced (a view into a
    larger tensor: a storage offset, and rows padded past their end)."""
    t = t.detach()
    if layout == "contiguous" or t.dim() == 0:
        out = t.contiguous()
    elif layout == "permuted":
        order = list(range(t.dim()))[::-1]
        out = t.permute(order).contiguous().permute(order)
        assert sum(n > 1 for n in t.shape) < 2 or not out.is_contiguous()
    else:
        big = torch.zeros((*(n + 1 for n in t.shape[:-1]), t.shape[-1] + 3), dtype=t.dtype, device=t.device)
        out = big[(slice(1, None),) * (t.dim() - 1) + (slice(2, 2 + t.shape[-1]),)]
        out.copy_(t)
        assert out.storage_offset() > 0
    return out


def _randn(*shape, layout, grad=False, dtype=torch.float32):
    return _lay(torch.randn(*shape, device=DEVICE, dtype=dtype), layout).requires_grad_(grad)


def _layer_norm_cases(layout):
    x, r = (_randn(2, 3, 24, layout=layout, grad=True) for _ in range(2))
    w, b = (_randn(24, layout=layout, grad=True) for _ in range(2))
    fwd = (x, w, b, r, 1e-5, "gelu")
    _, s, mean, rstd = OPS.layer_norm_gelu_fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in fwd))
    dy, ds = (_randn(2, 3, 24, layout=layout) for _ in range(2))
    yield OPS.layer_norm_gelu_fwd, fwd
    yield OPS.layer_norm_gelu_fwd, (x, None, None, None, 1e-5, "none")  # no affine, no residual
    yield OPS.layer_norm_gelu_bwd, (dy, ds, _lay(s, layout), w.detach(), b.detach(), mean, rstd, 1e-5, "gelu")


def _attention_cases(layout):
    q = _randn(1, 2, 7, 16, layout=layout, grad=True)
    k, v = (_randn(1, 2, 9, 16, layout=layout, grad=True) for _ in range(2))
    bias = _randn(1, 2, 7, 9, layout=layout, grad=True)
    kpm = torch.zeros(1, 9, dtype=torch.bool, device=DEVICE)
    kpm[0, 3] = True
    yield OPS.attention_fwd, (q, k, v, bias, kpm, False, 0.25)
    yield OPS.attention_fwd, (q, k, v, None, None, True, 0.25)
    out, lse = OPS.attention_fwd(q.detach(), k.detach(), v.detach(), bias.detach(), kpm, False, 0.25)
    do = _randn(1, 2, 7, 16, layout=layout)
    plain = [t.detach() for t in (q, k, v)]
    yield OPS.attention_bwd, (do, *plain, _lay(out, layout), lse, bias.detach(), kpm, False, 0.25, True)


def _window_cases(layout):
    qkv = _randn(1, 2, 4, 24, layout=layout, grad=True)  # 2 heads of 4; windows (2, 3) do not divide 2x4
    table = _lay(torch.randn(2, 15, device=DEVICE).t(), layout).requires_grad_()
    qkv_bias = _randn(24, layout=layout, grad=True)
    args = ([2, 3], [1, 1], 2, 0.5, "timm")
    cosine = _lay(torch.rand(2, device=DEVICE) * 20 + 1, layout).requires_grad_()  # Swin V2's per-head scale
    yield OPS.window_attention_fwd, (qkv, table, qkv_bias, None, cosine, *args)
    out, lse = OPS.window_attention_fwd(qkv.detach(), table.detach(), qkv_bias.detach(), None, cosine.detach(), *args)
    dout = _randn(1, 2, 4, 8, layout=layout)
    yield OPS.window_attention_bwd, (dout, qkv.detach(), table.detach(), qkv_bias.detach(), None, cosine.detach(),
                                     _lay(out, layout), lse, *args, True, True)


def _sinusoidal_cases(layout):
    positions = _lay(torch.randint(0, 1000, (2, 5), device=DEVICE), layout)
    x = _randn(2, 5, 8, layout=layout, grad=True)
    yield OPS.add_sinusoidal, (x, positions, 3, 10000.0, "interleaved")
    yield OPS.add_sinusoidal, (x, None, 0, 500.0, "concat")
    yield OPS.add_sincos_2d, (_randn(2, 7, 8, layout=layout, grad=True), 2, 3, 1, 10000.0, "mae")
    if _backend.requested() != "triton":  # float64 takes the PyTorch path (an error under "triton")
        yield OPS.add_sinusoidal, (_randn(2, 5, 8, layout=layout, grad=True, dtype=torch.float64), None, 0, 500.0,
                                   "concat")
        yield OPS.add_sincos_2d, (_randn(2, 7, 8, layout=layout, grad=True, dtype=torch.float64), 2, 3, 1, 1e4, "mae")
    yield OPS.sinusoidal_encoding, (5, 8, positions, 3, 10000.0, "concat", torch.float32, DEVICE)
    if layout == "permuted":  # no tensor inputs: checked once
        yield OPS.sinusoidal_encoding, (6, 8, None, 0, 10000.0, "interleaved", torch.float32, DEVICE)
        yield OPS.sincos_2d, (2, 3, 8, 1, 10000.0, "timm", torch.float32, DEVICE)


def _highres_cases(layout):
    yield OPS.patch_scores, (_randn(2, 3, 9, 13, layout=layout), 4, "variance")
    yield OPS.patch_scores, (_randn(2, 3, 9, 13, layout=layout), 4, "gradient")
    tokens = _randn(2, 6, 8, layout=layout, grad=True)
    index = _lay(torch.tensor([[4, 0, 2], [1, 5, 3]], device=DEVICE), layout)
    yield OPS.gather_tokens, (tokens, index, _randn(1, 6, 8, layout=layout, grad=True),
                              _randn(2, 1, 8, layout=layout, grad=True))
    yield OPS.match_tokens, (_randn(2, 5, 8, layout=layout), _randn(2, 7, 8, layout=layout))
    dst = _lay(torch.tensor([[0, 2, 2], [1, 1, 0]], device=DEVICE), layout)
    sizes = (_lay(torch.rand(2, n, device=DEVICE) + 0.5, layout) for n in (4, 3))
    yield OPS.merge_weighted, (_randn(2, 4, 8, layout=layout, grad=True), next(sizes),
                               _randn(2, 3, 8, layout=layout, grad=True), next(sizes), dst)


FAMILIES = {"layer_norm_gelu": _layer_norm_cases, "attention": _attention_cases,
            "window_attention": _window_cases, "sinusoidal": _sinusoidal_cases, "highres": _highres_cases}


# opcheck's aot_dispatch_dynamic check (a trace with symbolic shapes, the forward and backward run
# compiled and compared with eager; the backward op's fake is traced there too) costs seconds per op in
# the interpreter, and what it checks does not depend on the layout: it runs on the permuted inputs.
# The fake-against-real check (shapes, strides, dtypes, storage offsets, aliasing) runs on every layout.
FULL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_every_op(backend, family, layout):
    """The fake of every op of the family against its real outputs on this backend (and, on permuted
    inputs, schema, autograd registration and a dynamic-shape AOT trace of forward and backward)."""
    with fusedtx.use_backend(backend):
        for op, args in FAMILIES[family](layout):
            if layout != "permuted":
                utils = ("test_faketensor",)
            else:  # a backward op's AOT trace is part of its forward's
                utils = FULL[:3] if op._qualified_op_name.endswith("_bwd") else FULL
            torch.library.opcheck(op, args, test_utils=utils)


def test_opcheck_covers_every_op():
    """Every op registered in the fusedtx namespace is among the ones checked above."""
    with fusedtx.use_backend("reference"):
        checked = {op._qualified_op_name for cases in FAMILIES.values() for op, _ in cases("permuted")}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedtx::")}
    assert len(registered) >= 10 and registered == checked, registered ^ checked


def test_compiled_swin_stem_matches_eager_and_reference():
    """timm's Swin stem, swapped: conv, then fusedtx's LayerNorm on the conv output's NHWC view (a
    permuted tensor in eager), compiled whole by Inductor, forward and backward."""
    stem = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 44), window_size=5,
                             embed_dim=24, depths=(1,), num_heads=(1,)).patch_embed.to(DEVICE)
    with torch.no_grad():  # fresh random affine parameters, not LayerNorm's ones and zeros
        stem.norm.weight.normal_()
        stem.norm.bias.normal_()
    stock64 = copy.deepcopy(stem).double()
    assert dict(fusedtx.swap(stem).replaced) == {"LayerNorm": 1} and isinstance(stem.norm, fusedtx.nn.LayerNorm)
    x = torch.randn(2, 3, 36, 44, device=DEVICE)  # a 9x11 patch grid
    dy = torch.randn(2, 9, 11, 24, device=DEVICE)

    def run(model, dtype):
        inp = x.to(dtype).requires_grad_()
        out = model(inp)
        return (out, *torch.autograd.grad(out, (inp, *model.parameters()), dy.to(dtype)))

    got = run(torch.compile(stem, backend="inductor", fullgraph=True), torch.float32)
    names = ["out", "dx"] + [f"d{name}" for name, _ in stem.named_parameters()]
    eager, ref = run(stem, torch.float32), run(stock64, torch.float64)
    assert got[0].shape == (2, 9, 11, 24) and len(got) == len(names) == 6
    tol = dot_tolerance(torch.float32)  # the conv's dots run in tf32 on CUDA
    for name, g, e, r in zip(names, got, eager, ref, strict=True):
        assert_close(g, e, torch.float32, f"{name} (compiled vs eager)", tol=tol)
        assert_close(g, r, torch.float32, f"{name} (compiled vs float64)", tol=tol)


@pytest.mark.parametrize("backend", [b for b in _backend.BACKENDS if b != "auto"])
def test_compiled_layer_norm_of_a_permuted_map(backend):
    """The stem norm's input exactly as Swin and torchvision pass it: an NCHW map viewed NHWC, which
    Inductor keeps as a permuted view (layout optimization off, so nothing makes it contiguous first)."""
    c = torch.randn(2, 24, 9, 11, device=DEVICE, requires_grad=True)
    w, b = (torch.randn(24, device=DEVICE, requires_grad=True) for _ in range(2))
    fn = lambda c, w, b: fusedtx.layer_norm(c.permute(0, 2, 3, 1), w, b)
    with fusedtx.use_backend(backend), torch._inductor.config.patch(layout_optimization=False):
        out = torch.compile(fn, backend="inductor", fullgraph=True)(c, w, b)
        dy = torch.randn_like(out)
        grads = torch.autograd.grad(out, (c, w, b), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (c, w, b)]
    ref = torch.nn.functional.layer_norm(leaves64[0].permute(0, 2, 3, 1), (24,), leaves64[1], leaves64[2])
    assert_close(out, ref, torch.float32, "out")
    for name, g, r in zip(("dc", "dw", "db"), grads, torch.autograd.grad(ref, leaves64, dy.double()), strict=True):
        assert_close(g, r, torch.float32, name, tol=1e-4)
