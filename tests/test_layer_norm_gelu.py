"""LayerNorm+GELU: kernels, op, modules against the float64 reference."""

import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fusedtx
from fusedtx import _backend, reference
from tests.conftest import DEVICE, DTYPES, ON_CUDA
from tests.helpers import TOLERANCE, assert_close, away_from_relu_kink

WIDTHS = [17, 96, 768, 1280, 4096, 8192, 16384, 20011]  # 20011: wider than one block, chunked path
ACTIVATIONS = list(reference.ACTIVATIONS)


def _inputs(rows, n, dtype, residual=False, affine=True):
    x = torch.randn(rows, n, device=DEVICE, dtype=dtype)
    w = (1 + 0.5 * torch.randn(n, device=DEVICE, dtype=dtype)) if affine else None
    b = 0.5 * torch.randn(n, device=DEVICE, dtype=dtype) if affine else None
    r = torch.randn(rows, n, device=DEVICE, dtype=dtype) if residual else None
    return x, w, b, r


def _check(x, w, b, r, activation, dtype, eps=1e-5):
    """Run the fused op forward and backward and compare every output and gradient with float64.

    With a residual, the op normalizes s = x + r rounded to x's dtype (as PyTorch's ``x + r``), so the
    float64 reference starts from that s; dx and dresidual both equal ds_total = d(y)/ds + d(sum output).
    dx is held to the dtype's bound relative to the larger of its own norm and that of the terms it is the
    difference of, rstd·g (g = d(y)/d(xhat)): where the row's normalization cancels them (two features: dx is
    proportional to 1 - xhat² = eps / (var + eps)), no float32 computation holds the bound relative to dx
    itself. For a row of random features the two norms are alike and the bound is the dtype's. For a ReLU, no
    output lies within rounding of its kink (:func:`~tests.helpers.away_from_relu_kink`).
    """
    if activation == "relu" and b is not None:
        b = away_from_relu_kink(x if r is None else x + r, w, b, eps)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = fusedtx.layer_norm_gelu(leaves[0], leaves[1], leaves[2], eps, activation, leaves[3])
    y, s = out if r is not None else (out, None)
    normed = (x if r is None else x + r).detach().double().requires_grad_()
    w64, b64 = (t.detach().double().requires_grad_() if t is not None else None for t in (w, b))
    y_ref = reference.layer_norm_gelu(normed, w64, b64, eps, activation)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, dtype, "y")
    dy = torch.randn_like(y)
    if r is None:
        y.backward(dy)
        y_ref.backward(dy.double())
    else:
        assert torch.equal(s, x + r), "residual sum"
        ds = torch.randn_like(s)
        torch.autograd.backward((y, s), (dy, ds))
        torch.autograd.backward((y_ref, normed), (dy.double(), ds.double()))
    ref_grads = (normed.grad, w64 if w is None else w64.grad, b64 if b is None else b64.grad, normed.grad)
    dx_tol = TOLERANCE[dtype] * max(1.0, (_dx_terms(normed, w64, b64, eps, activation, dy) / normed.grad.norm()).item())
    for t, ref_grad, name in zip(leaves, ref_grads, ("dx", "dweight", "dbias", "dresidual"), strict=True):
        if t is not None:
            assert_close(t.grad, ref_grad, dtype, name, tol=dx_tol if name in ("dx", "dresidual") else None)


def _dx_terms(s64, w64, b64, eps, activation, dy):
    """‖rstd·g‖ in float64, g = d(y)/d(xhat) for the upstream gradient ``dy``: the size of the terms whose
    difference is dx (dx = rstd·(g - mean(g) - xhat·mean(g·xhat)))."""
    mean, rstd = reference.layer_norm_stats(s64.detach(), eps)
    xhat = ((s64.detach() - mean[..., None]) * rstd[..., None]).requires_grad_()
    z = xhat * w64.detach() if w64 is not None else xhat
    z = z + b64.detach() if b64 is not None else z
    (g,) = torch.autograd.grad(reference.apply_activation(z, activation), xhat, dy.double())
    return (g * rstd[..., None]).norm()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_widths(n, dtype):
    rows = 67 if n <= 1280 else 3
    _check(*_inputs(rows, n, dtype), "gelu", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n", [96, 20011])
def test_activations_and_residual(activation, residual, n, dtype):
    _check(*_inputs(5 if n > 1000 else 33, n, dtype, residual=residual), activation, dtype)


@pytest.mark.parametrize("n", [96, 20011])
def test_no_affine(n):
    _check(*_inputs(7, n, torch.float32, affine=False), "gelu", torch.float32)
    x, w, b, _ = _inputs(7, n, torch.float32)
    _check(x, w, None, None, "gelu_tanh", torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_input(dtype):
    base = torch.randn(96, 2 * 53, device=DEVICE, dtype=dtype)
    x = base[:, ::2].t()  # (53, 96) with strides (2, 106): no unit stride anywhere
    assert not x.is_contiguous()
    _, w, b, _ = _inputs(1, x.shape[-1], dtype)
    r = torch.randn(x.shape[::-1], device=DEVICE, dtype=dtype).t()
    _check(x, w, b, None, "gelu", dtype)
    _check(x, w, b, r, "gelu", dtype)


def test_leading_dims_and_empty():
    x, w, b, _ = _inputs(2 * 3 * 5, 40, torch.float32)
    _check(x.view(2, 3, 5, 40), w, b, None, "gelu", torch.float32)
    # No rows, or rows of width 0: PyTorch's shapes, and zero gradients for the parameters (no launch).
    for shape in ((0, 40), (2, 0, 40), (3, 0)):
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        w, b = (torch.randn(shape[-1], device=DEVICE, requires_grad=True) for _ in range(2))
        with fusedtx.use_backend("triton"):
            y, s = fusedtx.layer_norm_gelu(x, w, b, residual=torch.randn(shape, device=DEVICE))
            grads = torch.autograd.grad((y.sum() + s.sum()), (x, w, b))
        assert y.shape == s.shape == shape
        for g, t in zip(grads, (x, w, b), strict=True):
            assert g.shape == t.shape and not g.any()


@pytest.mark.skipif(not ON_CUDA, reason="65,536+ programs of rows take minutes in Triton's CPU interpreter")
def test_rows_beyond_65535_programs():
    # 17-wide rows pack 16 per program: 16 * 70,000 rows need 70,000 programs.
    _check(*_inputs(16 * 70_000 + 3, 17, torch.float16), "gelu", torch.float16)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA: the interpreter runs programs one at a time, in order")
def test_backward_is_deterministic():
    x, w, b, r = _inputs(257, 768, torch.float32, residual=True)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
        y, s = fusedtx.layer_norm_gelu(*leaves[:3], residual=leaves[3])
        (y.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3000), rows=st.integers(1, 40), residual=st.booleans())
@example(n=2, rows=1, residual=False)  # dx cancels at two features (see _check); failed at 1.75e-4
def test_random_shapes(n, rows, residual):
    _check(*_inputs(rows, n, torch.float32, residual=residual), "gelu", torch.float32)


# --- modules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [768, (5, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_module_matches_torch(shape, bias):
    stock = torch.nn.LayerNorm(shape, eps=1e-6, bias=bias, device=DEVICE)
    with torch.no_grad():
        stock.weight.normal_()
        if bias:
            stock.bias.normal_()
    fused = fusedtx.nn.LayerNorm(shape, eps=1e-6, bias=bias, device=DEVICE)
    fused.load_state_dict(stock.state_dict())
    assert fused.state_dict().keys() == stock.state_dict().keys()
    stock.load_state_dict(fused.state_dict())  # and back
    x = torch.randn(3, 7, *stock.normalized_shape, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), stock(x2)
    assert_close(y, y_ref, torch.float32, "output", tol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert_close(x.grad, x2.grad, torch.float32, "dx", tol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_layer_norm_gelu_module_from_sequential(approximate):
    norm, act = torch.nn.LayerNorm(96, device=DEVICE), torch.nn.GELU(approximate=approximate)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = fusedtx.nn.LayerNormGELU.from_module(norm, act)
    assert fused.weight is norm.weight and fused.bias is norm.bias  # shared, not copied
    x = torch.randn(2, 49, 96, device=DEVICE)
    assert_close(fused(x), act(norm(x)), torch.float32, tol=1e-5)
    assert fused.state_dict().keys() == norm.state_dict().keys()


def test_from_module_plain_layer_norm():
    norm = torch.nn.LayerNorm(33, elementwise_affine=False, device=DEVICE).eval()
    fused = fusedtx.nn.LayerNorm.from_module(norm)
    assert fused.weight is None and not fused.training
    x = torch.randn(4, 33, device=DEVICE)
    assert_close(fused(x), norm(x), torch.float32, tol=1e-5)


def test_module_residual_returns_sum():
    m = fusedtx.nn.LayerNormGELU(64, device=DEVICE)
    x, r = torch.randn(9, 64, device=DEVICE), torch.randn(9, 64, device=DEVICE)
    y, s = m(x, r)
    assert torch.equal(s, x + r)
    assert_close(y, torch.nn.functional.gelu(torch.nn.functional.layer_norm(x + r, (64,))), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtype_matches_torch(dtype):
    stock = torch.nn.LayerNorm(48, device=DEVICE)
    fused = fusedtx.nn.LayerNorm.from_module(stock)
    for x_dtype in (torch.float32, dtype):
        x = torch.randn(5, 48, device=DEVICE, dtype=x_dtype)
        with torch.autocast(DEVICE.type, dtype=dtype):
            expected, got = stock(x), fused(x)
        assert got.dtype == expected.dtype


def test_torch_compile_fullgraph():
    m = fusedtx.nn.LayerNormGELU(40, device=DEVICE)
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    with torch.no_grad():  # fresh random affine parameters, not ones and zeros
        m.weight.normal_()
        m.bias.normal_()
    compiled = torch.compile(m, fullgraph=True)
    y = compiled(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
    refs = [t.detach().double().requires_grad_() for t in (x, m.weight, m.bias)]
    ref = reference.layer_norm_gelu(*refs)
    assert_close(y, ref, torch.float32)
    for g, rg, name in zip(grads, torch.autograd.grad(ref, refs, dy.double()), ("dx", "dweight", "dbias"), strict=True):
        assert_close(g, rg, torch.float32, name)


def test_custom_op_registration():
    x, w, b, r = _inputs(3, 16, torch.float32, residual=True)
    torch.library.opcheck(torch.ops.fusedtx.layer_norm_gelu_fwd, (x, w, b, r, 1e-5, "gelu"))


# --- errors and fallbacks --------------------------------------------------------------------------


def test_bad_arguments_are_named():
    x, w, b, r = _inputs(4, 16, torch.float32, residual=True)
    with pytest.raises(ValueError, match="weight"):
        fusedtx.layer_norm_gelu(x, w[:8], b)
    with pytest.raises(ValueError, match="bias"):
        fusedtx.layer_norm_gelu(x, w, torch.randn(4, 4, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        fusedtx.layer_norm_gelu(x, w, b, activation="swish")
    with pytest.raises(ValueError, match="residual"):
        fusedtx.layer_norm_gelu(x, w, b, residual=r[:2])
    with pytest.raises(TypeError, match="residual"):
        fusedtx.layer_norm_gelu(x, w, b, residual=r.half())
    with pytest.raises(TypeError, match="x must"):
        fusedtx.layer_norm_gelu(x.long(), w, b)
    with pytest.raises(ValueError, match="weight is on meta"):
        fusedtx.layer_norm_gelu(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="normalized_shape"):
        fusedtx.nn.LayerNorm(16)(torch.randn(4, 15, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        fusedtx.nn.LayerNormGELU(16, activation="swish")


def test_float64_falls_back_to_reference_with_one_warning():
    _backend._warned.clear()
    x, w, b, _ = _inputs(5, 24, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = fusedtx.layer_norm_gelu(x, w, b)
        fusedtx.layer_norm_gelu(x, w, b)
    fallback = [w for w in caught if "layer_norm_gelu" in str(w.message)]
    assert len(fallback) == 1 and "float64" in str(fallback[0].message)
    assert_close(y1, reference.layer_norm_gelu(x, w, b), torch.float64)


def test_reference_backend_gives_same_numbers():
    x, w, b, r = _inputs(11, 100, torch.float32, residual=True)
    with fusedtx.use_backend("reference"):
        _check(x, w, b, r, "gelu", torch.float32)
