"""fusedtx.swap / unswap on real model zoos (random weights, no downloads), and fusedtx profile."""

import copy

import pytest
import timm
import torch
import transformers
from torch import nn

import fusedtx
from fusedtx import _backend, profile, surgery
from fusedtx.surgery import FusedAway, swap, unswap
from tests.conftest import DEVICE
from tests.helpers import assert_close, dot_tolerance


def _forward_backward(model, x, dy=None):
    """Output and input gradient for the upstream gradient ``dy`` (random, drawn on the first call: a
    constant one would be cancelled by a final LayerNorm, leaving rounding noise to compare)."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    dy = torch.randn_like(out) if dy is None else dy
    out.backward(dy)
    return out.detach(), x.grad, dy


def _check_swap_matches(model, x, expected_counts, **kwargs):
    keys = list(model.state_dict())
    ref_out, ref_grad, dy = _forward_backward(model, x)
    report = swap(model, **kwargs)
    assert dict(report.replaced) == expected_counts, str(report)
    assert report.model is model and list(model.state_dict()) == keys
    out, grad, _ = _forward_backward(model, x, dy)
    tol = dot_tolerance(torch.float32)  # stock and fused both run tf32 dots on CUDA
    assert_close(out, ref_out, torch.float32, "output", tol=tol)
    assert_close(grad, ref_grad, torch.float32, "input gradient", tol=tol)
    return report


@pytest.mark.parametrize("img_size", [96, 112])  # 37 and 50 tokens: odd lengths, small enough for the interpreter
def test_timm_vit(img_size):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, depth=2).to(DEVICE)
    x = torch.randn(1, 3, img_size, img_size, device=DEVICE)
    _check_swap_matches(model, x, {"LayerNorm": 5, "timm Attention": 2, "pre-norm residual add": 2,
                                      "MLP activation in place": 2, surgery.NEXT_NORM: 1})
    assert isinstance(model.blocks[0].attn, fusedtx.nn.Attention)


def test_timm_vit_qk_norm():
    """The LayerNorms inside a swapped timm Attention (qk_norm=True) are swapped too, and put back."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=1, qk_norm=True)
    stock_q_norm = model.blocks[0].attn.q_norm
    _check_swap_matches(model.to(DEVICE), torch.randn(2, 3, 48, 48, device=DEVICE),
                        {"LayerNorm": 3 + 2, "timm Attention": 1, "pre-norm residual add": 1,
                         "MLP activation in place": 1})  # + q_norm, k_norm
    assert isinstance(model.blocks[0].attn.q_norm, fusedtx.nn.LayerNorm)
    unswap(model)
    assert model.blocks[0].attn.q_norm is stock_q_norm


def test_torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    model.to(DEVICE)
    _check_swap_matches(model, torch.randn(2, 3, 32, 32, device=DEVICE), {"LayerNorm": 5, "MultiheadAttention": 2})


def test_hugging_face_vit_and_swin():
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8))
    report = _check_swap_matches(_LastHidden(vit.to(DEVICE)), torch.randn(1, 3, 32, 32, device=DEVICE),
                                 {"LayerNorm": 5, "Hugging Face attention": 2})
    assert vit.config._attn_implementation != "fusedtx"  # only the swapped modules' own config copies
    # drop_path_rate defaults to 0.1 and the model is in training mode: stochastic depth would draw
    # different paths in the two runs, so it is switched off to compare outputs.
    swin = transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2], window_size=4, drop_path_rate=0.0))
    x = torch.randn(1, 3, 36, 44, device=DEVICE)  # not a multiple of the window: padded windows
    _check_swap_matches(_LastHidden(swin.to(DEVICE)), x, {"LayerNorm": 6, "Hugging Face attention": 2})
    unswap(report.model)


def test_hugging_face_attention_wrapper_is_entered():
    """transformers < 5 wraps the module that selects the attention function (ViTSelfAttention) in a
    ViTAttention of its own: swap must replace the inner one, not refuse the wrapper. Rebuilt here with
    today's ViTAttention inside a wrapper class of the old name."""
    inner = transformers.models.vit.modeling_vit.ViTAttention(transformers.ViTConfig(
        hidden_size=32, num_attention_heads=2, attention_probs_dropout_prob=0.0)).to(DEVICE)

    class ViTAttention(nn.Module):  # the old wrapper's qualified name
        def __init__(self):
            super().__init__()
            self.attention = inner

        def forward(self, x):
            return self.attention(x)[0]

    ViTAttention.__module__, ViTAttention.__qualname__ = "transformers.models.vit.modeling_vit", "ViTAttention"
    model = nn.Sequential(ViTAttention())  # swap looks at a model's submodules, not at the model itself
    report = _check_swap_matches(model, torch.randn(2, 5, 32, device=DEVICE), {"Hugging Face attention": 1})
    assert report.left_alone == []


class _LastHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x, interpolate_pos_encoding=True).last_hidden_state


def test_timm_swin():
    # swin_tiny_patch4_window7_224 at reduced width and depth; its 9x11 map is not a multiple of the window.
    # drop_path_rate=0: stochastic depth (on by default in training mode) would make two runs differ.
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 44), window_size=4,
                              embed_dim=16, depths=(2,), num_heads=(2,), drop_path_rate=0.0).to(DEVICE)
    _check_swap_matches(model, torch.randn(1, 3, 36, 44, device=DEVICE),
                        {"LayerNorm": 6, "timm Swin block attention": 2, "MLP activation in place": 2})
    block = model.layers[0].blocks[1]
    assert isinstance(block._attn, fusedtx.nn.SwinBlockAttention)
    unswap(model)
    assert "_attn" not in block.__dict__ and type(model.norm).__name__ == "LayerNorm"


def test_torchvision_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                            stochastic_depth_prob=0.0)  # no stochastic depth: two runs must agree
    _check_swap_matches(model.to(DEVICE), torch.randn(1, 3, 36, 44, device=DEVICE),
                        {"LayerNorm": 6, "torchvision ShiftedWindowAttention": 2})


def test_swapped_model_runs_under_torch_compile():
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()).to(DEVICE)
    holder = nn.ModuleList([nn.MultiheadAttention(16, 2, batch_first=True)]).to(DEVICE)
    stock64 = copy.deepcopy(nn.ModuleList([model, holder[0]])).double()  # the float64 reference
    swap(model)
    swap(holder)
    mha = holder[0]
    assert isinstance(mha, fusedtx.nn.MultiheadAttention) and isinstance(model[1], fusedtx.nn.LayerNormGELU)

    def f(x, seq=model, attn=mha):
        h = seq(x)
        return attn(h, h, h, need_weights=False)[0]

    x = torch.randn(2, 5, 16, device=DEVICE)
    out, grad, dy = _forward_backward(torch.compile(f), x)
    eager_out, eager_grad, _ = _forward_backward(f, x, dy)
    ref_out, ref_grad, _ = _forward_backward(lambda x: f(x, *stock64), x.double(), dy.double())
    tol = dot_tolerance(torch.float32)
    for got, want, name in ((out, eager_out, "output vs eager"), (grad, eager_grad, "input gradient vs eager"),
                            (out, ref_out, "output vs float64"), (grad, ref_grad, "input gradient vs float64")):
        assert_close(got, want, torch.float32, name, tol=tol)


def test_swap_again_adds_only_what_is_new():
    """A second swap leaves the first one's work as it is: no WindowAttention inside an installed timm
    block path (which never runs it), and the submodules of modules swapped before are visited."""
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(28, 28), window_size=7,
                             embed_dim=16, depths=(2,), num_heads=(2,))
    assert swap(swin).total == 10 and swap(swin).total == 0
    assert type(swin.layers[0].blocks[0].attn).__name__ == "WindowAttention"
    assert not isinstance(swin.layers[0].blocks[0].attn, fusedtx.nn.WindowAttention)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, qk_norm=True)
    assert dict(swap(vit, norm=False).replaced) == {"timm Attention": 1}
    assert dict(swap(vit).replaced) == {"LayerNorm": 3 + 2, "pre-norm residual add": 1,  # + q_norm, k_norm
                                        "MLP activation in place": 1}
    assert isinstance(vit.blocks[0].attn.q_norm, fusedtx.nn.LayerNorm)


def test_timm_vit_layer_norms():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48).to(DEVICE)
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    _check_swap_matches(model, x, {"LayerNorm": 25, "pre-norm residual add": 12, "MLP activation in place": 12,
                                   surgery.NEXT_NORM: 11},
                        attention=False,
                        window_attention=False)
    assert isinstance(model.norm, fusedtx.nn.LayerNorm)
    unswap(model)
    assert type(model.norm).__name__ == "LayerNorm" and not isinstance(model.norm, fusedtx.nn.LayerNorm)


@pytest.mark.parametrize("timm_act", [False, True])
def test_sequential_layer_norm_then_gelu_fuses_and_unswaps(timm_act):
    from timm.layers.activations import GELUTanh

    act = GELUTanh() if timm_act else nn.GELU(approximate="tanh")
    model = nn.Sequential(nn.Linear(12, 12), nn.LayerNorm(12), act, nn.Linear(12, 3))
    model.to(DEVICE)
    stock = list(model)
    _check_swap_matches(model, torch.randn(5, 12, device=DEVICE), {"LayerNorm+activation": 1})
    assert isinstance(model[1], fusedtx.nn.LayerNormGELU) and model[1].activation == "gelu_tanh"
    assert isinstance(model[2], FusedAway)
    unswap(model)
    assert list(model) == stock  # the very same objects back


def test_switches_copies_and_subclasses():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.LayerNorm(8), MyNorm(8)).to(DEVICE)
    report = swap(model, norm=False)
    assert report.total == 0 and type(model[0]) is nn.LayerNorm
    report = swap(model, inplace=False)
    assert report.model is not model and type(model[0]) is nn.LayerNorm
    assert dict(report.replaced) == {"LayerNorm": 1}
    assert report.left_alone and "custom subclass" in report.left_alone[0][2]
    assert "left alone" in str(report)
    with pytest.raises(TypeError, match="model"):
        swap("not a model")


def test_profile_runs_and_writes_its_report(tmp_path, capsys):
    code = profile.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1", "--steps", "1",
                         "--out", str(tmp_path), "--trace", str(tmp_path / "t.json")])
    assert code == 0
    text = (tmp_path / "report.md").read_text()
    assert "Speedup" in text and "| attention |" in text
    assert f"backend: {_backend.explain(DEVICE)[0]};" in text
    # ViT-Ti's 12 blocks: 12 residual adds with norm2, 11 with the next block's norm1
    assert "Residual adds fused with the LayerNorm that follows: 23 per forward (12 with the block's norm2, 11" in text
    assert (tmp_path / "trace_stock.json").stat().st_size > 0 and (tmp_path / "t.json").stat().st_size > 0


def test_profile_reports_the_backend_it_ran(tmp_path):
    code = profile.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1", "--steps", "1",
                         "--backend", "reference", "--out", str(tmp_path)])
    assert code == 0 and "backend: reference;" in (tmp_path / "report.md").read_text()


def eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers < 5's ViT eager function: ``attention_mask`` is the head_mask, multiplying the
    probabilities. ``hf_attention_forward`` looks it up in the module of the calling class (this one)."""
    probs = torch.softmax(query @ key.transpose(-1, -2) * scaling, dim=-1) * attention_mask
    return (probs @ value).transpose(1, 2), probs


class ViTSelfAttention(nn.Module):  # the name of transformers < 5's module that passes a head_mask
    pass


def test_hugging_face_head_mask_takes_the_modules_eager_path():
    q, k, v = (torch.randn(2, 3, 7, 16, device=DEVICE) for _ in range(3))
    head_mask = torch.rand(1, 3, 1, 1, device=DEVICE)
    _backend._warned.clear()
    with pytest.warns(UserWarning, match="head_mask"):
        out, _ = fusedtx.nn.attention.hf_attention_forward(ViTSelfAttention(), q, k, v, head_mask, scaling=0.25)
    assert_close(out, eager_attention_forward(None, q, k, v, head_mask, 0.25)[0], torch.float32, tol=1e-6)


def test_swapping_a_timm_swin_block_itself_installs_its_fused_path():
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(32, (13, 13), num_heads=2, window_size=7, shift_size=3).to(DEVICE).eval()
    x = torch.randn(2, 13, 13, 32, device=DEVICE)
    with torch.no_grad():
        want = block(x)
        report = swap(block)
        assert "_attn" in block.__dict__ and report.replaced["timm Swin block attention"] == 1
        assert_close(block(x), want, torch.float32, tol=1e-5)
    unswap(block)
    assert "_attn" not in block.__dict__


def test_timm_vit_pre_norm_residual_add_is_one_call_and_unswaps():
    """x + ls1(attn(norm1(x))) and norm2 run as one layer_norm_gelu call with the residual (training, layer
    scale on); unswap removes the installed forward."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, init_values=0.5,
                              drop_path_rate=0.0).to(DEVICE)
    calls = []
    real = fusedtx.surgery.layer_norm_gelu

    def spy(*args, **kwargs):
        calls.append(kwargs.get("residual") is not None)
        return real(*args, **kwargs)

    fusedtx.surgery.layer_norm_gelu = spy
    try:
        _check_swap_matches(model, torch.randn(2, 3, 32, 32, device=DEVICE),
                            {"LayerNorm": 3, "timm Attention": 1, "pre-norm residual add": 1,
                             "MLP activation in place": 1})
    finally:
        fusedtx.surgery.layer_norm_gelu = real
    assert calls == [True]
    unswap(model)
    assert "forward" not in model.blocks[0].__dict__


def test_timm_vit_next_norm1_runs_in_the_residual_add():
    """Blocks of one Sequential hand the next block's norm1 over: x + ls2(mlp(h)) and that norm1 are one call
    (the next norm1 module is not run); a hook on it, or a hook changing x between blocks, takes the stock way
    with the same numbers; unswap removes the links."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, init_values=0.5,
                              drop_path_rate=0.0).to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        want = model(x)
        swap(model)
        runs = []
        for i, block in enumerate(model.blocks):
            norm = block.norm1
            object.__setattr__(norm, "forward",
                               lambda t, norm=norm, i=i: (runs.append(i), type(norm).forward(norm, t))[1])
        assert_close(model(x), want, torch.float32, "linked", tol=dot_tolerance(torch.float32))
        assert runs == [0]  # blocks 1 and 2 took the norm1 their predecessor computed
        seen = []
        handle = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: seen.append(1))
        assert_close(model(x), want, torch.float32, "hooked norm1", tol=dot_tolerance(torch.float32))
        handle.remove()
        assert seen == [1]
        handle = model.blocks[0].register_forward_hook(lambda m, i, o: o * 2)
        model_twice = model(x)
        handle.remove()
        unswap(model)  # the stock norm1 modules come back (the spied ones were the fused drop-ins)
        handle = model.blocks[0].register_forward_hook(lambda m, i, o: o * 2)
        assert_close(model_twice, model(x), torch.float32, "x changed between blocks", tol=dot_tolerance(torch.float32))
        handle.remove()
    assert not any(k.startswith("_fusedtx") for b in model.blocks for k in b.__dict__)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "timm_gelu", "timm_gelu_tanh"])
def test_timm_mlp_activation_in_place(act):
    """In inference the swapped timm Mlp applies its activation in place on fc1's output: the float64 stock
    numbers. A forward hook on fc1 keeps that output, so with one the stock path runs and the kept tensor is
    untouched; an activation without an in-place variant is left alone and listed."""
    from timm.layers import Mlp
    from timm.layers.activations import GELU, GELUTanh

    layers = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
              "timm_gelu": GELU, "timm_gelu_tanh": GELUTanh}  # timm's own: what Swin V2's act_layer="gelu" makes
    mlp = Mlp(24, 61, act_layer=layers[act]).to(DEVICE).eval()
    stock64 = copy.deepcopy(mlp).double()
    x = torch.randn(3, 7, 24, device=DEVICE)
    assert dict(swap(mlp).replaced) == {"MLP activation in place": 1}
    with torch.inference_mode():
        assert_close(mlp(x), stock64(x.double()), torch.float32, tol=dot_tolerance(torch.float32))
    kept = []
    mlp.fc1.register_forward_hook(lambda module, args, out: kept.append(out))
    with torch.no_grad():
        out = mlp(x)
        assert torch.equal(kept[0], mlp.fc1(x)), "the hooked fc1 output was modified in place"
        assert_close(out, stock64(x.double()), torch.float32, tol=dot_tolerance(torch.float32))
    silu = Mlp(24, 61, act_layer=nn.SiLU)
    report = swap(silu)
    assert report.total == 0 and "torch.nn.modules.activation.SiLU" in report.left_alone[0][2]
