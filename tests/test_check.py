"""``fusedtx check``, the packaged self-test: it runs the kernels against float64 and says so, and it fails
when a result is wrong."""

import pytest

from fusedtx import check, reference


def test_check_passes_on_this_device(capsys):
    assert check.main(["layer_norm_gelu", "sinusoidal"]) == 0
    out = capsys.readouterr().out
    assert "backend triton forced" in out and "| layer_norm_gelu |" in out and "| sinusoidal |" in out
    assert "FAIL" not in out


def test_check_fails_on_a_wrong_result(monkeypatch, capsys):
    right = reference.add_sinusoidal
    monkeypatch.setattr(reference, "add_sinusoidal", lambda x, *a, **k: right(x, *a, **k) + 1e-2 * x.abs().mean())
    assert check.main(["sinusoidal"]) == 1
    out = capsys.readouterr().out
    assert "**FAIL**" in out and "FAILED" in out.splitlines()[-1]


def test_check_rejects_an_unknown_family():
    with pytest.raises(SystemExit, match="softmax"):
        check.main(["softmax"])
