"""The command line: ``fusedtx info``, ``fusedtx bench`` and the checkpoint loading of ``fusedtx profile``."""

import subprocess
import sys

import pytest
import torch

from fusedtx import _backend, cli


def test_info_lists_versions_and_every_family_backend():
    text = cli.info()
    for word in ("torch", "triton", "python"):
        assert word in text
    backend, why = _backend.explain(torch.device("cpu"))
    for family in cli.families():
        # One row per (family, device): on a CUDA machine the cuda row comes first, so pick the cpu one.
        line = next(line for line in text.splitlines() if line.startswith(family) and line.split()[1] == "cpu")
        assert line.split()[2] == backend and why in line


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fusedtx", "info"], capture_output=True, text=True, check=True)
    assert "layer_norm_gelu" in out.stdout


def test_profile_weights_load_a_checkpoint(tmp_path):
    """``fusedtx profile --strategy ... --weights FILE``: a safetensors file or a torch checkpoint (wrapped in
    ``state_dict``) loads every parameter; weights of another model stop with a message naming --weights."""
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    from fusedtx.highres.compare import build_model, load_weights

    trained = build_model("vit_tiny_patch16_224")
    state = {k: torch.randn_like(v) for k, v in trained.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = build_model("vit_tiny_patch16_224")
        load_weights(model, str(tmp_path / name))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=f"{name}: {key}")
    with pytest.raises(SystemExit, match="--weights .*w.safetensors: does not fit the model"):
        load_weights(build_model("vit_small_patch16_224"), str(tmp_path / "w.safetensors"))
