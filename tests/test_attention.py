"""Flash attention: kernels, op and modules against the float64 reference.

On the CPU the kernels run in Triton's interpreter at small sizes (sequence 1, 49, 67, Nq != Nk, head
dims 16/32/80); with CUDA the same tests add the full matrix: sequences up to 4097 and 16384, head
dims 16..256, bfloat16, and batch·heads beyond 65,535.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedtx
from fusedtx import _backend, reference
from tests.conftest import DEVICE, DTYPES, ON_CUDA
from tests.helpers import assert_close, dot_tolerance

# Tests of masks, bias and layouts use one dtype and, on CUDA, one head dim, so that they share compiled
# kernels (each head dim, dtype and flag set is one Triton compilation); on the CPU they vary head dims.
FLAG_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32


def _d(cpu_head_dim: int) -> int:
    return 64 if ON_CUDA else cpu_head_dim


def _qkv(b, h, nq, nk, d, dtype):
    return (torch.randn(b, h, n, d, device=DEVICE, dtype=dtype) for n in (nq, nk, nk))


def _check(q, k, v, dtype, bias=None, key_padding_mask=None, causal=False, scale=None, bias_grad=False):
    """Forward and backward of fusedtx.attention against the float64 reference: out, dq, dk, dv (and
    dbias when ``bias_grad``). Returns the fused (out, grads...) for further checks."""
    inputs = [q, k, v] + ([bias] if bias_grad else [])
    leaves = [t.detach().requires_grad_() for t in inputs]  # detach keeps the strides
    b = leaves[3] if bias_grad else bias
    out = fusedtx.attention(*leaves[:3], bias=b, key_padding_mask=key_padding_mask, causal=causal, scale=scale)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)

    refs = [t.detach().double().requires_grad_() for t in inputs]
    rb = refs[3] if bias_grad else (bias.double() if bias is not None else None)
    ref = reference.attention(*refs[:3], rb, key_padding_mask, causal, scale)
    ref_grads = torch.autograd.grad(ref, refs, do.double())

    assert out.dtype == q.dtype and out.shape == q.shape
    tol = dot_tolerance(dtype)
    assert_close(out, ref, dtype, "out", tol=tol)
    for name, t, g, rg in zip(("dq", "dk", "dv", "dbias"), inputs, grads, ref_grads, strict=False):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        if k.shape[2] == 1 and name in ("dq", "dk"):
            # One key: p = 1 whatever the scores, so dq = dk = 0 exactly; compare absolutely.
            assert torch.isfinite(g).all() and g.abs().max() <= 1e-3 * (1 + do.abs().max()), name
            continue
        assert_close(g, rg, dtype, name, tol=tol)
    return (out, *grads)


# --------------------------------------------------------------------------------------------------
# Shapes, head dims, dtypes
# --------------------------------------------------------------------------------------------------

if ON_CUDA:
    HEAD_DIMS = [16, 32, 64, 80, 96, 128, 256]
    SHAPES = [(2, 3, n, n, d) for n in (1, 197, 4097) for d in HEAD_DIMS]
    SHAPES += [(2, 2, 49, 577, 64), (1, 2, 1024, 197, 80), (1, 4, 4096, 4096, 64), (1, 1, 16384, 16384, 64)]
    # Every head dim in bfloat16; float16 at 64, float32 (tf32) at 80 (masked lanes).
    CASES = [(s, torch.bfloat16) for s in SHAPES]
    CASES += [((2, 3, 197, 197, 64), torch.float16), ((2, 3, 197, 197, 80), torch.float32)]
else:
    SHAPES = [(1, 1, 1, 1, 16), (2, 2, 1, 7, 32), (1, 2, 49, 49, 32), (2, 1, 67, 33, 80), (1, 2, 33, 67, 16),
              (1, 1, 197, 197, 64)]
    CASES = [(s, torch.float32) for s in SHAPES] + [((1, 2, 49, 49, 32), torch.float16)]


@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple)
                         else str(c).removeprefix("torch."))
def test_shapes_head_dims_dtypes(shape, dtype):
    b, h, nq, nk, d = shape
    _check(*_qkv(b, h, nq, nk, d, dtype), dtype)


def test_scale():
    _check(*_qkv(1, 2, 40, 40, _d(32), FLAG_DTYPE), FLAG_DTYPE, scale=0.37)


def test_reference_matches_sdpa():
    """The reference is the spec; check it against PyTorch's own math (float64) with a bias and causality."""
    q, k, v = _qkv(2, 3, 11, 11, 8, torch.float64)
    bias = torch.randn(3, 11, 11, device=DEVICE, dtype=torch.float64)
    causal = torch.ones(11, 11, dtype=torch.bool, device=DEVICE).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf")))
    assert_close(reference.attention(q, k, v, bias, causal=True), expected, torch.float64)


# --------------------------------------------------------------------------------------------------
# Masks and bias
# --------------------------------------------------------------------------------------------------

MASK_SHAPES = [(1, 2, 100, 100, 16), (1, 2, 30, 57, 16), (2, 1, 57, 30, 80)]
if ON_CUDA:
    MASK_SHAPES = [(1, 2, 100, 100, 64), (2, 4, 1024, 1024, 64), (1, 2, 577, 1030, 64), (2, 1, 1030, 577, 64)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(("causal", "padding"), [(True, False), (False, True), (True, True)])
def test_causal_and_padding(shape, causal, padding):
    b, h, nq, nk, d = shape
    kpm = torch.rand(b, nk, device=DEVICE) < 0.3 if padding else None
    if padding:
        kpm[:, 0] = False  # every row keeps a key here; fully masked rows have their own test
    _check(*_qkv(b, h, nq, nk, d, FLAG_DTYPE), FLAG_DTYPE, key_padding_mask=kpm, causal=causal)


# Bias shapes relative to (B, H, Nq, Nk) = (2, 3, 37, 45); "B", "H", "Q", "K" stand for the full size.
BIAS_SHAPES = ["BHQK", "1HQK", "B1QK", "QK", "1H1K", "B11K", "Q1", "1"]


@pytest.mark.parametrize("pattern", BIAS_SHAPES)
def test_bias_broadcast_and_grad(pattern):
    b, h, nq, nk, d = 2, 3, 37, 45, _d(32)
    sizes = {"B": b, "H": h, "Q": nq, "K": nk, "1": 1}
    dtype = FLAG_DTYPE
    q, k, v = _qkv(b, h, nq, nk, d, dtype)
    bias = torch.randn(*(sizes[c] for c in pattern), device=DEVICE, dtype=dtype)
    if pattern.endswith("1"):
        # A bias constant along the keys cannot change the softmax: its exact gradient is zero, which
        # the kernel returns without computing (the float64 reference shows rounding noise only).
        out, *grads = _check(q, k, v, dtype, bias=bias)
        x = bias.detach().requires_grad_()
        dbias = torch.autograd.grad(fusedtx.attention(q, k, v, bias=x), x, torch.randn_like(out))[0]
        assert torch.equal(dbias, torch.zeros_like(bias))
        x64 = bias.detach().double().requires_grad_()
        ref = reference.attention(q.double(), k.double(), v.double(), x64)
        assert torch.autograd.grad(ref, x64, torch.randn_like(ref))[0].abs().max() < 1e-10
    else:
        _check(q, k, v, dtype, bias=bias, bias_grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_bias_with_masks_and_grad(dtype):
    b, h, nq, nk, d = 2, 2, 100, 75, _d(16)
    q, k, v = _qkv(b, h, nq, nk, d, dtype)
    kpm = torch.rand(b, nk, device=DEVICE) < 0.3
    kpm[:, 0] = False
    bias = torch.randn(1, h, nq, nk, device=DEVICE, dtype=dtype)
    _check(q, k, v, dtype, bias=bias, key_padding_mask=kpm, causal=True, bias_grad=True)


def test_bias_is_read_through_its_strides():
    """An expanded or transposed bias gives the same result as its contiguous copy."""
    b, h, n, d = 2, 2, 33, _d(16)
    q, k, v = _qkv(b, h, n, n, d, FLAG_DTYPE)
    base = torch.randn(h, n, n, device=DEVICE, dtype=FLAG_DTYPE)
    views = [base.transpose(-1, -2), base[:1].expand(b, h, n, n)]
    for view in views:
        out = fusedtx.attention(q, k, v, bias=view)
        assert_close(out, reference.attention(q.double(), k.double(), v.double(), view.contiguous().double()),
                     FLAG_DTYPE, "out", tol=dot_tolerance(FLAG_DTYPE))


def test_fully_masked_rows_give_zeros():
    """All keys of batch 0 padded, and a bias row of -inf in batch 1: zero outputs and gradients, no NaN."""
    b, h, nq, nk, d = 2, 2, 21, 19, _d(16)
    q, k, v = _qkv(b, h, nq, nk, d, FLAG_DTYPE)
    kpm = torch.zeros(b, nk, dtype=torch.bool, device=DEVICE)
    kpm[0] = True
    bias = torch.randn(b, 1, nq, nk, device=DEVICE, dtype=FLAG_DTYPE)
    bias[1, :, 5] = float("-inf")
    out, dq, dk, dv, dbias = _check(q, k, v, FLAG_DTYPE, bias=bias, key_padding_mask=kpm, bias_grad=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, :, 5], torch.zeros_like(out[1, :, 5]))
    for g in (dq[0], dk[0], dv[0], dbias[0], dq[1, :, 5], dbias[1, :, 5]):
        assert torch.equal(g, torch.zeros_like(g))


def test_causal_with_more_queries_than_keys():
    """Top-left causal with Nq > Nk: rows past the last key see every key (as SDPA's is_causal)."""
    q, k, v = _qkv(1, 2, 40, 17, _d(16), torch.float64)
    mask = torch.ones(40, 17, dtype=torch.bool, device=DEVICE).tril()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(reference.attention(q, k, v, causal=True), expected, torch.float64)
    _check(*(t.to(FLAG_DTYPE) for t in (q, k, v)), FLAG_DTYPE, causal=True)


def test_empty_and_keyless():
    q, k, v = _qkv(2, 2, 0, 5, _d(16), FLAG_DTYPE)
    assert fusedtx.attention(q, k, v).shape == (2, 2, 0, _d(16))
    q, k, v = _qkv(2, 2, 3, 0, _d(16), FLAG_DTYPE)
    q.requires_grad_()
    out = fusedtx.attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# --------------------------------------------------------------------------------------------------
# Layouts, big grids, determinism
# --------------------------------------------------------------------------------------------------


def test_non_contiguous_inputs():
    """q, k, v as the head-split views of a qkv projection, and a transposed head dim."""
    b, n, h, d = 2, 29, 3, _d(32)
    dtype = FLAG_DTYPE
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    _check(q, k, v, dtype)
    k_t = torch.randn(b, h, d, n, device=DEVICE, dtype=dtype).transpose(-1, -2)  # stride 1 along seq
    out = _check(q, k_t, v, dtype)[0]
    assert out.transpose(1, 2).is_contiguous()  # the (B, N, H, D) memory layout: merging heads is free


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: 65,536+ programs take minutes in the interpreter")
def test_batch_heads_beyond_65535():
    q, k, v = _qkv(4097, 16, 5, 5, 16, torch.bfloat16)
    _check(q, k, v, torch.bfloat16, causal=True)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: the interpreter runs programs one at a time, in order")
def test_backward_is_deterministic():
    q, k, v = _qkv(4, 4, 1024, 1024, 64, torch.bfloat16)
    bias = torch.randn(1, 4, 1024, 1024, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    first = torch.autograd.grad(fusedtx.attention(q, k, v, bias=bias), (q, k, v, bias), do)
    for _ in range(3):
        again = torch.autograd.grad(fusedtx.attention(q, k, v, bias=bias), (q, k, v, bias), do)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: autocast casts attention inputs on CUDA only")
def test_autocast():
    q, k, v = _qkv(2, 3, 77, 77, 64, torch.float32)
    bias = torch.randn(3, 77, 77, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fusedtx.attention(q, k, v, bias=bias)
        expected_dtype = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).dtype
    assert out.dtype == expected_dtype == torch.bfloat16
    low = [t.bfloat16().double() for t in (q, k, v, bias)]
    assert_close(out, reference.attention(*low[:3], low[3]), torch.bfloat16)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: CUDA graphs")
def test_cuda_graph_capture():
    q, k, v = _qkv(2, 3, 197, 197, 64, torch.bfloat16)
    fusedtx.attention(q, k, v, causal=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fusedtx.attention(q, k, v, causal=True)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), causal=True), torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# The op: torch.compile, fallbacks, errors
# --------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 17, 17, _d(16), FLAG_DTYPE))
    bias = torch.randn(2, 17, 17, device=DEVICE, dtype=FLAG_DTYPE, requires_grad=True)
    fn = torch.compile(lambda q, k, v, b: fusedtx.attention(q, k, v, bias=b, causal=True) * 2, fullgraph=True)
    out = fn(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    refs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = reference.attention(*refs[:3], refs[3], causal=True) * 2
    ref_grads = torch.autograd.grad(ref.sum(), refs)
    assert_close(out, ref, FLAG_DTYPE, "out", tol=dot_tolerance(FLAG_DTYPE))
    for g, rg, name in zip(grads, ref_grads, ("dq", "dk", "dv", "dbias"), strict=True):
        assert_close(g, rg, FLAG_DTYPE, name, tol=dot_tolerance(FLAG_DTYPE))


def test_uncovered_cases_fall_back_with_a_warning():
    _backend._warned.clear()
    q, k, v = _qkv(1, 2, 9, 9, 288, torch.float32)  # head dim above 256
    with pytest.warns(UserWarning, match="head dims up to 256"):
        out = fusedtx.attention(q, k, v)
    assert_close(out, reference.attention(q.double(), k.double(), v.double()), torch.float32)
    with _backend.use_backend("triton"), pytest.raises(RuntimeError, match="head dims up to 256"):
        fusedtx.attention(q, k, v)
    q, k, v = _qkv(1, 2, 9, 9, 16, torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        out = fusedtx.attention(q, k, v)
    assert_close(out, reference.attention(q, k, v), torch.float64)


def test_bad_arguments():
    q, k, v = _qkv(2, 3, 5, 7, 16, torch.float32)
    with pytest.raises(ValueError, match="q must be 4-D"):
        fusedtx.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        fusedtx.attention(q, k[:, :2], v)
    with pytest.raises(ValueError, match="k must have shape"):
        fusedtx.attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="v must have k's shape"):
        fusedtx.attention(q, k, v[:, :, :6])
    with pytest.raises(TypeError, match="one dtype"):
        fusedtx.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="k must be float16"):
        fusedtx.attention(q, k.int(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        fusedtx.attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="v is on meta"):
        fusedtx.attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="bias of shape"):
        fusedtx.attention(q, k, v, bias=torch.randn(5, 5, device=DEVICE))
    with pytest.raises(ValueError, match="bias is on meta"):
        fusedtx.attention(q, k, v, bias=torch.randn(5, 7, device="meta"))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        fusedtx.attention(q, k, v, key_padding_mask=torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        fusedtx.attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="scale"):
        fusedtx.attention(q, k, v, scale=float("nan"))


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def _grads(module, inputs):
    return [t.grad for t in inputs] + [p.grad for p in module.parameters()]


def _module_parity(fused, stock, fused_inputs, call):
    """Same weights: fused fp32 vs the stock module in float64, outputs and every gradient."""
    stock = stock.double()
    stock_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in fused_inputs]
    out = call(fused, fused_inputs)
    ref = call(stock, stock_inputs)
    assert_close(out, ref, torch.float32, "output", tol=dot_tolerance(torch.float32))
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy.double())
    for i, (g, rg) in enumerate(zip(_grads(fused, fused_inputs), _grads(stock, stock_inputs), strict=True)):
        if rg is None:
            continue
        if rg.norm() < 1e-9:  # analytically zero (e.g. a key-norm bias: it shifts a row's scores evenly)
            assert g.abs().max() < 1e-4, f"gradient {i} should be zero"
        else:
            assert_close(g, rg, torch.float32, f"gradient {i}", tol=dot_tolerance(torch.float32))


MHA_CASES = [
    # batch_first, kdim, add_bias_kv, add_zero_attn, mask kinds
    (True, None, False, False, "none"),
    (False, None, False, False, "bool"),
    (True, None, True, True, "float"),
    (False, 24, False, False, "float3d"),
    (True, 24, False, False, "causal"),
    (True, None, False, False, "bool_padding_causal"),
]


@pytest.mark.parametrize(("batch_first", "kdim", "bias_kv", "zero_attn", "masks"), MHA_CASES)
def test_multihead_attention_parity(batch_first, kdim, bias_kv, zero_attn, masks):
    e, h, n, length, s = 32, 4, 2, 9, 11
    if masks in ("causal", "bool_padding_causal"):
        s = length
    kw = dict(kdim=kdim, vdim=kdim, batch_first=batch_first, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
              device=DEVICE)
    stock = nn.MultiheadAttention(e, h, **kw)
    with torch.no_grad():
        stock.in_proj_bias.normal_()  # torch initializes it to zeros
    fused = fusedtx.nn.MultiheadAttention(e, h, **kw)
    assert list(fused.state_dict()) == list(stock.state_dict())
    fused.load_state_dict(stock.state_dict())

    def seq(m, dim):
        return torch.randn((n, m, dim) if batch_first else (m, n, dim), device=DEVICE, requires_grad=True)

    self_attention = kdim is None and masks in ("causal", "bool_padding_causal", "none")
    query = seq(length, e)
    key = query if self_attention else seq(s, kdim or e)
    value = query if self_attention else seq(s, kdim or e)
    kwargs = {}
    if masks == "bool":
        kwargs["key_padding_mask"] = torch.rand(n, s, device=DEVICE) < 0.3
        kwargs["attn_mask"] = torch.rand(length, s, device=DEVICE) < 0.2
        kwargs["attn_mask"][:, 0] = kwargs["key_padding_mask"][:, 0] = False
    elif masks == "float":
        kwargs["key_padding_mask"] = torch.randn(n, s, device=DEVICE)
        kwargs["attn_mask"] = torch.randn(length, s, device=DEVICE)
    elif masks == "float3d":
        kwargs["attn_mask"] = torch.randn(n * h, length, s, device=DEVICE)
    elif masks in ("causal", "bool_padding_causal"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length, device=DEVICE)
        kwargs["is_causal"] = True
        if masks == "bool_padding_causal":
            kwargs["attn_mask"] = torch.ones(length, length, dtype=torch.bool, device=DEVICE).triu(1)
            kwargs["key_padding_mask"] = torch.rand(n, s, device=DEVICE) < 0.3
            kwargs["key_padding_mask"][:, 0] = False
    inputs = [query] if self_attention else [query, key, value]

    def call(m, ins):
        q, k_, v_ = (ins[0],) * 3 if self_attention else ins
        masks_ = {name: (t.double() if t.is_floating_point() and ins[0].dtype == torch.float64 else t)
                  for name, t in kwargs.items() if isinstance(t, torch.Tensor)}
        out, weights = m(q, k_, v_, need_weights=False, is_causal=kwargs.get("is_causal", False), **masks_)
        assert weights is None
        return out

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask")
        _module_parity(fused, stock, inputs, call)


def test_multihead_attention_unbatched_weights_dropout_and_from_module():
    stock = nn.MultiheadAttention(16, 2, dropout=0.5, device=DEVICE).eval()
    fused = fusedtx.nn.MultiheadAttention.from_module(stock)
    assert fused.in_proj_weight is stock.in_proj_weight and fused.out_proj.weight is stock.out_proj.weight
    x = torch.randn(7, 16, device=DEVICE)  # unbatched (L, E)
    out, w = fused(x, x, x, need_weights=False)
    assert w is None
    stock64 = copy.deepcopy(stock).double()
    assert_close(out, stock64(x.double(), x.double(), x.double(), need_weights=False)[0], torch.float32,
                 tol=dot_tolerance(torch.float32))
    _backend._warned.clear()
    with pytest.warns(UserWarning, match="does not return attention weights"):
        out_w, weights = fused(x, x, x, average_attn_weights=False)
    expected, expected_weights = stock(x, x, x, average_attn_weights=False)
    assert torch.equal(weights, expected_weights) and torch.equal(out_w, expected)
    fused.train()
    with pytest.warns(UserWarning, match="dropout"):
        fused(x, x, x, need_weights=False)
    with _backend.use_backend("triton"), pytest.raises(RuntimeError, match="dropout"):
        fused(x, x, x, need_weights=False)
    with pytest.raises(TypeError, match="MultiheadAttention"):
        fusedtx.nn.MultiheadAttention.from_module(nn.Linear(2, 2))


TIMM_CASES = [
    dict(kwargs=dict(qkv_bias=True), mask=None, causal=False),
    dict(kwargs=dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm), mask="bool", causal=False),
    dict(kwargs=dict(scale_norm=True, gated=True, norm_layer=nn.LayerNorm, dim_out=24), mask="float", causal=True),
]


@pytest.mark.parametrize("case", TIMM_CASES, ids=["plain", "qk_norm_bool_mask", "gated_float_mask_causal"])
def test_timm_attention_parity(case):
    from timm.layers import Attention as timm_attention
    dim, heads, b, n = 48, 3, 2, 13
    stock = timm_attention(dim, heads, device=DEVICE, **case["kwargs"])
    fused = fusedtx.nn.Attention(dim, heads, device=DEVICE, **case["kwargs"])
    assert list(fused.state_dict()) == list(stock.state_dict())
    fused.load_state_dict(stock.state_dict())
    mask = None
    if case["mask"] == "bool":
        mask = torch.rand(b, 1, n, n, device=DEVICE) > 0.2
        mask[..., 0] = True
    elif case["mask"] == "float":
        mask = torch.randn(1, heads, n, n, device=DEVICE)
    x = torch.randn(b, n, dim, device=DEVICE, requires_grad=True)

    def call(m, ins):
        attn_mask = mask.double() if mask is not None and mask.is_floating_point() and ins[0].dtype == torch.float64 \
            else mask
        if case["causal"] and isinstance(m, timm_attention):  # timm/SDPA take one or the other: fold the mask in
            causal = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
            return m(ins[0], attn_mask=attn_mask.masked_fill(~causal, float("-inf")))
        return m(ins[0], attn_mask=attn_mask, is_causal=case["causal"])

    _module_parity(fused, stock, [x], call)


def test_timm_attention_from_module_and_dropout():
    from timm.layers import Attention as timm_attention
    stock = timm_attention(32, 4, qkv_bias=True, attn_drop=0.3, device=DEVICE).eval()
    fused = fusedtx.nn.Attention.from_module(stock)
    assert fused.qkv.weight is stock.qkv.weight and fused.proj is stock.proj
    x = torch.randn(2, 10, 32, device=DEVICE)
    assert_close(fused(x), copy.deepcopy(stock).double()(x.double()), torch.float32, tol=dot_tolerance(torch.float32))
    fused.train()
    _backend._warned.clear()
    with pytest.warns(UserWarning, match="dropout"):
        y = fused(x)
    assert y.shape == (2, 10, 32) and torch.isfinite(y).all()
    with pytest.raises(TypeError, match="timm Attention"):
        fusedtx.nn.Attention.from_module(nn.Linear(2, 2))
