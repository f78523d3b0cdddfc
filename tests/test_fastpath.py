"""The fast PyTorch path (backend ``torch``), judged like the kernels: every op against the float64
reference on fresh random inputs at odd sizes, with masks, fully masked rows and gradients, through the
public ops (so the custom ops' dispatch, outputs layout and backward are what is tested)."""

import math

import pytest
import torch

import fusedtx
from fusedtx import fastpath, reference
from tests.conftest import DEVICE
from tests.helpers import ROUNDING_DRAWS, STOCK_FACTOR, assert_close, away_from_relu_kink, rel_error, ulp_moved

DTYPES = [torch.float32, torch.float16]  # the fast path runs PyTorch's own kernels: no interpreter caveat
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], g: torch.Tensor):
    return torch.autograd.grad(out, inputs, g.to(out.dtype))


@pytest.fixture(autouse=True)
def torch_backend():
    with fusedtx.use_backend("torch"):
        yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_gelu(dtype, activation, residual):
    x = torch.randn(7, 13, 97, device=DEVICE, dtype=dtype).transpose(0, 1)  # odd width, non-contiguous
    w, b = (torch.randn(97, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    r = torch.randn(13, 7, 97, device=DEVICE, dtype=dtype) if residual else None
    if activation == "relu":  # no output within rounding of the ReLU's kink
        b = away_from_relu_kink(x if r is None else x + r, w, b, 1e-5).detach().requires_grad_(True)
    x.requires_grad_(True)
    out = fusedtx.layer_norm_gelu(x, w, b, activation=activation, residual=r)
    y = out[0] if residual else out
    # With a residual the op normalizes s = x + r rounded to x's dtype (as PyTorch's x + r), so the float64
    # reference starts from that s, as the kernels' test does (from the exact sum, a ReLU's kink moves).
    normed = x if r is None else x + r
    args64 = [t.detach().double().requires_grad_(True) for t in (normed, w, b)]
    y_ref = reference.layer_norm_gelu(*args64, 1e-5, activation)
    assert y.is_contiguous() and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", tol=TOL[dtype])
    if residual:
        assert torch.equal(out[1], normed), "residual sum"
    g = torch.randn_like(y_ref)
    for name, got, want in zip(("dx", "dw", "db"), _grads(y, (x, w, b), g), _grads(y_ref, tuple(args64), g),
                               strict=True):
        # fp16 gradients pass through PyTorch's own fp16 kernels, each rounding its output
        assert_close(got, want, dtype, name, tol=(4 if dtype == torch.float32 else 8) * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk", [(1, 5), (49, 49), (197, 197), (33, 70)])
@pytest.mark.parametrize("masks", ["none", "bias", "padding", "causal", "all"])
def test_attention(dtype, nq, nk, masks):
    b, h, d = 2, 3, 80
    q = torch.randn(b, nq, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)  # head-split views, as models pass
    k, v = (torch.randn(b, nk, h, d, device=DEVICE, dtype=dtype).transpose(1, 2) for _ in range(2))
    bias = torch.randn(1, h, nq, nk, device=DEVICE, dtype=dtype) if masks in ("bias", "all") else None
    kpm = None
    if masks in ("padding", "all"):
        kpm = torch.rand(b, nk, device=DEVICE) < 0.3
        kpm[1] = True  # every key of the second image ignored: fully masked rows
    causal = masks in ("causal", "all")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)] + ([bias.requires_grad_(True)] if bias is not None
                                                                     else [])
    out = fusedtx.attention(*leaves[:3], bias=leaves[3] if bias is not None else None, key_padding_mask=kpm,
                            causal=causal)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.attention(*leaves64[:3], leaves64[3] if bias is not None else None, kpm, causal)
    assert out.transpose(1, 2).is_contiguous(), "outputs are laid out (B, N, H, D) on every backend"
    assert_close(out, ref, dtype, "out", tol=TOL[dtype])
    if kpm is not None:
        assert (out[1] == 0).all(), "fully masked rows give zeros"
    g = torch.randn_like(ref)
    for i, (got, want) in enumerate(zip(_grads(out, tuple(leaves), g), _grads(ref, tuple(leaves64), g), strict=True)):
        assert torch.isfinite(got).all()
        if not want.any():  # dq of a query that sees one key is exactly 0: no relative error to speak of
            assert got.abs().max() <= 10 * TOL[dtype] * g.abs().max()
            continue
        assert_close(got, want, dtype, f"grad {'qkvb'[i]}", tol=4 * TOL[dtype])


@pytest.mark.parametrize("layout", ["head-split views", "contiguous"])
def test_eager_inference_skips_the_backward_state(layout):
    """Eager inference runs the forward without the statistics and log-sum-exp only a backward reads
    (``F.layer_norm``, public SDPA): the same numbers as the float64 reference."""
    b, n, h, d = 2, 37, 3, 24
    x = torch.randn(b, n, h * d, device=DEVICE)
    r = torch.randn_like(x)
    w, bias_ln = torch.randn(h * d, device=DEVICE), torch.randn(h * d, device=DEVICE)
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = (t.contiguous() if layout == "contiguous" else t for t in qkv.unbind(0))
    bias = torch.randn(1, h, n, n, device=DEVICE)
    kpm = torch.rand(b, n, device=DEVICE) < 0.3
    kpm[1] = True  # fully masked rows
    with torch.inference_mode():
        y, s = fusedtx.layer_norm_gelu(x, w, bias_ln, residual=r)
        out = fusedtx.attention(q, k, v, bias=bias, key_padding_mask=kpm, causal=True)
    y_ref, s_ref = reference.layer_norm_gelu(x.double(), w.double(), bias_ln.double(), 1e-5, "gelu", r.double())
    assert_close(y, y_ref, torch.float32, "y", tol=TOL[torch.float32])
    assert torch.equal(s, x + r)
    ref = reference.attention(q.double(), k.double(), v.double(), bias.double(), kpm, True)
    assert_close(out, ref, torch.float32, "out", tol=TOL[torch.float32])
    assert (out[1] == 0).all(), "fully masked rows give zeros"
    if layout == "head-split views":  # as documented: merging the heads of a model's views stays free
        assert out.transpose(1, 2).is_contiguous()



def test_attention_dropout_takes_the_fast_path():
    q = torch.randn(1, 2, 16, 8, device=DEVICE)
    torch.manual_seed(1)
    out = fusedtx.attention(q, q, q, dropout_p=0.5)
    assert torch.isfinite(out).all() and not torch.allclose(out, fusedtx.attention(q, q, q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["timm", "torchvision"])
@pytest.mark.parametrize("size,window,shift", [((14, 14), 7, 3), ((13, 17), 7, 3), ((9, 6), (4, 3), (2, 1)),
                                                ((5, 5), 7, 0)])
def test_window_attention(dtype, order, size, window, shift):
    heads, head_dim, bsz = 3, 16, 2
    wh, ww = (window, window) if isinstance(window, int) else window
    qkv = torch.randn(bsz, *size, 3 * heads * head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    table = torch.randn((2 * wh - 1) * (2 * ww - 1), heads, device=DEVICE, dtype=dtype, requires_grad=True)
    qkv_bias = torch.randn(3 * heads * head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    out = fusedtx.window_attention(qkv, window_size=window, shift_size=shift, rel_pos_bias_table=table,
                                   num_heads=heads, qkv_bias=qkv_bias, order=order)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (qkv, table, qkv_bias)]
    pair = (lambda v: (v, v) if isinstance(v, int) else v)
    ref = reference.window_attention(leaves64[0], (wh, ww), pair(shift), leaves64[1], heads, leaves64[2], None, order)
    assert out.is_contiguous()
    assert_close(out, ref, dtype, "out", tol=TOL[dtype])
    g = torch.randn_like(ref)
    for name, got, want in zip(("dqkv", "dtable", "dqkv_bias"), _grads(out, (qkv, table, qkv_bias), g),
                               _grads(ref, tuple(leaves64), g), strict=True):
        assert_close(got, want, dtype, name, tol=4 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size,window,shift,windows", [((13, 17), 7, 3, 0), ((4, 4), 4, 0, 3)])
def test_cosine_window_attention(dtype, size, window, shift, windows):
    """Swin V2 (``logit_scale``), on a map and on caller-partitioned windows with a mask: with autograd, and
    without it (where q and k are normalized in the rows the op gathered), the input left as it was."""
    heads, head_dim, bsz = 2, 16, windows or 2  # one mask slice per window (the mask test below takes g mod M)
    qkv = torch.randn(bsz, *size, 3 * heads * head_dim, device=DEVICE, dtype=dtype, requires_grad=True)
    table = torch.randn((2 * window - 1) ** 2, heads, device=DEVICE, dtype=dtype, requires_grad=True)
    logit_scale = torch.tensor([1.5, 5.0], device=DEVICE).view(heads, 1, 1).requires_grad_()  # 5 > log 100
    mask = torch.randn(windows, window**2, window**2, device=DEVICE) if windows else None
    kw = dict(window_size=window, shift_size=shift, num_heads=heads, mask=mask)
    out = fusedtx.window_attention(qkv, rel_pos_bias_table=table, logit_scale=logit_scale, **kw)

    def ref_run(qkv64, table64):
        """The float64 reference on these inputs, and its leaves (qkv, table, logit scale)."""
        leaves = [qkv64.requires_grad_(True), table64.requires_grad_(True),
                  logit_scale.detach().double().requires_grad_(True)]
        return reference.window_attention(leaves[0], (window, window), (shift, shift), leaves[1], heads,
                                          mask=None if mask is None else mask.double(),
                                          cosine_scale=leaves[2].clamp(max=math.log(100)).exp().flatten()), leaves

    ref, leaves64 = ref_run(*(t.detach().double() for t in (qkv, table)))
    assert_close(out, ref, dtype, "out", tol=TOL[dtype])
    g = torch.randn_like(ref)
    wants = _grads(ref, tuple(leaves64), g)
    # The logit scale's gradient sums whole windows with cancellation: on some draws the exact gradient itself
    # moves by several percent when the inputs move by one ulp of their dtype. It may err STOCK_FACTOR times
    # the largest such move of ROUNDING_DRAWS (float64 throughout: a property of the inputs, not of the path).
    moved = [_grads(*ref_run(*(ulp_moved(t.detach()).double() for t in (qkv, table))), g)[2]
             for _ in range(ROUNDING_DRAWS)]
    conditioning = max(rel_error(m, wants[2]) for m in moved)
    tols = (8 * TOL[dtype], 8 * TOL[dtype], max(8 * TOL[dtype], STOCK_FACTOR * conditioning))
    for name, got, want, tol in zip(("dqkv", "dtable", "dlogit_scale"), _grads(out, (qkv, table, logit_scale), g),
                                    wants, tols, strict=True):
        assert_close(got, want, dtype, name, tol=tol)
    before = qkv.detach().clone()
    with torch.inference_mode():
        assert torch.equal(fusedtx.window_attention(qkv.detach(), rel_pos_bias_table=table.detach(),
                                                    logit_scale=logit_scale.detach(), **kw), out.detach())
    assert torch.equal(qkv.detach(), before)


def test_window_attention_with_a_mask_and_fully_masked_rows():
    heads, head_dim, n = 2, 8, 16
    qkv = torch.randn(6, 4, 4, 3 * heads * head_dim, device=DEVICE)  # 6 pre-partitioned 4x4 windows
    table = torch.randn(49, heads, device=DEVICE)
    mask = torch.randn(3, n, n, device=DEVICE)
    mask[1, 5] = float("-inf")  # row 5 of every window g with g % 3 == 1 sees no key
    out = fusedtx.window_attention(qkv, window_size=4, shift_size=0, rel_pos_bias_table=table, num_heads=heads,
                                   mask=mask)
    ref = reference.window_attention(qkv.double(), (4, 4), (0, 0), table.double(), heads, None, None, "timm",
                                     mask.double())
    assert_close(out, ref, torch.float32, "out")
    assert (out[1].reshape(n, -1)[5] == 0).all()


def test_window_geometry_is_cached_and_bounded():
    args = (13, 17, (7, 7), (3, 3), "timm", torch.device(DEVICE))
    assert fastpath.window_geometry(*args) is fastpath.window_geometry(*args)
    assert fastpath.window_geometry.cache_info().maxsize is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinusoidal(dtype):
    x = torch.randn(3, 37, 24, device=DEVICE, dtype=dtype).transpose(0, 1).contiguous().transpose(0, 1)
    positions = torch.randint(0, 2**31, (3, 37), device=DEVICE)
    for kwargs in ({}, {"offset": 2**30}, {"positions": positions}):
        out = fusedtx.add_sinusoidal(x, layout="concat", **kwargs)
        ref = reference.add_sinusoidal(x.double(), kwargs.get("positions"), kwargs.get("offset", 0), 10000.0, "concat")
        assert out.is_contiguous()
        assert_close(out, ref, dtype, f"add_sinusoidal {sorted(kwargs)}", tol=TOL[dtype])
    pe = fusedtx.sinusoidal_encoding(41, 24, offset=2**32, dtype=dtype, device=DEVICE)
    ref = reference.sinusoidal_encoding(41, 24, None, 2**32, dtype=torch.float64, device=DEVICE)
    assert (pe.double() - ref).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-3)
    pe[0, 0] = 7.0  # a caller's in-place change must not reach the cached table
    assert fusedtx.sinusoidal_encoding(41, 24, offset=2**32, dtype=dtype, device=DEVICE)[0, 0] != 7.0
    x2 = torch.randn(2, 1 + 5 * 7, 32, device=DEVICE, dtype=dtype)
    out = fusedtx.add_sincos_2d(x2, 5, 7, 1, layout="timm")
    assert_close(out, reference.add_sincos_2d(x2.double(), 5, 7, 1, 10000.0, "timm"), dtype, "add_sincos_2d",
                 tol=TOL[dtype])
    assert_close(fusedtx.sincos_2d(5, 7, 32, num_prefix_tokens=2, dtype=dtype, device=DEVICE),
                 reference.sincos_2d(5, 7, 32, 10000.0, 2, "mae", torch.float64, DEVICE), dtype, "sincos_2d",
                 tol=TOL[dtype])
