"""The command line: ``fusedtx info`` and ``fusedtx bench``."""

import subprocess
import sys

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
