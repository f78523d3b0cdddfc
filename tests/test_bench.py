"""Every bench runs on the CPU at tiny sizes and writes its table, CSV and plot, so the benches cannot rot; the
prepared GPU run's command lines are checked on the CPU too."""

import importlib
import itertools
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from fusedtx import cli

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
BENCHES = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def test_every_family_has_a_bench():
    assert set(cli.families()) <= set(BENCHES)


@pytest.mark.parametrize("family", BENCHES)
def test_bench_runs_on_cpu(family, tmp_path):
    module = importlib.import_module(f"fusedtx.bench.bench_{family}")
    table = module.run(tmp_path, quick=True, device=torch.device("cpu"))
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / f"{table.name}.{suffix}").stat().st_size > 0
    fused = [r for r in table.rows if r["impl"] == "fusedtx"]
    assert fused and all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in fused)
    assert "fusedtx" in (tmp_path / f"{table.name}.md").read_text()


def test_gpu_check_steps_name_commands_and_options_that_exist(tmp_path, capsys):
    """bench/gpu_check.sh in its dry run (FUSEDTX_GPU_DRY_RUN=1): every ``python3 -m`` step of fusedtx names a
    module this checkout has and passes only options that command lists in its --help, so that a renamed option
    is found here and not on a lent GPU's clock; the CPU bench is not among the GPU steps."""
    env = {**os.environ, "FUSEDTX_GPU_DRY_RUN": "1", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCH_DIR / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    steps = dict(line.removeprefix("dry run: ").split(": ", 1) for line in done.stdout.splitlines()
                 if line.startswith("dry run: "))
    assert {"install", "check", "tests", "strategies"} <= set(steps)
    assert not any("bench_cpu" in line for line in steps.values())
    helps = {}
    for name, line in steps.items():
        if not line.startswith("python3 -m "):  # the -c step: its code, printed in bash's $'...' quoting
            continue
        argv = shlex.split(line)
        if argv[2] in ("pip", "pytest"):
            continue
        module, rest = argv[2], argv[3:]
        words = tuple(itertools.takewhile(lambda w: not w.startswith("-"), rest))  # a subcommand: fusedtx tune
        if (module, words) not in helps:
            main = importlib.import_module("fusedtx.cli" if module == "fusedtx" else module).main
            with pytest.raises(SystemExit):
                main([*words, "--help"])
            helps[module, words] = capsys.readouterr().out
        for flag in (w for w in rest if w.startswith("--")):
            assert flag in helps[module, words], f"step {name}: `{module} {' '.join(words)}` takes no {flag}"
    assert len(helps) >= 5  # fusedtx check, tune and profile, and the benches
