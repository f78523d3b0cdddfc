"""fusedtx.swap / unswap on real model zoos (random weights, no downloads), and fusedtx profile."""

import pytest
import torch
from torch import nn

import fusedtx
from fusedtx import profile
from fusedtx.swap import FusedAway, swap, unswap
from tests.conftest import DEVICE
from tests.helpers import assert_close


def _forward_backward(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.backward(torch.ones_like(out))
    return out.detach(), x.grad


def _check_swap_matches(model, x, expected_counts, **kwargs):
    keys = list(model.state_dict())
    ref_out, ref_grad = _forward_backward(model, x)
    report = swap(model, **kwargs)
    assert dict(report.replaced) == expected_counts, str(report)
    assert report.model is model and list(model.state_dict()) == keys
    out, grad = _forward_backward(model, x)
    assert_close(out, ref_out, torch.float32, "output", tol=1e-5)
    assert_close(grad, ref_grad, torch.float32, "input gradient", tol=1e-5)
    return report


def test_timm_vit_layer_norms():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48).to(DEVICE)
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    _check_swap_matches(model, x, {"LayerNorm": 25}, attention=False, window_attention=False)
    assert isinstance(model.norm, fusedtx.nn.LayerNorm)
    unswap(model)
    assert type(model.norm).__name__ == "LayerNorm" and not isinstance(model.norm, fusedtx.nn.LayerNorm)


def test_sequential_layer_norm_then_gelu_fuses_and_unswaps():
    model = nn.Sequential(nn.Linear(12, 12), nn.LayerNorm(12), nn.GELU(approximate="tanh"), nn.Linear(12, 3))
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
    pytest.importorskip("timm")
    code = profile.main(["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "1", "--steps", "1",
                         "--out", str(tmp_path), "--trace", str(tmp_path / "t.json")])
    assert code == 0
    text = (tmp_path / "report.md").read_text()
    assert "Speedup" in text and "| attention |" in text
    assert (tmp_path / "trace_stock.json").stat().st_size > 0 and (tmp_path / "t.json").stat().st_size > 0
