"""Launch configs per GPU architecture: the family a device takes, the launch guard that retries a smaller
config on OutOfResources (forced here in the interpreter), and the CI guard that the committed resource tables
still list the configs the launchers pick and that the largest of them fit each target."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from triton.runtime import OutOfResources

from fusedtx.kernels import attention as ka
from fusedtx.kernels import tuning
from fusedtx.kernels import window_attention as kw
from fusedtx.kernels.support import ARCH_FAMILIES, SHARED_MEMORY_PER_BLOCK, arch_family

from .conftest import DEVICE, ON_CUDA

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "bench" / "results"


@pytest.mark.parametrize(("capability", "family"), [
    ((8, 0), "ampere"), ((8, 6), "ampere"), ((8, 9), "ampere"), ((9, 0), "hopper"), ((10, 0), "blackwell"),
    ((10, 3), "blackwell"), ((12, 0), "blackwell_consumer"), ((7, 5), "ampere"), ((13, 0), "ampere"),
])
def test_arch_family(capability, family):
    assert arch_family(capability) == family


def test_shrink_ends_at_the_smallest_config():
    chain = [(128, 64, 8, 3)]
    while (smaller := tuning.shrink(chain[-1])) is not None:
        chain.append(smaller)
    assert chain[1] == (128, 64, 8, 2)
    assert chain[-1] == (16, 16, 8, 1)
    assert all(a[0] * a[1] * a[3] > b[0] * b[1] * b[3] for a, b in zip(chain, chain[1:], strict=False))
    assert tuning.shrink((64, 32, 4, 1), fixed_m=True) == (64, 16, 4, 1)
    assert tuning.shrink((64, 16, 4, 1), fixed_m=True) is None


DTYPES = [(torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee")]


@pytest.mark.parametrize("family", ARCH_FAMILIES)
def test_every_family_has_every_config(family):
    for dtype, precision in DTYPES:
        for kind in ("fwd", "dkdv", "dq", "dbias"):
            for d in (32, 64, 80, 128, 256):
                for has_bias in (False, True):
                    bm, bn, warps, stages = ka.configs(kind, d, dtype, has_bias, family=family, precision=precision)
                    assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1
        for kind in ("fwd", "bwd", "dq"):
            for tokens in (49, 64, 144, 256):
                for d in (32, 64):
                    for has_mask in (False, True):
                        bm, bn, warps, stages = kw.configs(kind, tokens, d, dtype, family=family, precision=precision,
                                                           has_mask=has_mask)
                        assert 16 <= bm <= kw.block_q(tokens) and 16 <= bn <= kw.block_q(tokens)
                        assert warps in (4, 8) and stages >= 1
                        assert kind != "bwd" or bm == kw.block_q(tokens)  # the backward's tile is the whole window
                        assert kw.candidates(kind, tokens, d, dtype, family, precision, has_mask)[0] == \
                            (bm, bn, warps, stages)


@pytest.mark.parametrize("family", ARCH_FAMILIES)
def test_masked_window_configs_differ_only_where_listed(family):
    """A masked launch takes the unmasked config except where the mask table says otherwise; every entry there
    is a padded window and head dim the launchers run (head dim 32: Swin's), in a dots kind that exists, and
    differs from the unmasked config it replaces (else it would be a dead entry)."""
    overrides = kw._MASK_OVERRIDES[family]
    for dtype, precision in DTYPES:
        dots = kw._dots(dtype, precision)
        for kind in ("fwd", "bwd", "dq"):
            for tokens in (49, 64, 144, 256):
                for d in (32, 64):
                    plain = kw.configs(kind, tokens, d, dtype, family, precision)
                    masked = kw.configs(kind, tokens, d, dtype, family, precision, has_mask=True)
                    key = (kind, kw.block_q(tokens), d, dots)
                    assert masked == overrides.get(key, plain)
                    assert key not in overrides or masked != plain
    for kind, n, d, dots in overrides:
        assert kind in ("fwd", "bwd", "dq") and n in (64, 256) and d == 32 and dots in ("16-bit", "tf32", "ieee")


@pytest.fixture
def fp32_precision():
    """Sets PyTorch's float32 matmul precision ("tf32" or "ieee") for a test and restores it after."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield lambda precision: setattr(matmul, "fp32_precision", precision)
    matmul.fp32_precision = before


def test_float32_launches_follow_the_dot_precision(fp32_precision):
    """A float32 launch takes the configs of the dot precision it compiles (TF32 on: tensor cores; off,
    PyTorch's default: FMA loops, which need smaller tiles to stay spill-free), and its tuned configs are
    stored apart: a config tuned with TF32 on is not used with it off."""
    from fusedtx.kernels.support import dot_precision, dtype_tag

    q, qkv = _rand(1, 2, 49, 32), _rand(1, 7, 7, 3 * 2 * 32)
    tags, keys = set(), set()
    for precision in ("tf32", "ieee"):
        fp32_precision(precision)
        assert dot_precision(torch.float32) == precision and dot_precision(torch.bfloat16) == "tf32"
        tags.add(dtype_tag(torch.float32))
        keys.update({ka._tuning("fwd", q).key, kw._tuning("bwd", qkv, 49, 32).key})
        for family in ARCH_FAMILIES:
            assert ka.configs("dq", 64, torch.float32, True, family) == \
                ka.configs("dq", 64, torch.float32, True, family, precision)
            assert kw.configs("bwd", 64, 32, torch.float32, family) == \
                kw.configs("bwd", 64, 32, torch.float32, family, precision)
    assert tags == {"float32-tf32", "float32-ieee"} and len(keys) == 4
    assert dtype_tag(torch.bfloat16) == "bfloat16"


def test_masked_window_launches_take_their_own_configs(monkeypatch):
    """A window launch with an attention mask (HAS_MASK) takes the masked configs, and its tuned configs are
    stored apart: a config tuned without a mask is not used with one, nor the reverse."""
    qkv = _rand(1, 7, 7, 3 * 2 * 32)
    assert kw._tuning("bwd", qkv, 49, 32).key != kw._tuning("bwd", qkv, 49, 32, True).key
    assert kw._tuning("bwd", qkv, 49, 32).key == kw._tuning("bwd", qkv, 49, 32, False).key
    assert kw._tuning("bwd", qkv, 49, 32, True).key.endswith("|mask1")
    monkeypatch.setattr(kw, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(kw, "device_family", lambda device: "ampere")
    for has_mask in (False, True):
        assert kw._launch_config("bwd", qkv.bfloat16(), 49, 32, has_mask) == \
            kw.configs("bwd", 49, 32, torch.bfloat16, "ampere", has_mask=has_mask)
    assert kw._launch_config("bwd", qkv.bfloat16(), 49, 32, True) != kw._launch_config("bwd", qkv.bfloat16(), 49, 32)
    # the launchers pass has_mask=mask is not None
    seen = []
    monkeypatch.setattr(kw, "launch", lambda kernel, key, config, run, **_: seen.append((key, config)))
    table = _rand(13 * 13, 2)
    mask = torch.zeros(1, 49, 49, device=DEVICE)
    for m in (None, mask):
        kw.window_attention_fwd(qkv, table, None, m, (7, 7), (0, 0), 2, 0.2, "timm")
    assert [key[-1] for key, _ in seen] == [False, True]


def _forced(monkeypatch, module, name, fails):
    """Replace kernel ``name`` of ``module`` by one that raises OutOfResources while ``fails(constexprs)``."""
    kernel = getattr(module, name)
    calls = []

    class Forced:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(dict(kwargs))
                if fails(kwargs):
                    raise OutOfResources(300 * 1024, 99 * 1024, "shared memory")
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(module, name, Forced())
    monkeypatch.setattr(tuning, "_working", {})
    monkeypatch.setattr(tuning, "_warned", set())
    return calls


def _rand(*shape):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32)


def test_attention_launch_retries_a_smaller_config(monkeypatch):
    q, k, v = _rand(1, 2, 49, 32), _rand(1, 2, 40, 32), _rand(1, 2, 40, 32)
    want, want_lse = ka.attention_fwd(q, k, v, None, None, False, 0.2)
    first = ka._launch_config("fwd", q)
    calls = _forced(monkeypatch, ka, "_attn_fwd_kernel", lambda kw_: kw_["BLOCK_M"] == first[0])
    with pytest.warns(RuntimeWarning, match="does not fit this GPU") as record:
        out, lse = ka.attention_fwd(q, k, v, None, None, False, 0.2)
    assert len([w for w in record if "does not fit" in str(w.message)]) == 1
    assert calls[-1]["BLOCK_M"] < first[0]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():  # the second call goes straight to the config that launched, silently
        warnings.simplefilter("error", RuntimeWarning)  # the guard's; not the interpreter's numpy deprecations
        n = len(calls)
        ka.attention_fwd(q, k, v, None, None, False, 0.2)
    assert len(calls) == n + 1 and calls[-1]["BLOCK_M"] < first[0]


def test_attention_backward_retries_a_smaller_config(monkeypatch):
    q, k, v = _rand(1, 2, 49, 32), _rand(1, 2, 49, 32), _rand(1, 2, 49, 32)
    out, lse = ka.attention_fwd(q, k, v, None, None, True, 0.2)
    do = _rand(1, 2, 49, 32)
    want = ka.attention_bwd(do, q, k, v, out, lse, None, None, True, 0.2, False)[:3]
    first = ka._launch_config("dkdv", q)
    _forced(monkeypatch, ka, "_attn_bwd_dkdv_kernel", lambda kw_: kw_["BLOCK_N"] == first[1])
    with pytest.warns(RuntimeWarning, match="does not fit this GPU"):
        got = ka.attention_bwd(do, q, k, v, out, lse, None, None, True, 0.2, False)[:3]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_window_backward_retries_with_smaller_key_blocks(monkeypatch):
    heads, d, ws = 2, 16, (5, 5)
    qkv = _rand(1, 9, 9, 3 * heads * d)
    table = _rand(9 * 9, heads)
    qkv_bias = _rand(3 * heads * d)
    args = (qkv, table, qkv_bias, None, ws, (3, 3), heads, 0.25, "timm")
    out, lse = kw.window_attention_fwd(*args)
    dout = _rand(*out.shape)

    def bwd():
        return kw.window_attention_bwd(dout, qkv, table, qkv_bias, None, out, lse, ws, (3, 3), heads, 0.25,
                                       "timm", True, True)[:3]

    want = bwd()
    # Start from one key block covering the window (dQ fused) and fail it: the retry runs two key blocks and
    # the dQ kernel, with the same whole-window query tile.
    monkeypatch.setattr(kw, "_launch_config", lambda kind, *a: (32, 32, 1, 1) if kind == "bwd" else
                        kw.configs(kind, 25, d, qkv.dtype))
    calls = _forced(monkeypatch, kw, "_window_attn_bwd_kernel", lambda kw_: kw_["BLOCK_N"] == 32)
    with pytest.warns(RuntimeWarning, match="does not fit this GPU"):
        got = bwd()
    assert [c["BLOCK_N"] for c in calls] == [32, 16] and not calls[-1]["FUSE_DQ"]
    assert calls[-1]["BLOCK_Q"] == calls[0]["BLOCK_Q"]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_launch_reraises_when_nothing_fits(monkeypatch):
    q = _rand(1, 1, 16, 16)
    _forced(monkeypatch, ka, "_attn_fwd_kernel", lambda kw_: True)
    with pytest.warns(RuntimeWarning), pytest.raises(OutOfResources):
        ka.attention_fwd(q, q, q, None, None, False, 0.25)


def test_ops_take_the_fast_path_when_nothing_fits(monkeypatch):
    """When not even the smallest config fits, attention and window attention take the fast PyTorch path
    with one warning per op: the float64 reference's output and gradients. Under ``triton`` it raises."""
    import fusedtx
    from fusedtx import _backend, reference

    for module, name in ((ka, "_attn_fwd_kernel"), (ka, "_attn_bwd_dkdv_kernel"), (kw, "_window_attn_fwd_kernel")):
        _forced(monkeypatch, module, name, lambda kw_: True)
    monkeypatch.setattr(_backend, "_warned", set())
    q, k, v = (_rand(2, 3, 37, 16).requires_grad_() for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fusedtx.attention(q, k, v)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)  # the launch guard's retries, then the fast path
    assert any("does not fit" in str(w.message) for w in caught)
    # forward and backward both fell back: one warning for the op
    assert sum("fusedtx.attention: no launch config" in str(w.message) for w in caught) == 1
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*leaves64)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves64, g.double()), strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    heads, d = 2, 16
    qkv, table = _rand(1, 9, 9, 3 * heads * d), _rand(13 * 13, heads)
    kwargs = {"window_size": 7, "shift_size": 3, "rel_pos_bias_table": table, "num_heads": heads}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fusedtx.window_attention(qkv, **kwargs)
    assert any("fusedtx.window_attention: no launch config" in str(w.message) for w in caught)
    want = reference.window_attention(qkv.double(), (7, 7), (3, 3), table.double(), heads)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    with fusedtx.use_backend("triton"), pytest.raises(OutOfResources):
        fusedtx.attention(q.detach(), k.detach(), v.detach())


def _layer_norm_gelu_case():
    from fusedtx import layer_norm_gelu, reference

    x, w, b = _rand(3, 37, 40).requires_grad_(), _rand(40).requires_grad_(), _rand(40).requires_grad_()
    out = layer_norm_gelu(x, w, b)
    g = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (x, w, b), g)]  # the backward kernel fails too
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = reference.layer_norm_gelu(*leaves)
    return got, [ref, *torch.autograd.grad(ref, leaves, g.double())]


def _sinusoidal_case():
    from fusedtx import add_sincos_2d, add_sinusoidal, reference

    x, y = _rand(2, 1 + 5 * 7, 24), _rand(2, 29, 24)
    return ([add_sincos_2d(x, 5, 7, 1), add_sinusoidal(y)],
            [reference.add_sincos_2d(x.double(), 5, 7, 1), reference.add_sinusoidal(y.double())])


def _highres_case():
    from fusedtx import reference
    from fusedtx.ops import highres as oh

    images, tokens, pos = _rand(2, 3, 20, 28), _rand(2, 35, 24), _rand(1, 35, 24)
    index = torch.stack([torch.randperm(35)[:9] for _ in range(2)]).to(DEVICE)
    a, b = _rand(2, 17, 24), _rand(2, 18, 24)
    dst = torch.randint(0, 18, (2, 6), device=DEVICE)
    sizes, src_sizes = _rand(2, 18).abs() + 1, _rand(2, 6).abs() + 1
    got = [oh.patch_scores(images, 4), oh.gather_tokens(tokens, index, pos), *oh.match_tokens(a, b),
           *oh.merge_weighted(b, sizes, a[:, :6], src_sizes, dst)]
    want = [reference.patch_scores(images.double(), 4), reference.gather_tokens(tokens.double(), index, pos.double()),
            *reference.match_tokens(a.double(), b.double()),
            *reference.merge_weighted(b.double(), sizes.double(), a[:, :6].double(), src_sizes.double(), dst)]
    return got, want


@pytest.mark.parametrize(("family", "kernel_names", "ops", "case"), [
    ("layer_norm_gelu", ["_layer_norm_gelu_fwd_kernel", "_layer_norm_gelu_bwd_kernel"], ["layer_norm_gelu"],
     _layer_norm_gelu_case),
    ("sinusoidal", ["_sinusoidal_kernel"], ["sinusoidal"], _sinusoidal_case),
    ("highres", ["_patch_scores_kernel", "_gather_kernel", "_match_kernel", "_merge_kernel"],
     ["patch_scores", "gather_tokens", "match_tokens", "merge_weighted"], _highres_case),
])
def test_every_family_takes_the_fast_path_when_its_kernel_cannot_launch(monkeypatch, family, kernel_names, ops, case):
    """The families without a smaller config to retry (one config per shape) take the fast PyTorch path when
    Triton raises OutOfResources at launch, with one warning per op, and give the float64 reference's
    results; under ``triton`` the error is raised."""
    import importlib

    import fusedtx
    from fusedtx import _backend

    module = importlib.import_module(f"fusedtx.kernels.{family}")
    calls = [_forced(monkeypatch, module, name, lambda kw_: True) for name in kernel_names]
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, want = case()
    assert all(calls), "every kernel was tried before the fallback"
    for op in ops:
        assert sum(f"fusedtx.{op}: no launch config" in str(w.message) for w in caught) == 1, op
    for g, w in zip(got, want, strict=True):
        if w.is_floating_point():
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g, w)
    with fusedtx.use_backend("triton"), pytest.raises(OutOfResources):
        case()


@pytest.mark.skipif(ON_CUDA, reason="compiles for every target on the CPU; the GPU run checks its own card")
def test_resource_tables_match_the_launchers_and_the_largest_configs_fit():
    """The CI guard: the committed per-target tables list exactly the configs the launchers pick (so a config
    change without a new table fails, masked window launches included), and the configs of each target with the
    most shared memory, and those with an attention mask, compile for it within its shared-memory limit without a
    spill the table does not show."""
    archs = ["80", "86", "89", "90a", "100a", "120"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    command = [sys.executable, "-m", "fusedtx.bench.resources", "--arch", ",".join(archs), "--sample", "2",
               "--tables", str(TABLES), "attention", "window_attention", "highres"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fit" in result.stdout


def test_wide_fp32_window_backward_only_where_it_fits():
    """The float32 window backward of windows over 128 tokens (a 256-query tile, 132 KiB) is launched only on
    targets with that much shared memory per block; elsewhere (and above head dim 32 past 64 tokens) the op
    takes the fast PyTorch path. The interpreter has no limit."""
    from fusedtx.kernels.support import shared_memory_per_block, window_fp32_backward_covers

    assert shared_memory_per_block((8, 9)) == shared_memory_per_block((7, 5)) == 99 * 1024  # unknown: smallest
    for tokens in (144, 256):
        assert not window_fp32_backward_covers(tokens, 32, shared_memory_per_block((8, 9)))
        assert not window_fp32_backward_covers(tokens, 32, shared_memory_per_block((12, 0)))
        assert window_fp32_backward_covers(tokens, 32, shared_memory_per_block((8, 0)))
        assert window_fp32_backward_covers(tokens, 32, None)
        assert not window_fp32_backward_covers(tokens, 64, None)
    assert window_fp32_backward_covers(100, 32, shared_memory_per_block((8, 9)))  # 128-query tile: fits


def test_shared_memory_limits():
    assert SHARED_MEMORY_PER_BLOCK[80] == 163 * 1024
    assert SHARED_MEMORY_PER_BLOCK[89] == SHARED_MEMORY_PER_BLOCK[120] == 99 * 1024
    assert SHARED_MEMORY_PER_BLOCK[90] == SHARED_MEMORY_PER_BLOCK[100] == 227 * 1024


def test_readme_states_the_committed_tables():
    """The README's summary lines are what the committed per-target tables hold, so neither can drift."""
    from fusedtx.bench import resources

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for arch in resources.TARGETS:
        rows = resources.read_table(resources.table_path(TABLES, arch))
        over = sum(r["shared"] > resources.shared_limit(arch) for r in rows.values())
        spills = sum(r["spills"] for r in rows.values())
        name = resources.target_name(arch)
        line = f"{name}: {len(rows)} configs, {over} over the shared-memory limit, {spills} spill"
        assert line in readme, line
