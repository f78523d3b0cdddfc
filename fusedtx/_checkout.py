"""Running from a checkout: its top-level ``kernels/`` folder must not shadow another distribution's ``kernels``.

setup.py installs that folder as ``fusedtx.kernels``, so an installed fusedtx has no top-level ``kernels``. But
whenever a checkout's root is on ``sys.path`` (``python -m pytest`` or ``python -m fusedtx...`` run there), the
folder is importable as plain ``kernels`` too, ahead of site-packages, and Hugging Face's ``kernels``
distribution (a dependency of transformers since 5.25, which imports it as a model loads) would find
fusedtx's launchers instead and fail (``cannot import name 'CUDAProperties' from 'kernels'``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def import_installed_kernels() -> None:
    """Where a checkout's root shadows an installed ``kernels``, import the installed one under its own name,
    with that root left off ``sys.path`` for the import, so every later ``import kernels`` finds it. Elsewhere
    (an installed fusedtx, no such distribution, or ``kernels`` already imported) nothing happens."""
    if "kernels" in sys.modules:
        return
    found, ours = importlib.util.find_spec("kernels"), importlib.util.find_spec("fusedtx.kernels")
    if found is None or ours is None or found.origin != ours.origin:
        return
    root = os.path.dirname(os.path.dirname(os.path.realpath(ours.origin)))
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.curdir) != root]
    try:
        if importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")
    finally:
        sys.path[:] = saved
