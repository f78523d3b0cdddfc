"""The one place that decides, per call, which backend an op runs on.

* ``triton``: the Triton kernels (:mod:`fusedtx.kernels`), on CUDA tensors, or on CPU tensors in Triton's
  interpreter (``TRITON_INTERPRET=1``, how the test suite runs them without a GPU);
* ``torch``: the fast PyTorch path (:mod:`fusedtx.fastpath`: SDPA, ``F.layer_norm``, cached tables);
* ``reference``: the plain spec (:mod:`fusedtx.reference`), for tests and debugging.

Order of precedence:

1. ``fusedtx.use_backend(name)`` (a context manager, innermost wins);
2. the environment variable ``FUSEDTX_BACKEND`` (``auto`` | ``triton`` | ``torch`` | ``reference``, default
   ``auto``).

``auto`` takes Triton where it can run (CUDA tensors; CPU tensors under the interpreter) and the fast
PyTorch path everywhere else. A case a kernel does not cover (see :func:`select`) takes the fast PyTorch
path with a one-time warning under ``auto``, and raises under ``triton``: ``triton`` where Triton cannot
run is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch

from fusedtx.kernels.support import interpreter_enabled

BACKENDS = ("auto", "triton", "torch", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedtx_backend", default=None)
_warned: set[tuple[str, str]] = set()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested() -> str:
    """The backend asked for: the innermost ``use_backend``, else ``FUSEDTX_BACKEND``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _parse_environment(os.environ.get("FUSEDTX_BACKEND", "auto"))


@functools.lru_cache(maxsize=8)
def _parse_environment(raw: str) -> str:
    """``FUSEDTX_BACKEND``'s value as a backend name (parsed once per value: every op call asks)."""
    return _check_name(raw.strip().lower(), "FUSEDTX_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fusedtx calls on backend ``name`` (``"auto"``, ``"triton"``, ``"torch"`` or
    ``"reference"``)."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: a search of sys.path on every op call costs about 0.1 ms."""
    return importlib.util.find_spec("triton") is not None


def _triton_runs_on(kind: str) -> bool:
    """Whether Triton kernels can run on tensors of device type ``kind`` (every op call asks: kept cheap)."""
    return _triton_installed() and (kind == "cuda" or (kind == "cpu" and interpreter_enabled()))


def triton_support(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of ``device``, and why (or why not)."""
    kind = device.type
    if _triton_runs_on(kind):
        return True, ("CUDA tensor and Triton installed" if kind == "cuda"
                      else "CPU tensor with TRITON_INTERPRET=1 (Triton interpreter)")
    if not _triton_installed():
        return False, "Triton is not installed"
    if kind == "cpu":
        return False, "CPU tensor (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    return False, f"device type {kind!r} has no Triton backend here"


def explain(device: torch.device, unsupported: str | None = None) -> tuple[str, str]:
    """The backend a call on ``device`` would take, and the reason, without raising or warning."""
    want = requested()
    if want in ("torch", "reference"):
        return want, f"backend {want!r} requested"
    ok, why = triton_support(device)
    if not ok:
        return "torch", why
    if unsupported is not None:
        return "torch", unsupported
    return "triton", why


def select(op: str, device: torch.device, unsupported: str | None = None) -> str:
    """Return ``"triton"``, ``"torch"`` or ``"reference"`` for one call of ``op`` on ``device``.

    ``unsupported`` is the op's reason why its kernel does not cover this call (``None`` when it
    does). Under ``auto`` such a call warns once per (op, reason) and takes the fast PyTorch path; under
    ``triton`` it raises ``RuntimeError``, as does a device Triton cannot run on. A device Triton cannot
    run on takes the fast PyTorch path under ``auto`` without a warning: that is what it is for.
    """
    want = requested()
    if want in ("torch", "reference"):
        return want
    if not _triton_runs_on(device.type):
        if want == "triton":
            raise RuntimeError(f"fusedtx.{op}: backend 'triton' was requested but cannot run: "
                               f"{triton_support(device)[1]}")
        return "torch"
    if want == "triton" and unsupported is not None:
        raise RuntimeError(f"fusedtx.{op}: backend 'triton' was requested but the kernel {unsupported}")
    if unsupported is not None:
        if (op, unsupported) not in _warned:
            _warned.add((op, unsupported))
            warnings.warn(
                f"fusedtx.{op}: the Triton kernel {unsupported}; using the fast PyTorch path",
                stacklevel=3,
            )
        return "torch"
    return "triton"


def out_of_resources() -> type[Exception]:
    """Triton's ``OutOfResources`` (imported on use: only a kernel call, which has imported Triton, raises it)."""
    from triton.runtime import OutOfResources

    return OutOfResources


def no_config_fits(op: str, err: Exception) -> str:
    """The backend a kernel call of ``op`` takes when not even the smallest launch config fits the GPU (the
    launch guard retried every smaller one and Triton still raised ``err``, its ``OutOfResources``): the
    fast PyTorch path, with one warning per op, so that a resource limit never breaks a user's model.
    Under ``triton`` the error is raised."""
    if requested() == "triton":
        raise err
    if (op, "resources") not in _warned:
        _warned.add((op, "resources"))
        warnings.warn(f"fusedtx.{op}: no launch config of the Triton kernel fits this GPU ({err}); using the fast "
                      "PyTorch path", RuntimeWarning, stacklevel=3)
    return "torch"
