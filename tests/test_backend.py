"""Backend selection: FUSEDTX_BACKEND, use_backend, devices, and fallbacks."""

import warnings

import pytest
import torch

import fusedtx
from fusedtx import _backend

CPU = torch.device("cpu")


# Only _backend reads TRITON_INTERPRET here: Triton itself must never see it change mid-process (a kernel
# module imported while it is off would no longer run in the interpreter), so nothing below runs a kernel
# while it is off, and the op-level test switches the interpreter off through _backend alone.


def test_auto_takes_triton_on_cpu_only_with_the_interpreter(monkeypatch):
    monkeypatch.delenv("FUSEDTX_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select("op", CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _backend.interpreter_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where Triton cannot run, the fast path is the plan: no warning
        assert _backend.select("op", CPU) == "torch"
        assert _backend.select("op", torch.device("meta")) == "torch"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDTX_BACKEND", "reference")
    assert _backend.select("op", CPU) == "reference"
    monkeypatch.setenv("FUSEDTX_BACKEND", "torch")
    assert _backend.select("op", CPU, "is unsupported") == "torch"
    monkeypatch.setenv("FUSEDTX_BACKEND", "Triton")
    assert _backend.select("op", CPU) == "triton"
    monkeypatch.setenv("FUSEDTX_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FUSEDTX_BACKEND"):
        _backend.select("op", CPU)


def test_use_backend_nests_and_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDTX_BACKEND", "triton")
    with fusedtx.use_backend("reference"):
        assert _backend.select("op", CPU) == "reference"
        with fusedtx.use_backend("auto"):
            assert _backend.select("op", CPU) == "triton"
        assert _backend.requested() == "reference"
    assert _backend.requested() == "triton"
    with pytest.raises(ValueError, match="backend"):
        with fusedtx.use_backend("fast"):
            pass


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(_backend, "interpreter_enabled", lambda: False)
    with fusedtx.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _backend.select("layer_norm_gelu", CPU)
        with pytest.raises(RuntimeError, match="layer_norm_gelu"):
            fusedtx.layer_norm_gelu(torch.randn(2, 8))


def test_unsupported_case_warns_once_under_auto_and_raises_under_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _backend.select("op", CPU, "has no config for head dim 512") == "torch"
    assert len(caught) == 1 and "head dim 512" in str(caught[0].message)
    assert "fast PyTorch path" in str(caught[0].message)
    with fusedtx.use_backend("triton"), pytest.raises(RuntimeError, match="head dim 512"):
        _backend.select("op", CPU, "has no config for head dim 512")


def test_explain_does_not_warn(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.explain(CPU, "is unsupported") == ("torch", "is unsupported")
        assert _backend.explain(CPU)[0] == "triton"
