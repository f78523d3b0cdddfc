"""A checkout's top-level kernels/ folder does not shadow another distribution's ``kernels`` (fusedtx._checkout)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = "import fusedtx, kernels, fusedtx.kernels.support as ours; print(kernels.__file__); print(ours.__file__)"


def test_importing_fusedtx_from_the_checkout_root_leaves_kernels_to_its_distribution(tmp_path):
    """Run from the checkout's root (on sys.path first, as under ``python -m``), with a stand-in for Hugging
    Face's ``kernels`` further down the path: after ``import fusedtx``, plain ``kernels`` is the stand-in and
    fusedtx's own launchers still come from the checkout."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    plain, ours = done.stdout.split()
    assert Path(plain).resolve() == (tmp_path / "kernels" / "__init__.py").resolve()
    assert Path(ours).resolve() == ROOT / "kernels" / "support.py"
