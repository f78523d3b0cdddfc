"""Every bench runs on the CPU at tiny sizes and writes its table, CSV and plot, so the benches cannot rot."""

import math
from pathlib import Path

import pytest
import torch

from fusedtx import cli

BENCHES = sorted(p.stem.removeprefix("bench_") for p in (Path(__file__).parent.parent / "bench").glob("bench_*.py"))


def test_every_family_has_a_bench():
    assert set(cli.families()) <= set(BENCHES)


@pytest.mark.parametrize("family", BENCHES)
def test_bench_runs_on_cpu(family, tmp_path):
    import importlib

    module = importlib.import_module(f"fusedtx.bench.bench_{family}")
    table = module.run(tmp_path, quick=True, device=torch.device("cpu"))
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / f"{table.name}.{suffix}").stat().st_size > 0
    fused = [r for r in table.rows if r["impl"] == "fusedtx"]
    assert fused and all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in fused)
    assert "fusedtx" in (tmp_path / f"{table.name}.md").read_text()
