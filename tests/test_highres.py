"""highres: the four ops against float64 references on odd sizes (kernels in the interpreter on CPU), the
functional pieces' mechanisms, and every strategy end to end on tiny timm (ViT, distilled DeiT) and Hugging Face
ViTs."""

import pytest
import torch

import fusedtx
from fusedtx import highres, reference
from fusedtx.ops import highres as ops
from tests.conftest import DEVICE, DTYPES
from tests.helpers import TOLERANCE, assert_close

BACKENDS = ["triton", "torch", "reference"]


def _tol(dtype):
    return TOLERANCE[dtype] * (4 if dtype != torch.float32 else 10)


# --------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["variance", "gradient"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,patch", [((2, 3, 37, 45), 7), ((1, 1, 16, 16), 16), ((1, 3, 5, 9), 1)])
def test_patch_scores(backend, method, dtype, shape, patch):
    images = torch.randn(shape, device=DEVICE).to(dtype)
    images = images.transpose(-1, -2).contiguous().transpose(-1, -2)  # a non-contiguous view
    with fusedtx.use_backend(backend):
        out = ops.patch_scores(images, patch, method)
    ref = reference.patch_scores(images.double(), patch, method)
    if method == "gradient" and patch == 1:
        assert (out == 0).all()
        return
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_batch", [0, 1, 2])
def test_gather_tokens(backend, dtype, pos_batch):
    b, n, c, k = 2, 49, 33, 13
    tokens = torch.randn(b, c, n, device=DEVICE).to(dtype).transpose(1, 2)  # strided
    index = torch.randint(0, n, (b, k), device=DEVICE)
    pos = torch.randn(*((n, c) if pos_batch == 0 else (pos_batch, n, c)), device=DEVICE).to(dtype)
    prefix = torch.randn(b, 2, c, device=DEVICE).to(dtype)
    with fusedtx.use_backend(backend):
        out = ops.gather_tokens(tokens, index, pos, prefix)
        plain = ops.gather_tokens(tokens, index)
    ref = reference.gather_tokens(tokens.double(), index, pos.double().reshape(-1, n, c), prefix.double())
    assert_close(out, ref, dtype, tol=_tol(dtype))
    assert_close(plain, reference.gather_tokens(tokens.double(), index), dtype, tol=_tol(dtype))


def test_gather_tokens_gradient():
    tokens = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 3, 3], [8, 1, 2]])
    with fusedtx.use_backend("torch"):
        torch.autograd.gradcheck(lambda t, p: ops.gather_tokens(t, index, p), (tokens, pos))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("na,nb,d", [(1, 1, 4), (49, 197, 64), (98, 99, 80)])
def test_match_tokens(backend, dtype, na, nb, d):
    a = torch.randn(2, na, d, device=DEVICE).to(dtype)
    b = torch.randn(2, d, nb, device=DEVICE).to(dtype).transpose(1, 2)
    with fusedtx.use_backend(backend):
        score, index = ops.match_tokens(a, b)
    ref_score, ref_index = reference.match_tokens(a.double(), b.double())
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    assert_close(score, ref_score, torch.float32, tol=1e-5 if dtype == torch.float32 else 2e-3)
    # An index may differ only where two B tokens are equally similar within the rounding.
    picked = torch.nn.functional.cosine_similarity(a.double()[:, :, None], b.double()[:, None], dim=-1)
    chosen = picked.gather(2, index[..., None])[..., 0]
    assert (chosen >= ref_score - (1e-5 if dtype == torch.float32 else 2e-3)).all()


def test_match_tokens_chunks_over_b(monkeypatch):
    from fusedtx import fastpath

    monkeypatch.setattr(fastpath, "MATCH_BLOCK", 2 * 13 * 7)  # chunks of 7 B tokens
    a, b = torch.randn(2, 13, 16), torch.randn(2, 50, 16)
    score, index = fastpath.match_tokens(a, b)
    ref_score, ref_index = reference.match_tokens(a.double(), b.double())
    assert torch.equal(index, ref_index)
    assert_close(score, ref_score, torch.float32)


def test_grouped_row_max_is_torch_max():
    """The fast path's grouped max (score blocks of >= MATCH_GROUPED_WIDTH columns) returns torch.max's values and
    first indices: at a width no group size divides, with ties planted across groups and inside one."""
    from fusedtx import fastpath

    w = fastpath.MATCH_GROUPED_WIDTH + int(torch.randint(1, fastpath.MATCH_GROUP, ()).item())
    scores = torch.randn(2, 37, w)
    cols = torch.randperm(w)[:3].sort().values
    scores[0, :, cols] = 9.0  # a three-way tie: the first column wins
    scores[1, 5, cols[0]] = scores[1, 5, cols[0] + 1 if cols[0] + 1 < w else cols[0] - 1] = 9.0
    best, index = fastpath._row_max(scores)
    ref_best, ref_index = scores.max(dim=-1)
    assert torch.equal(best, ref_best) and torch.equal(index, ref_index)
    assert (index[0] == cols[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_weighted(backend, dtype):
    b, nb, r, c = 2, 11, 17, 33
    xb, xs = torch.randn(b, nb, c, device=DEVICE).to(dtype), torch.randn(b, r, c, device=DEVICE).to(dtype)
    sb, ss = torch.rand(b, nb, device=DEVICE) + 0.5, torch.rand(b, r, device=DEVICE) + 0.5
    dst = torch.randint(0, nb, (b, r), device=DEVICE)
    with fusedtx.use_backend(backend):
        x, s = ops.merge_weighted(xb, sb, xs, ss, dst)
    rx, rs = reference.merge_weighted(xb.double(), sb.double(), xs.double(), ss.double(), dst)
    assert_close(x, rx, dtype, tol=_tol(dtype))
    assert_close(s, rs, torch.float32)


# --------------------------------------------------------------------------------------------------
# functional pieces
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["variance", "gradient"])
def test_one_textured_patch_on_flat_background_is_kept(score):
    images = torch.full((2, 3, 64, 48), 0.3)
    images[0, :, 16:24, 8:16] += torch.randn(3, 8, 8)  # patch (2, 1) of a 6-wide grid of 8 px patches
    images[1, :, 40:48, 40:48] += torch.randn(3, 8, 8)  # patch (5, 5)
    index = fusedtx.select_patches(images, 1, 8, score=score)
    assert index.tolist() == [[2 * 6 + 1], [5 * 6 + 5]]


def test_merge_preserves_the_size_weighted_mean():
    x = torch.randn(2, 1 + 37, 16, dtype=torch.float64)
    sizes = torch.rand(2, 38, dtype=torch.float64) + 0.5
    with fusedtx.use_backend("torch"):  # float64: the kernels compute in float32
        y, s = fusedtx.merge_tokens(x, 9, sizes=sizes, num_prefix_tokens=1)
    assert y.shape == (2, 29, 16) and s.shape == (2, 29)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # the prefix token is never merged
    torch.testing.assert_close(s.sum(1), sizes.sum(1))
    torch.testing.assert_close((y * s[..., None]).sum(1), (x * sizes[..., None]).sum(1))
    again, _ = fusedtx.merge_tokens(x, 0, sizes=sizes, num_prefix_tokens=1)
    assert again is x


def test_merge_merges_the_most_similar_pair():
    x = torch.randn(1, 8, 4)
    x[0, 5] = x[0, 2] * 3  # A token 2 (even) is B token 5 (odd) scaled: cosine 1
    y, s = fusedtx.merge_tokens(x, 1)
    assert s.max() == 2
    torch.testing.assert_close(y[0, -2], (x[0, 2] + x[0, 5]) / 2)  # B token 5 is the third B token, of four


def test_functional_bad_arguments():
    with pytest.raises(ValueError, match="k=50 is larger than the 48 patches"):
        fusedtx.select_patches(torch.randn(1, 3, 64, 48), 50, 8)
    with pytest.raises(ValueError, match="fraction"):
        fusedtx.select_patches(torch.randn(1, 3, 64, 48), 1.5, 8)
    with pytest.raises(ValueError, match="r=11 is too large"):
        fusedtx.merge_tokens(torch.randn(1, 21, 4), 11)
    with pytest.raises(ValueError, match="method"):
        ops.patch_scores(torch.randn(1, 3, 8, 8), 4, "entropy")


# --------------------------------------------------------------------------------------------------
# strategies on tiny models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_vit():
    timm = pytest.importorskip("timm")
    return timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                         num_classes=7, dynamic_img_size=True).eval()


@pytest.fixture(scope="module")
def deit_vit():
    """A distilled DeiT: two prefix tokens (class and distillation) and two heads, averaged in eval."""
    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=7,
                                      dynamic_img_size=True).eval()


@pytest.fixture(scope="module")
def vits(timm_vit, deit_vit, hf_vit):
    return {"timm": timm_vit, "deit": deit_vit, "hf": hf_vit}


@pytest.fixture(scope="module")
def hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, intermediate_size=64, num_labels=7)
    return transformers.ViTForImageClassification(cfg).eval()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _stock(model, images):
    if hasattr(model, "vit"):
        return model(images, interpolate_pos_encoding=True).logits
    return model(images)


@pytest.mark.parametrize("which", ["timm", "deit", "hf"])
@pytest.mark.parametrize("strategy,settings", [("full", {}), ("select", {"k": 1.0}), ("select", {"k": 48}),
                                               ("merge", {"r": 0}), ("select", {"k": 1.0, "score": "attention"})])
def test_keeping_every_token_equals_the_stock_model(which, strategy, settings, vits):
    model = vits[which]
    images = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():
        torch.testing.assert_close(_logits(highres.apply(model, strategy, **settings)(images)), _stock(model, images))


@pytest.mark.parametrize("which", ["timm", "deit", "hf"])
def test_split_blocks_equal_the_stock_blocks(which, vits):
    """The merge path's attention half + MLP half is the stock block (so merging changes only the merge)."""
    ad = highres.models.adapter_for(vits[which])
    x = torch.randn(2, 17, 32)
    with torch.inference_mode():
        y, metric, cls = ad.attention_part(1, x, None, True)
        torch.testing.assert_close(ad.mlp_part(1, y), ad.run_block(1, x), rtol=1e-5, atol=1e-5)
    assert metric.shape == (2, 17, 16) and cls.shape == (2, 17)
    torch.testing.assert_close(cls.sum(-1), torch.ones(2))


@pytest.mark.parametrize("which", ["timm", "deit", "hf"])
@pytest.mark.parametrize("strategy,settings,patches,crops", [
    ("resize", {}, 16, 1), ("tiles", {"stride": 16}, 16, 6), ("select", {"k": 0.25}, 12, 1),
    ("select", {"k": 5, "score": "gradient"}, 5, 1), ("select", {"k": 5, "score": "attention", "layer": 1}, 48, 1),
    ("merge", {"r": 6}, 48, 1), ("merge", {"r": [10, 0, 4], "proportional": False}, 48, 1)])
def test_every_strategy_runs(which, strategy, settings, patches, crops, vits):
    """A 64x48 image (48 patches of 8; native 32x32, 16 patches): every strategy's output and the tokens its
    first block sees (``patches`` per crop plus the model's prefix tokens, for each of ``crops`` crops)."""
    model = vits[which]
    hm = highres.apply(model, strategy, **settings)
    images = torch.randn(2, 3, 64, 48)
    with torch.inference_mode(), fusedtx.use_backend("torch"):  # the kernels' own run: the next test
        out = _logits(hm(images))
        pooled, logits = hm.features(images)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    torch.testing.assert_close(logits, out)
    assert pooled.shape == (2, 32)
    assert hm.tokens(64, 48) == crops * (patches + (2 if which == "deit" else 1))


def test_every_strategy_runs_in_bfloat16(timm_vit):
    """bfloat16 models (the GPU profile's dtype) on the fast PyTorch path: the resizes run in float32 (PyTorch has
    no bfloat16 CPU kernel for the antialiased one) and every strategy's logits follow the float32 model's."""
    import copy

    half = copy.deepcopy(timm_vit).to(torch.bfloat16)
    images = torch.randn(2, 3, 64, 48)
    cases = [("resize", {}, images), ("tiles", {}, images[..., :24, :]),  # tiles: an image below native size
             ("select", {"k": 0.5}, images), ("select", {"k": 9, "score": "attention"}, images),
             ("merge", {"r": 6}, images)]
    with torch.inference_mode(), fusedtx.use_backend("torch"):
        for strategy, settings, x in cases:
            got = highres.apply(half, strategy, **settings)(x.to(torch.bfloat16))
            want = highres.apply(timm_vit, strategy, **settings)(x)
            assert got.dtype == torch.bfloat16, strategy
            torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.1, msg=strategy)


def test_sincos_positions_from_patch_coordinates(timm_vit):
    """pos="sincos" on a model with a 2D sin-cos table: at a grid 4x its native one, every strategy adds the
    exact encodings of the patches it keeps, as a model built natively at that grid with the exact table
    computes; the library's own resampling (pos="table") does not."""
    timm = pytest.importorskip("timm")
    layout = ["mae", "mae_hw", "timm"][int(torch.randint(0, 3, ()).item())]
    small = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                          num_classes=7, dynamic_img_size=True).eval()
    big = timm.models.VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=7).eval()
    weights = {k: v for k, v in small.state_dict().items() if k != "pos_embed"}  # its grid differs
    assert big.load_state_dict(weights, strict=False).missing_keys == ["pos_embed"]
    with torch.no_grad():
        small.pos_embed.copy_(reference.sincos_2d(4, 4, 32, num_prefix_tokens=1, layout=layout)[None])
        big.pos_embed.copy_(reference.sincos_2d(8, 8, 32, num_prefix_tokens=1, layout=layout)[None])
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for strategy, settings in (("full", {}), ("select", {"k": 9}), ("merge", {"r": 5})):
            out = highres.apply(small, strategy, pos="sincos", **settings)(images)
            torch.testing.assert_close(out, highres.apply(big, strategy, **settings)(images), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(highres.apply(small, "full")(images), big(images), rtol=1e-3, atol=1e-3)
    assert highres.apply(small, "select", pos="sincos")._sincos_layout == layout
    with pytest.raises(ValueError, match="pos='sincos' needs a model whose position table is a 2D sin-cos"):
        highres.apply(timm_vit, "select", pos="sincos")
    with pytest.raises(ValueError, match="pos must be one of"):
        highres.apply(small, "full", pos="rope")


def test_select_and_merge_run_the_kernels(timm_vit):
    """Selection and merging end to end on the default backend (the Triton kernels; in the interpreter on CPU)."""
    images = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        for strategy, settings in (("select", {"k": 0.5}), ("merge", {"r": 4})):
            out = highres.apply(timm_vit, strategy, **settings)(images)
            with fusedtx.use_backend("reference"):
                ref = highres.apply(timm_vit, strategy, **settings)(images)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_tiles_cover_the_image():
    boxes = highres.tile_boxes((1024, 1024), (224, 224), (168, 168))
    assert boxes[0] == (0, 0) and boxes[-1] == (800, 800) and len(boxes) == 36
    assert highres.tile_boxes((100, 224), (224, 224), (168, 168)) == [(0, 0)]


def test_merge_flops_target():
    r = highres.r_for_flops(0.5, 12, 4096, 1, 768, 3072)
    full = highres.merge_flops(0, 12, 4096, 1, 768, 3072)
    assert highres.merge_flops(r, 12, 4096, 1, 768, 3072) <= 0.5 * full < highres.merge_flops(r - 1, 12, 4096, 1, 768,
                                                                                                3072)


def test_hybrid_runs():
    pytest.importorskip("timm")
    tiny = highres.apply(__import__("timm").create_model("vit_tiny_patch16_224", pretrained=False), "hybrid")
    assert tiny.settings["name"] == "vit_tiny_r_s16_p8_224"
    with torch.inference_mode():
        out = tiny(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_strategy_bad_arguments(timm_vit):
    images = torch.randn(1, 3, 64, 48)
    with pytest.raises(ValueError, match="k=49 is larger than the 48 patches"):
        highres.apply(timm_vit, "select", k=49)(images)
    with pytest.raises(ValueError, match="r=20 is too large for 3 blocks at 48 patches"):
        highres.apply(timm_vit, "merge", r=20)(images)
    with pytest.raises(ValueError, match="one entry per block"):
        highres.apply(timm_vit, "merge", r=[1, 2])
    with pytest.raises(ValueError, match="exactly one of r"):
        highres.apply(timm_vit, "merge")
    with pytest.raises(TypeError, match="model must be a ViT"):
        highres.apply(torch.nn.Conv2d(3, 8, 3), "full")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        highres.apply("vit", "full")
    with pytest.raises(ValueError, match="strategy must be one of"):
        highres.apply(timm_vit, "crop")
    with pytest.raises(TypeError, match="unknown"):
        highres.apply(timm_vit, "select", r=3)
    with pytest.raises(ValueError, match="layer must be a block index"):
        highres.apply(timm_vit, "select", score="attention", layer=3)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        highres.apply(timm_vit, "full")(torch.randn(1, 3, 60, 48))
