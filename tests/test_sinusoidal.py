"""Sinusoidal position encodings: generation, fused add, 2D layouts, accuracy, properties, modules."""

import warnings

import numpy as np
import pytest
import torch

import fusedtx
from fusedtx import reference
from tests.conftest import DEVICE, DTYPES, ON_CUDA
from tests.helpers import assert_close

DIMS = [2, 6, 64, 768, 1024]
LENGTHS = [1, 37, 197] + ([4097, 65537] if ON_CUDA else [])
LAYOUTS = list(reference.SINUSOIDAL_LAYOUTS)
LAYOUTS_2D = list(reference.SINCOS_2D_LAYOUTS)
GRIDS = [(14, 14), (7, 9), (1, 1), (3, 1), (64, 64)]
F64 = torch.float64


def _max_abs(out, ref) -> float:
    return (out.double().cpu() - ref.double().cpu()).abs().max().item()


def _offset() -> int:
    return int(torch.randint(1, 5000, ()).item())


# --- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", DIMS)
def test_generation(dim, layout, dtype):
    for length in LENGTHS:
        offset = _offset()
        out = fusedtx.sinusoidal_encoding(length, dim, offset=offset, layout=layout, dtype=dtype, device=DEVICE)
        ref = reference.sinusoidal_encoding(length, dim, offset=offset, layout=layout, dtype=F64, device=DEVICE)
        assert out.dtype == dtype and out.device.type == DEVICE.type
        assert_close(out, ref, dtype, f"length {length}")
        if dtype == torch.float32:
            assert _max_abs(out, ref) <= 1e-6


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_generation_at_arbitrary_position_ids(layout, index_dtype):
    high = min(torch.iinfo(index_dtype).max, 2**31)  # 1e-6 holds to |position| ~ 2^32
    for shape in [(53,), (3, 29)]:
        positions = torch.randint(-high, high, shape, device=DEVICE, dtype=index_dtype)
        offset = _offset()
        out = fusedtx.sinusoidal_encoding(shape[-1], 96, positions=positions, offset=offset, layout=layout)
        ref = reference.sinusoidal_encoding(shape[-1], 96, positions, offset, layout=layout, dtype=F64)
        assert out.shape == (*shape, 96) and out.device == positions.device
        assert _max_abs(out, ref) <= 1e-6


def test_empty_length():
    assert fusedtx.sinusoidal_encoding(0, 8, device=DEVICE).shape == (0, 8)
    x = torch.randn(2, 0, 8, device=DEVICE)
    assert fusedtx.add_sinusoidal(x).shape == (2, 0, 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS_2D)
@pytest.mark.parametrize("grid", GRIDS)
def test_sincos_2d_generation(grid, layout, dtype):
    dims = [64, 768, 1024] if ON_CUDA or grid != (64, 64) else [64]  # keep the interpreter quick
    for dim in dims:
        for prefix in (0, 1, 4):
            out = fusedtx.sincos_2d(*grid, dim, num_prefix_tokens=prefix, layout=layout, dtype=dtype, device=DEVICE)
            ref = reference.sincos_2d(*grid, dim, num_prefix_tokens=prefix, layout=layout, dtype=F64, device=DEVICE)
            assert_close(out, ref, dtype, f"grid {grid} dim {dim} prefix {prefix}")
            assert torch.equal(out[:prefix], torch.zeros_like(out[:prefix]))


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS_2D)
def test_sincos_2d_at_positions(layout, dtype, backend):
    """The encodings of chosen patches (a selection's kept ones) equal those rows of the float64 grid table."""
    grid, dim = (int(torch.randint(1, 40, ()).item()), int(torch.randint(1, 40, ()).item())), 4 * 13
    ref = reference.sincos_2d(*grid, dim, layout=layout, dtype=F64, device=DEVICE)
    with fusedtx.use_backend(backend):
        for shape in [(int(torch.randint(1, 50, ()).item()),), (3, 17)]:
            positions = torch.randint(0, grid[0] * grid[1], shape, device=DEVICE)
            out = fusedtx.sincos_2d(*grid, dim, positions=positions, layout=layout, dtype=dtype)
            assert out.shape == (*shape, dim) and out.dtype == dtype and out.device == positions.device
            assert_close(out, ref[positions], dtype, f"grid {grid} positions {shape}")


# --- accuracy at large positions -------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accuracy_near_2_pow_20(layout):
    """fp32 within 1e-6 of float64 for positions up to 2^20, where a float32 formula is far off."""
    positions = 2**20 - torch.randint(0, 2**12, (300,), device=DEVICE)
    ref = reference.sinusoidal_encoding(300, 1024, positions, layout=layout, dtype=F64)
    out = fusedtx.sinusoidal_encoding(300, 1024, positions=positions, layout=layout)
    err = _max_abs(out, ref)
    assert err <= 1e-6, f"max abs error {err:.2e} at positions near 2^20"
    # The float32 formula (the reference in float32) misses by orders of magnitude: |angle| * 2^-24.
    err_fp32 = _max_abs(reference.sinusoidal_encoding(300, 1024, positions, layout=layout), ref)
    assert err_fp32 > 100 * err, f"float32 reference error {err_fp32:.2e} vs {err:.2e}"
    # The fused add is as exact (beyond the rounding of the sum to float32).
    x = torch.randn(2, 300, 1024, device=DEVICE)
    y = fusedtx.add_sinusoidal(x, positions=positions, layout=layout)
    y_ref = reference.add_sinusoidal(x.double(), positions, layout=layout)
    assert ((y.double() - y_ref).abs() <= 1e-6 + y_ref.abs() * 2**-24).all()


def test_accuracy_beyond_2_pow_30_and_int64_offsets():
    positions = torch.randint(-(2**31), -(2**30), (64,), device=DEVICE, dtype=torch.int64)
    offset = 2**31 + 2**30  # past int32
    ref = reference.sinusoidal_encoding(64, 256, positions, offset, dtype=F64)
    assert _max_abs(fusedtx.sinusoidal_encoding(64, 256, positions=positions, offset=offset), ref) <= 1e-6


def test_absurd_positions_stay_bounded():
    """Ids anywhere in int64 give finite values in [-1, 1] (beyond ~2^33 float64 itself loses 1e-6, and
    the kernel clamps positions to +-2^48)."""
    positions = torch.randint(-(2**63), 2**63 - 1, (100,), device=DEVICE)
    out = fusedtx.sinusoidal_encoding(100, 64, positions=positions)
    assert torch.isfinite(out).all() and out.abs().max().item() <= 1.0


def test_reference_fallback_is_accurate():
    positions = 2**20 - torch.randint(0, 2**12, (50,), device=DEVICE)
    ref = reference.sinusoidal_encoding(50, 64, positions, dtype=F64)
    with fusedtx.use_backend("reference"):
        out = fusedtx.sinusoidal_encoding(50, 64, positions=positions)
    assert out.dtype == torch.float32 and _max_abs(out, ref) <= 1e-6


def test_float64_takes_the_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fusedtx.sinusoidal_encoding(33, 64, offset=7, dtype=F64, device=DEVICE)
        x = torch.randn(2, 1 + 12, 16, device=DEVICE, dtype=F64)
        y = fusedtx.add_sincos_2d(x, 3, 4, 1)
    assert_close(out, reference.sinusoidal_encoding(33, 64, offset=7, dtype=F64, device=DEVICE), F64)
    assert_close(y, reference.add_sincos_2d(x, 3, 4, 1), F64)


# --- the properties the encoding is chosen for -----------------------------------------------------


def _pairs(pe, layout):
    """(sin, cos) halves of each frequency's pair."""
    half = pe.shape[-1] // 2
    return (pe[..., 0::2], pe[..., 1::2]) if layout == "interleaved" else (pe[..., :half], pe[..., half:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_relative_position_is_a_fixed_rotation(layout):
    """PE(p + k) = R(k) PE(p) for every frequency pair, with R(k) read off PE(k) itself."""
    p = torch.randint(0, 2**20, (400,), device=DEVICE)
    k = int(torch.randint(1, 10**4, ()).item())
    sin_p, cos_p = _pairs(fusedtx.sinusoidal_encoding(400, 128, positions=p, layout=layout), layout)
    sin_pk, cos_pk = _pairs(fusedtx.sinusoidal_encoding(400, 128, positions=p, offset=k, layout=layout), layout)
    sin_k, cos_k = _pairs(fusedtx.sinusoidal_encoding(1, 128, offset=k, layout=layout, device=DEVICE), layout)
    torch.testing.assert_close(sin_pk, sin_p * cos_k + cos_p * sin_k, atol=2e-6, rtol=0)
    torch.testing.assert_close(cos_pk, cos_p * cos_k - sin_p * sin_k, atol=2e-6, rtol=0)


@pytest.mark.parametrize("dim", [6, 64] + ([768] if ON_CUDA else []))
def test_positions_below_1e5_have_distinct_encodings(dim):
    """||PE(p + d) - PE(p)|| depends on d only (checked on random p), and is far from 0 for every
    0 < d < 10^5: so no two positions below 10^5 share an encoding."""
    n = 10**5
    table = fusedtx.sinusoidal_encoding(n, dim, device=DEVICE).double()
    dist = (table[1:] - table[0]).norm(dim=1)  # dist[d - 1] = ||PE(d) - PE(0)||
    margin = 0.01 if dim == 6 else 1.0  # smallest distances in float64: 0.056 (dim 6), 1.47 (dim 64)
    assert dist.min().item() > margin
    p = torch.randint(0, n // 2, (2000,), device=DEVICE)
    d = torch.randint(1, n // 2, (2000,), device=DEVICE)
    torch.testing.assert_close((table[p + d] - table[p]).norm(dim=1), dist[d - 1], atol=1e-5, rtol=0)


def test_neighbouring_positions_are_close():
    """Smoothness: ||PE(p+1) - PE(p)|| <= sqrt(sum freq^2) (the derivative's norm) for every p, far below
    the typical distance between unrelated positions."""
    dim = 256
    table = fusedtx.sinusoidal_encoding(20000, dim, offset=_offset(), device=DEVICE).double()
    step = (table[1:] - table[:-1]).norm(dim=1)
    bound = reference.sinusoidal_frequencies(dim // 2, 10000.0, F64).square().sum().sqrt().item()
    assert step.max().item() <= bound + 1e-5
    far = (table[torch.randperm(20000)[:1000]] - table[torch.randperm(20000)[:1000]]).norm(dim=1)
    assert step.max().item() < 0.2 * far.median().item()


# --- 2D layouts against the published builders ----------------------------------------------------


def _mae_1d(embed_dim, pos):
    """MAE util/pos_embed.py get_1d_sincos_pos_embed_from_grid, re-derived (float64)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(embed_dim, grid_h, grid_w, cls_token):
    """MAE get_2d_sincos_pos_embed (square grids there; grid_h x grid_w here, same construction)."""
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))  # w first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb_h = _mae_1d(embed_dim // 2, grid[0])  # MAE's names: grid[0] holds the column index
    emb_w = _mae_1d(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb)


@pytest.mark.parametrize("grid,dim", [((14, 14), 768), ((64, 64), 64), ((7, 9), 64), ((9, 7), 1024)])
@pytest.mark.parametrize("cls_token", [False, True])
def test_mae_layout_equals_mae_builder(grid, dim, cls_token):
    out = fusedtx.sincos_2d(*grid, dim, num_prefix_tokens=int(cls_token), device=DEVICE)
    assert_close(out, _mae_2d(dim, *grid, cls_token), torch.float32)
    assert _max_abs(out, _mae_2d(dim, *grid, cls_token)) <= 1e-6


@pytest.mark.parametrize("interleave_sin_cos,layout", [(False, "timm"), (True, "mae_hw")])
def test_timm_layouts_equal_timm_builder(interleave_sin_cos, layout):
    from timm.layers import pos_embed_sincos

    for grid, dim in [((14, 14), 768), ((7, 9), 64)]:
        expected = pos_embed_sincos.build_sincos2d_pos_embed(list(grid), dim, interleave_sin_cos=interleave_sin_cos)
        out = fusedtx.sincos_2d(*grid, dim, layout=layout, device=DEVICE)
        assert_close(out, expected, torch.float32)  # timm builds in float32, exact enough at these positions


# --- fused add -------------------------------------------------------------------------------------


def _strided(shape, dtype, kind):
    """x of ``shape`` (batch, seq, dim): contiguous, sequence-major (transposed) or with a channel stride."""
    b, s, d = shape
    if kind == "contiguous":
        return torch.randn(shape, device=DEVICE, dtype=dtype)
    if kind == "transposed":
        return torch.randn(s, b, d, device=DEVICE, dtype=dtype).transpose(0, 1)
    return torch.randn(b, d, s, device=DEVICE, dtype=dtype).transpose(1, 2)  # channel stride = seq


def _positions(kind, b, s):
    if kind is None:
        return None
    shape = {"seq": (s,), "batch": (b, s), "broadcast": (1, s)}[kind]
    return torch.randint(-(2**20), 2**20, shape, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 37, 64), (2, 197, 768), (1, 1, 6), (4, 5, 2), (2, 9, 1024)])
def test_add_sinusoidal(shape, layout, dtype):
    for kind, pos_kind in [("contiguous", None), ("transposed", "seq"), ("channel-strided", "batch"),
                           ("contiguous", "broadcast")]:
        x = _strided(shape, dtype, kind)
        positions, offset = _positions(pos_kind, *shape[:2]), _offset()
        y = fusedtx.add_sinusoidal(x, offset=offset, positions=positions, layout=layout)
        assert y.dtype == dtype and y.is_contiguous() and y.data_ptr() != x.data_ptr()
        ref = reference.add_sinusoidal(x.double(), positions, offset, layout=layout)
        assert_close(y, ref, dtype, f"{kind} x, positions {pos_kind}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS_2D)
@pytest.mark.parametrize("grid,prefix", [((14, 14), 1), ((7, 9), 0), ((3, 5), 4)] + ([((64, 64), 1)] * ON_CUDA))
def test_add_sincos_2d(grid, prefix, layout, dtype):
    for kind in ("contiguous", "transposed", "channel-strided"):
        x = _strided((2, prefix + grid[0] * grid[1], 64 if not ON_CUDA else 768), dtype, kind)
        y = fusedtx.add_sincos_2d(x, *grid, prefix, layout=layout)
        assert y.dtype == dtype and y.is_contiguous()
        assert_close(y, reference.add_sincos_2d(x.double(), *grid, prefix, layout=layout), dtype, kind)
        assert torch.equal(y[:, :prefix], x[:, :prefix])  # prefix tokens pass unchanged


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_flows_to_x_only(dtype):
    positions = torch.randint(0, 1000, (2, 13), device=DEVICE)
    pairs = [
        (lambda t: fusedtx.add_sinusoidal(t, positions=positions, offset=3),
         lambda t: reference.add_sinusoidal(t, positions, 3)),
        (lambda t: fusedtx.add_sincos_2d(t, 3, 4, 1, layout="timm"),
         lambda t: reference.add_sincos_2d(t, 3, 4, 1, layout="timm")),
    ]
    for op, ref_op in pairs:
        x = torch.randn(2, 13, 64, device=DEVICE, dtype=dtype, requires_grad=True)
        dy = torch.randn(2, 13, 64, device=DEVICE, dtype=dtype)
        op(x).backward(dy)
        x_ref = x.detach().double().requires_grad_()
        ref_op(x_ref).backward(dy.double())
        assert_close(x.grad, x_ref.grad, dtype, "dx")
        assert torch.equal(x.grad, dy)  # d(x + PE)/dx is the identity


# --- modules ---------------------------------------------------------------------------------------


def test_modules_have_no_parameters_or_state():
    for m in (fusedtx.nn.SinusoidalPositionalEncoding(64, dropout=0.1),
              fusedtx.nn.SinCos2dPositionalEncoding(64, num_prefix_tokens=1)):
        assert list(m.parameters()) == [] and list(m.buffers()) == []
        assert m.state_dict() == {}
        m.load_state_dict({})  # strict: nothing missing, nothing unexpected


def test_1d_module_matches_functional():
    m = fusedtx.nn.SinusoidalPositionalEncoding(96, base=500.0, layout="concat", dropout=0.3).eval()
    x = torch.randn(2, 21, 96, device=DEVICE)
    positions = torch.randint(0, 10**6, (2, 21), device=DEVICE)
    offset = _offset()
    assert_close(m(x, offset=offset), reference.add_sinusoidal(x.double(), None, offset, 500.0, "concat"),
                 torch.float32)
    assert_close(m(x, positions=positions), reference.add_sinusoidal(x.double(), positions, 0, 500.0, "concat"),
                 torch.float32)


def test_module_dropout_in_training():
    m = fusedtx.nn.SinusoidalPositionalEncoding(64, dropout=0.5).train()
    x = torch.randn(4, 50, 64, device=DEVICE)
    y = m(x)
    kept = y != 0
    assert 0.3 < kept.float().mean().item() < 0.7
    expected = 2 * reference.add_sinusoidal(x.double())
    assert_close(y[kept], expected[kept], torch.float32)


def test_2d_module_serves_any_grid():
    m = fusedtx.nn.SinCos2dPositionalEncoding(64, num_prefix_tokens=1).eval()
    for grid_size, (h, w) in [(14, (14, 14)), ((64, 64), (64, 64)), ((7, 9), (7, 9))]:
        x = torch.randn(2, 1 + h * w, 64, device=DEVICE)
        assert_close(m(x, grid_size), reference.add_sincos_2d(x.double(), h, w, 1), torch.float32)


def test_torch_compile_fullgraph():
    m1 = fusedtx.nn.SinusoidalPositionalEncoding(64)
    m2 = fusedtx.nn.SinCos2dPositionalEncoding(64, num_prefix_tokens=1)

    def f(x, offset, z, grid):
        return m1(x, offset=offset).sum() + m2(z, grid).sum()

    compiled = torch.compile(f, fullgraph=True)
    for seq, offset, grid in [(11, 5, (3, 4)), (13, 9, (5, 2)), (7, 100, (2, 2))]:
        x = torch.randn(2, seq, 64, device=DEVICE, requires_grad=True)
        z = torch.randn(2, 1 + grid[0] * grid[1], 64, device=DEVICE, requires_grad=True)
        out = compiled(x, offset, z, grid)
        out.backward()
        expected = reference.add_sinusoidal(x.double(), None, offset).sum() + reference.add_sincos_2d(
            z.double(), *grid, 1).sum()
        assert abs(out.item() - expected.item()) <= 1e-3 * expected.abs().item() + 1e-3
        assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(z.grad, torch.ones_like(z))
    gen = torch.compile(lambda n: fusedtx.sincos_2d(n, n, 32, device=DEVICE) + fusedtx.sinusoidal_encoding(
        n * n, 32, device=DEVICE), fullgraph=True)
    assert_close(gen(3), reference.sincos_2d(3, 3, 32, dtype=F64) + reference.sinusoidal_encoding(9, 32, dtype=F64),
                 torch.float32)


def test_custom_op_registration():
    x = torch.randn(2, 5, 8, device=DEVICE)
    positions = torch.randint(0, 100, (2, 5), device=DEVICE)
    ops = torch.ops.fusedtx
    torch.library.opcheck(ops.add_sinusoidal, (x, positions, 3, 10000.0, "interleaved"))
    torch.library.opcheck(ops.add_sincos_2d, (x, 2, 2, 1, 10000.0, "mae"))
    torch.library.opcheck(ops.sinusoidal_encoding, (5, 8, positions, 3, 10000.0, "concat", torch.float16, DEVICE))
    torch.library.opcheck(ops.sincos_2d, (2, 3, 8, 1, 10000.0, "timm", torch.float32, DEVICE))


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need CUDA")
def test_cuda_graph_replay_with_new_positions():
    x = torch.randn(4, 33, 256, device=DEVICE, dtype=torch.bfloat16)
    positions = torch.randint(0, 10**6, (4, 33), device=DEVICE)
    fusedtx.add_sinusoidal(x, positions=positions)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fusedtx.add_sinusoidal(x, positions=positions)
    positions.copy_(torch.randint(0, 10**6, (4, 33), device=DEVICE))
    graph.replay()
    assert_close(y, reference.add_sinusoidal(x.double(), positions), torch.bfloat16)


# --- errors ----------------------------------------------------------------------------------------


def test_odd_or_indivisible_dims_are_rejected():
    x = torch.randn(2, 5, 7, device=DEVICE)
    for call in (lambda: fusedtx.sinusoidal_encoding(10, 7), lambda: fusedtx.add_sinusoidal(x),
                 lambda: fusedtx.nn.SinusoidalPositionalEncoding(7), lambda: fusedtx.sincos_2d(2, 2, 6),
                 lambda: fusedtx.add_sincos_2d(torch.randn(1, 4, 6, device=DEVICE), 2, 2),
                 lambda: fusedtx.nn.SinCos2dPositionalEncoding(6)):
        with pytest.raises(ValueError, match="dim"):
            call()


def test_bad_arguments_are_named():
    x = torch.randn(2, 5, 8, device=DEVICE)
    cases = [
        (ValueError, "layout", lambda: fusedtx.sinusoidal_encoding(4, 8, layout="mae")),
        (ValueError, "layout", lambda: fusedtx.sincos_2d(2, 2, 8, layout="interleaved")),
        (ValueError, "base", lambda: fusedtx.sinusoidal_encoding(4, 8, base=0.0)),
        (ValueError, "length", lambda: fusedtx.sinusoidal_encoding(-1, 8)),
        (TypeError, "dtype", lambda: fusedtx.sinusoidal_encoding(4, 8, dtype=torch.int32)),
        (TypeError, "positions", lambda: fusedtx.add_sinusoidal(x, positions=torch.rand(5, device=DEVICE))),
        (ValueError, "positions", lambda: fusedtx.add_sinusoidal(x, positions=torch.arange(4, device=DEVICE))),
        (ValueError, "positions", lambda: fusedtx.add_sinusoidal(x, positions=torch.zeros(3, 5, dtype=torch.long,
                                                                                        device=DEVICE))),
        (ValueError, "x must", lambda: fusedtx.add_sinusoidal(x[0])),
        (ValueError, "x must", lambda: fusedtx.add_sincos_2d(x, 2, 3)),
        (ValueError, "grid_h", lambda: fusedtx.sincos_2d(0, 3, 8)),
        (ValueError, "positions must lie", lambda: fusedtx.sincos_2d(2, 3, 8, positions=torch.tensor([6]))),
        (ValueError, "num_prefix_tokens", lambda: fusedtx.sincos_2d(2, 3, 8, num_prefix_tokens=1,
                                                                    positions=torch.tensor([0]))),
        (TypeError, "positions", lambda: fusedtx.sincos_2d(2, 3, 8, positions=[0, 1])),
        (ValueError, "positions must have shape", lambda: fusedtx.sincos_2d(2, 3, 8, positions=torch.tensor(1))),
        (TypeError, "offset", lambda: fusedtx.add_sinusoidal(x, offset=1.5)),
        (ValueError, "grid_size", lambda: fusedtx.nn.SinCos2dPositionalEncoding(8)(x, (1, 2, 3))),
        (ValueError, "x must", lambda: fusedtx.nn.SinusoidalPositionalEncoding(16)(x)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()
