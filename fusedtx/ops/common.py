"""What every family's ops share: argument validation, the fallback decision, and the custom-op plumbing."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import torch
from torch import Tensor

from fusedtx import _backend, fastpath, reference
from fusedtx.kernels.support import KERNEL_DTYPES, MAX_SPAN

T = TypeVar("T")

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernels(family: str):
    """The Triton module of a family, imported on first use (importing it imports Triton)."""
    return importlib.import_module(f"fusedtx.kernels.{family}")


def unsupported_dtype(dtype: torch.dtype) -> str | None:
    """Why the kernels do not cover ``dtype``, or None."""
    if dtype in KERNEL_DTYPES:
        return None
    return f"has no {dtype} variant (it computes in float32)"


def unsupported_span(spans: list[int], what: str) -> str | None:
    """Why the kernels do not cover a call whose largest offset inside ``what`` is ``max(spans)``, or None."""
    if max(spans, default=0) >= MAX_SPAN:
        return f"indexes {what} with 32-bit offsets and this one spans more"
    return None


def first_reason(*reasons: str | None) -> str | None:
    """The first reason that is not None (the kernels' coverage checks, in the order they are asked)."""
    return next((r for r in reasons if r is not None), None)


def check_dtype(name: str, dtype: torch.dtype) -> None:
    """TypeError naming ``name`` unless ``dtype`` is a float dtype fusedtx computes in."""
    if dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype}")


def check_same_device(name: str, t: Tensor, other_name: str, other: Tensor) -> None:
    """ValueError naming both tensors unless they are on one device."""
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}")


def check_tensor(name: str, t: Tensor, like: tuple[str, Tensor] | None = None,
                 shape: tuple[int, ...] | None = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a float tensor (on the device of the
    named tensor ``like``, and of ``shape``, when given)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dtype(name, t.dtype)
    if like is not None:
        check_same_device(name, t, *like)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_count(name: str, value, minimum: int) -> None:
    """TypeError/ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_probability(name: str, p) -> float:
    """``p`` as a float in [0, 1] (ValueError naming ``name`` otherwise)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


DROPOUT = "does not apply dropout to the attention probabilities (dropout_p > 0)"


def implementation(backend: str) -> ModuleType:
    """The PyTorch module computing a call that the kernels do not: the fast path for ``"torch"``, the spec
    for ``"reference"``."""
    return fastpath if backend == "torch" else reference


def fallback(op: str, device: torch.device, reason: str | None) -> ModuleType | None:
    """None when the kernels can serve a call of ``op`` (``reason`` is None). Otherwise the module that
    computes it instead (:func:`implementation` of the backend in force), after warning once per
    (op, reason) under ``auto``; under ``triton`` it raises."""
    if reason is None:
        return None
    backend = _backend.select(op, device, reason)
    return implementation("torch" if backend == "triton" else backend)


def try_kernel(op: str, device: torch.device, reason: str | None,
               kernel: Callable[[], T]) -> tuple[T | None, ModuleType | None]:
    """``(kernel(), None)`` when the backend in force for a call of ``op`` (``_backend.select``; ``reason`` as
    there) is Triton and a launch config fits; otherwise ``(None, module)``, the module that computes the call
    instead (:func:`implementation`). Where Triton raised ``OutOfResources`` at launch (for attention and window
    attention, after their launch guard tried every smaller config; the other families have one config per
    shape), that is the fast path, with one warning per op, so that a resource limit never breaks a user's
    model."""
    backend = _backend.select(op, device, reason)
    if backend == "triton":
        try:
            return kernel(), None
        except _backend.out_of_resources() as err:
            backend = _backend.no_config_fits(op, err)
    return None, implementation(backend)


def call(op, *args, inference: Callable | None = None):
    """Run the custom op ``op`` on ``args``. Through the dispatcher whenever it matters: under
    ``torch.compile`` or any dispatch mode (fake tensors, opcheck, FlopCounterMode), for tensor subclasses,
    and when an input needs a gradient (the op's autograd). Otherwise, in eager inference, its implementation
    is called directly: the dispatcher would cost about 80 µs a call there, and its first call imports
    ``torch._dynamo`` (about 150 MB resident). ``inference``, when given, is called there instead: the
    op's forward without what only a backward reads (its outputs may then be None)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 or not hasattr(op, "_init_fn"):
        return op(*args)
    grad = torch.is_grad_enabled()
    for a in args:  # a plain loop: this check runs on every eager call, and generators cost microseconds here
        if isinstance(a, Tensor) and (type(a) not in _PLAIN_TENSORS or (grad and a.requires_grad)):
            return op(*args)
    return (inference or op._init_fn)(*args)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """``t``, or an empty tensor standing for None in a custom op's tensor outputs."""
    return t if t is not None else like.new_empty(0)


def vjp(fn: Callable[..., Tensor], args: tuple, wrt: tuple[bool, ...], cotangent: Tensor) -> list[Tensor | None]:
    """The backward of a PyTorch forward ``fn(*args)`` (the reference's, or the fast path's): its
    vector-Jacobian product for ``cotangent`` with respect to the arguments marked in ``wrt`` (None for
    the others)."""
    chosen = [i for i, w in enumerate(wrt) if w]

    def forward(*primals):
        full = list(args)
        for i, p in zip(chosen, primals, strict=True):
            full[i] = p
        return fn(*full)

    # Under a TorchDispatchMode (FlopCounterMode, opcheck's checks) the op runs with functorch's dispatch
    # keys excluded, and torch.func.vjp would hand its wrapper tensors to the CPU kernels ("Cannot access
    # data pointer of Tensor that doesn't have storage"): give functorch its keys back for the call.
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _FUNCTORCH_KEYS:
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        grads = iter(torch.func.vjp(forward, *(args[i] for i in chosen))[1](cotangent))
    return [next(grads) if w else None for w in wrt]


_FUNCTORCH_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in (
    "FuncTorchDynamicLayerFrontMode", "FuncTorchDynamicLayerBackMode", "FuncTorchGradWrapper", "FuncTorchBatched",
    "FuncTorchVmapMode"))
