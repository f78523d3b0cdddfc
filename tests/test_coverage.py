"""fusedtx.swap over the zoo: the generic SDPA route, Hugging Face's attention interface, and the report's
coverage (random weights, tiny configs, no downloads)."""

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import fusedtx
from fusedtx.nn.attention import SDPARoute, sdpa
from fusedtx.surgery import swap, unswap
from tests.conftest import DEVICE
from tests.helpers import ROUNDING_DRAWS, STOCK_FACTOR, assert_close, dot_tolerance, rel_error, ulp_moved

TOL = dot_tolerance(torch.float32)


def _run(model, x, dy=None, grads=True):
    x = x.detach().clone().requires_grad_(grads)
    with torch.set_grad_enabled(grads):
        out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    dy = torch.randn_like(out) if dy is None else dy
    if not grads:
        return out, torch.ones(()), dy
    out.backward(dy)
    return out.detach(), x.grad, dy


def _stock_errors(model, x, dy, ref_params):
    """Per parameter, stock float32's largest gradient error against ``ref_params`` over ROUNDING_DRAWS runs: one
    on the inputs as they are, the others with every weight and pixel moved by at most one float32 ulp
    (:func:`~tests.helpers.ulp_moved`): a lucky draw would make the bound stricter than float32 can hold."""
    errors = {}
    for draw in range(ROUNDING_DRAWS):
        stock32 = copy.deepcopy(model)
        if draw:
            with torch.no_grad():
                for p in stock32.parameters():
                    p.copy_(ulp_moved(p))
        _run(stock32, ulp_moved(x) if draw else x, dy.float())
        for n, p in stock32.named_parameters():
            if n in ref_params:
                errors[n] = max(errors.get(n, 0.0), rel_error(p.grad, ref_params[n]))
    return errors


def _check(model, x, fused_attention, train=True, grads=True, **swap_kwargs):
    """Swap ``model``; outputs, input gradient and every parameter gradient as stock's; ``fused_attention``
    attention modules fused, none left unlisted; unswap puts every method back."""
    model = model.to(DEVICE).train(train)
    with torch.no_grad():  # a zero-initialized scale (timm's Swin V2 res-post-norms) mutes its whole branch
        for n, p in model.named_parameters():
            if n.endswith("weight") and p.dim() == 1 and not p.any():
                p.uniform_(0.5, 1.5)
    stock_fwd = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    # The stock model in float64 is the reference. A parameter whose gradient sums a whole map with
    # cancellation (Swin V2's logit scale) is ill-conditioned: stock float32 itself misses the float32 bound
    # on some seeds, so such a gradient may be off by up to STOCK_FACTOR times stock float32's own error.
    stock64 = copy.deepcopy(model).double()
    ref_out, ref_grad, dy = _run(stock64, x.double(), grads=grads)
    assert ref_out.norm() > 0 and ref_grad.norm() > 0  # a zero-initialized head would make the check vacuous
    ref_params = {n: p.grad.clone() for n, p in stock64.named_parameters() if p.grad is not None}
    # the attention's own parameters move the output (else its fused path would go unchecked)
    assert not grads or any(g.norm() > 0 for n, g in ref_params.items() if "attn" in n or "attention" in n)
    stock_err = _stock_errors(model, x, dy, ref_params) if grads else {}
    report = swap(model, **swap_kwargs)
    done, total = report.coverage["attention"]
    assert done == fused_attention, str(report)
    assert total - done <= len(report.left_alone)  # every attention module left stock is listed
    assert f"attention: {done}/{total} fused" in str(report)
    out, grad, _ = _run(model, x, dy.float(), grads=grads)
    assert_close(out, ref_out, torch.float32, "output", tol=TOL)
    assert_close(grad, ref_grad, torch.float32, "input gradient", tol=TOL)
    for n, p in model.named_parameters():
        if n in ref_params and ref_params[n].norm() > 1e-5:  # not one that is zero in exact arithmetic
            tol = max(TOL, STOCK_FACTOR * stock_err[n])
            assert_close(p.grad, ref_params[n], torch.float32, f"{n} gradient", tol=tol)
    copied = copy.deepcopy(model)  # installed forwards follow the copy, and pickle
    assert all(m.__dict__["forward"].module is m for m in copied.modules() if "forward" in m.__dict__)
    buf = io.BytesIO()
    torch.save(copied, buf)
    unswap(model)
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == stock_fwd
    return report


# --------------------------------------------------------------------------------------------------
# the SDPA route
# --------------------------------------------------------------------------------------------------


def _qkv(b=2, h=2, nq=7, nk=9, d=16, hk=None):
    q = torch.randn(b, h, nq, d, device=DEVICE)
    k, v = (torch.randn(b, hk or h, nk, d, device=DEVICE) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("case", ["float", "bool_keys", "bool_full", "causal", "gqa", "3d", "scale"])
def test_sdpa_matches_stock(case):
    q, k, v = _qkv(hk=1 if case == "gqa" else None)
    kwargs = {}
    if case == "float":
        kwargs["attn_mask"] = torch.randn(1, 2, 7, 9, device=DEVICE, requires_grad=True)
    elif case == "bool_keys":
        mask = torch.rand(2, 1, 1, 9, device=DEVICE) > 0.3
        mask[..., 0] = True  # no fully masked row
        kwargs["attn_mask"] = mask
    elif case == "bool_full":
        mask = torch.rand(7, 9, device=DEVICE) > 0.3
        mask[:, 0] = True
        kwargs["attn_mask"] = mask
    elif case == "causal":
        q, k, v = _qkv(nq=9)
        kwargs["is_causal"] = True
    elif case == "gqa":
        q, k, v = _qkv(h=4, hk=2)
        kwargs["enable_gqa"] = True
    elif case == "3d":
        q, k, v = (t[:, 0] for t in (q, k, v))
    elif case == "scale":
        kwargs["scale"] = 0.3
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          **{n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                                 else t) for n, t in kwargs.items()})
    assert_close(sdpa(q, k, v, **kwargs), want, torch.float32, case, tol=TOL)


def test_sdpa_route_bias_gradient_and_stock_fallback():
    q, k, v = (t.requires_grad_() for t in _qkv())
    bias = torch.randn(1, 2, 7, 9, device=DEVICE, requires_grad=True)
    with SDPARoute():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), dy)
    q64, k64, v64, b64 = (t.detach().double().requires_grad_() for t in (q, k, v, bias))
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=b64)
    wants = torch.autograd.grad(want, (q64, k64, v64, b64), dy.double())
    for g, w, name in zip(grads, wants, "qkvb", strict=True):
        assert_close(g, w, torch.float32, name, tol=TOL)
    v2 = torch.randn(2, 2, 9, 8, device=DEVICE)  # a value head dim of its own: stock SDPA
    with SDPARoute():
        out = F.scaled_dot_product_attention(q, k, v2)
    assert_close(out, F.scaled_dot_product_attention(q, k, v2), torch.float32, tol=1e-6)


def test_sdpa_route_under_torch_compile_fullgraph():
    """The installed forward traces in one graph, with the fused op in it."""
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, drop_path_rate=0.0).to(DEVICE).eval()
    attn = model.blocks[0].attn
    ops = []

    def backend(gm, inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    swap(model)
    x = torch.randn(2, 17, 32, device=DEVICE)
    compiled = torch.compile(attn, fullgraph=True, backend=backend)
    with torch.no_grad():
        got, want = compiled(x), attn(x)
    assert any("fusedtx" in o and "attention" in o for o in ops), ops
    assert_close(got, want, torch.float32, tol=1e-6)


# --------------------------------------------------------------------------------------------------
# timm zoo
# --------------------------------------------------------------------------------------------------

TIMM = {
    # name: (kwargs, image size, attention modules fused)
    "beit_base_patch16_224": (dict(img_size=24, patch_size=8, embed_dim=32, depth=2, num_heads=2), 24, 2),
    "eva02_tiny_patch14_224": (dict(img_size=28, depth=1), 28, 1),
    "vit_base_patch16_rope_224": (dict(img_size=32, depth=1, embed_dim=32, num_heads=2), 32, 1),
    "samvit_base_patch16": (dict(img_size=64, depth=2, embed_dim=32, num_heads=2, global_attn_indexes=(1,),
                                 window_size=3), 64, 2),
    "maxvit_tiny_rw_224": (dict(img_size=32, embed_dim=(32,), depths=(1,)), 32, 2),  # eval: BatchNorm
    "pvt_v2_b0": (dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1)), 32, 4),
    "twins_svt_small": (dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1),
                                 wss=(2, 2, 2, 2), sr_ratios=(2, 2, 1, 1)), 32, 4),
    "hiera_tiny_224": (dict(img_size=64, embed_dim=8, stages=(1, 1, 1, 1)), 64, 4),
    "vit_medium_patch16_gap_256": (dict(img_size=32, depth=1, embed_dim=32, num_heads=2, global_pool="map"), 32, 2),
}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_sdpa_models(name):
    kwargs, size, fused = TIMM[name]
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.0, num_classes=0, **kwargs)  # features
    maxvit = name.startswith("maxvit")  # 64 one-token windows per image: slow in the interpreter, forward only
    _check(model, torch.randn(1, 3, size, size, device=DEVICE), fused, train=not maxvit, grads=not maxvit,
           norm=not maxvit)


def test_beit_relative_position_bias_takes_the_fused_bias_path():
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=24, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2, drop_path_rate=0.0, num_classes=0)
    table = model.blocks[0].attn.relative_position_bias_table
    calls = []
    real = fusedtx.nn.attention.attention

    def spy(q, k, v, **kw):
        calls.append(kw["bias"])
        return real(q, k, v, **kw)

    fusedtx.nn.attention.attention = spy
    try:
        _check(model, torch.randn(2, 3, 24, 24, device=DEVICE), 1)
    finally:
        fusedtx.nn.attention.attention = real
    assert calls and calls[0] is not None and calls[0].shape[-3:] == (2, 10, 10) and calls[0].requires_grad
    assert table.grad is not None


def test_report_lists_what_it_leaves_and_why():
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=1, depth_token_only=1)
    report = swap(model)
    assert report.coverage["attention"] == (1, 2), str(report)  # class attention fused, talking heads not
    (name, cls, why), = [e for e in report.left_alone if "Attn" in e[1]]
    assert cls.endswith("TalkingHeadAttn") and "talking-heads" in why
    off = swap(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                 embed_dim=16, depth=1, num_heads=2), attention=False)
    assert off.coverage["attention"] == (0, 1) and off.left_alone[0][2] == "attention=False"


def test_timm_fused_attn_switch_is_turned_on_and_back():
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=1,
                              cls_attn_layers=1, num_classes=0).eval()
    attn = model.blocks[0].attn
    assert attn.fused_attn is False  # timm's experimental switch
    _check(model, torch.randn(1, 3, 32, 32, device=DEVICE), 2, train=False)
    assert attn.fused_attn is False and "forward" not in attn.__dict__


# --------------------------------------------------------------------------------------------------
# Hugging Face: the attention interface, no class list
# --------------------------------------------------------------------------------------------------


class _Pixels(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(pixel_values=x)
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state


SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


_SMALL_VISION = {k: v for k, v in SMALL.items() if "dropout" not in k}
HF = {  # name: (build, attention modules fused)
    "deit": (lambda t: t.DeiTModel(t.DeiTConfig(**SMALL)), 1),
    "beit": (lambda t: t.BeitModel(t.BeitConfig(**SMALL, use_relative_position_bias=True)), 1),
    "dinov2": (lambda t: t.Dinov2Model(t.Dinov2Config(**SMALL)), 1),
    "dinov2_registers": (lambda t: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**SMALL)), 1),
    "vit_msn": (lambda t: t.ViTMSNModel(t.ViTMSNConfig(**SMALL)), 1),
    "yolos": (lambda t: t.YolosModel(t.YolosConfig(**{**SMALL, "image_size": [32, 32]}, num_detection_tokens=3),
                                     add_pooling_layer=False), 1),
    "clip": (lambda t: t.CLIPVisionModel(t.CLIPVisionConfig(**_SMALL_VISION)), 1),
    "siglip": (lambda t: t.SiglipVisionModel(t.SiglipVisionConfig(**_SMALL_VISION)), 2),  # the pool head's MHA too
}


@pytest.mark.parametrize("name", list(HF))
def test_hugging_face_attention_interface(name):
    build, fused = HF[name]
    _check(_Pixels(build(transformers)), torch.randn(1, 3, 32, 32, device=DEVICE), fused)


def test_hugging_face_set_attn_implementation():
    import fusedtx.nn.attention as fa

    fa.register_hf_attention()
    model = transformers.DeiTModel(transformers.DeiTConfig(**SMALL)).to(DEVICE).eval()
    stock = copy.deepcopy(model)
    model.set_attn_implementation("fusedtx")
    assert model.config._attn_implementation == "fusedtx"
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        assert_close(model(pixel_values=x).last_hidden_state, stock(pixel_values=x).last_hidden_state,
                     torch.float32, tol=TOL)
    built = transformers.DeiTModel._from_config(transformers.DeiTConfig(**SMALL), attn_implementation="fusedtx")
    assert built.config._attn_implementation == "fusedtx"


SWIN_V2 = {
    "timm": lambda: timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=(24, 40), window_size=4,
                                      embed_dim=16, depths=(2,), num_heads=(2,), drop_path_rate=0.0,
                                      num_classes=0),
    "torchvision": lambda: __import__("torchvision").models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4], stochastic_depth_prob=0.0,
        block=__import__("torchvision").models.swin_transformer.SwinTransformerBlockV2),
    "hugging_face": lambda: _Pixels(transformers.Swinv2Model(transformers.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2], window_size=4, drop_path_rate=0.0))),
}


@pytest.mark.parametrize("zoo", list(SWIN_V2))
def test_swin_v2_cosine_attention(zoo):
    """Cosine attention, the logit scale clamp, the CPB MLP's bias and the shift mask; the MLP's and the
    logit scale's gradients too (training)."""
    model = SWIN_V2[zoo]()
    size = {"timm": (24, 40), "torchvision": (20, 28)}.get(zoo, (32, 32))  # torchvision: padded windows
    report = _check(model, torch.randn(1, 3, *size, device=DEVICE), 2)
    # timm's blocks run the window kernel on the map (shift to reverse); the others one attention call per window batch
    assert report.replaced["timm Swin V2 block attention" if zoo == "timm" else "Swin V2 window attention"] == 2
