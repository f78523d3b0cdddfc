"""Which launch config a kernel runs on a device, and the launch guard that keeps a resource limit from breaking
a user's model.

A config is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. Each kernel file keeps one table per architecture
family (``fusedtx.kernels.support.ARCH_FAMILIES``); :func:`device_family` says which one a device takes, from
``torch.cuda.get_device_capability()`` (cached per device). :func:`launch` runs a launch with the chosen config
and, when Triton raises ``OutOfResources`` (an unlisted card, a future Triton), retries with the next smaller
config (:func:`shrink`), warns once and remembers the config that launched, so later calls go straight to it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.runtime import OutOfResources

from .support import CONSERVATIVE_FAMILY, arch_family

Config = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
MIN_BLOCK = 16  # the smallest tl.dot size

_working: dict[tuple, Config] = {}  # (kernel, key, first config) -> the config that launched after a failure
_warned: set[tuple] = set()


@functools.cache
def _family_of(index: int) -> str:
    return arch_family(torch.cuda.get_device_capability(index))


def device_family(device: torch.device) -> str:
    """The config family of ``device`` (the most conservative one for a device that is not CUDA)."""
    if device.type != "cuda":
        return CONSERVATIVE_FAMILY
    return _family_of(device.index if device.index is not None else torch.cuda.current_device())


def shrink(config: Config, fixed_m: bool = False) -> Config | None:
    """The next smaller config: one pipeline stage less, then the larger block halved (down to 16), BLOCK_M
    never when ``fixed_m``; None when nothing is left to shrink."""
    bm, bn, warps, stages = config
    if stages > 1:
        return bm, bn, warps, stages - 1
    if not fixed_m and bm > MIN_BLOCK and bm >= bn:
        return bm // 2, bn, warps, stages
    if bn > MIN_BLOCK:
        return bm, bn // 2, warps, stages
    if not fixed_m and bm > MIN_BLOCK:
        return bm // 2, bn, warps, stages
    return None


def launch(kernel: str, key: tuple, config: Config, run: Callable[[Config], object], fixed_m: bool = False,
           tuning: Tuning | None = None):
    """``run(config)`` (it launches one kernel, or a set of them, with that config) and its result; on
    ``OutOfResources`` the same with :func:`shrink`'s next config until one launches, with one warning per
    (kernel, key). Re-raises when even the smallest config does not fit (the op then takes the PyTorch
    path). With ``FUSEDTX_TUNE=1`` and a ``tuning`` whose key has no tuned config yet, the candidates are
    timed first (:func:`tune`)."""
    if tuning is not None and tuning_requested() and tuning.key not in _tables(tuning.device):
        config = tune(tuning, run) or config  # none fits: the table's config, shrunk below as any other
    slot = (kernel, key, config)
    current = _working.get(slot, config)
    while True:
        try:
            result = run(current)
        except OutOfResources as err:
            smaller = shrink(current, fixed_m)
            if smaller is None:
                raise
            if slot not in _warned:
                _warned.add(slot)
                warnings.warn(f"fusedtx: {kernel} {key} config {current} does not fit this GPU ({err}); "
                              f"retrying with smaller configs (this warning is shown once)",
                              RuntimeWarning, stacklevel=3)
            current = smaller
            continue
        if current != config:
            _working[slot] = current
        return result


# --------------------------------------------------------------------------------------------------
# Tuned configs: the user's file, then the shipped per-device file, then the built-in tables
# --------------------------------------------------------------------------------------------------

CONFIG_DIR_ENV = "FUSEDTX_CONFIG_DIR"
TUNE_ENV = "FUSEDTX_TUNE"
FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Tuning:
    """What a launch offers for tuning: its device, the key its tuned config is stored under, and the
    candidates to time (the built-in choice first)."""

    device: torch.device
    key: str
    candidates: tuple[Config, ...]


def config_dir() -> Path | None:
    """Where ``fusedtx tune`` writes: ``$FUSEDTX_CONFIG_DIR``, else the user cache dir (platformdirs; None
    where it is not installed, as on an install made with ``--no-deps``)."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    try:
        import platformdirs
    except ImportError:
        return None
    return Path(platformdirs.user_cache_dir("fusedtx"))


def device_identity(device: torch.device) -> dict:
    """What a tuned file must match to be used: the card's name, compute capability and Triton's version."""
    if device.type == "cuda":
        name, capability = torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))
    else:
        name, capability = "cpu (Triton interpreter)", [0, 0]
    return {"format": FORMAT, "device": name, "capability": capability, "triton": triton.__version__}


def file_name(identity: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", identity["device"]).strip("-").lower()
    return f"{slug}-sm{identity['capability'][0]}{identity['capability'][1]}.json"


def _warn_once(path: Path, why: str) -> None:
    if ("file", path) not in _warned:
        _warned.add(("file", path))
        warnings.warn(f"fusedtx: ignoring tuned configs in {path}: {why}", RuntimeWarning, stacklevel=4)


def read_file(path: Path, identity: dict) -> dict[str, Config]:
    """The configs of a tuned file written for ``identity``; {} (with one warning) for a corrupt file or
    one tuned for another card, another compute capability, another Triton or another format."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        configs = {str(k): tuple(int(x) for x in v) for k, v in data["configs"].items()}
        if any(len(c) != 4 or min(c) < 1 for c in configs.values()):
            raise ValueError("a config is not four positive ints")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        _warn_once(path, f"unreadable ({type(exc).__name__}: {exc})")
        return {}
    theirs = {k: data.get(k) for k in identity}
    if theirs != identity:
        _warn_once(path, f"tuned for {theirs}, this is {identity}")
        return {}
    return configs


@functools.cache
def _tables(device: torch.device) -> dict[str, Config]:
    identity = device_identity(device)
    name = file_name(identity)
    table = read_file(SHIPPED_DIR / name, identity)
    folder = config_dir()
    if folder is not None:
        table.update(read_file(folder / name, identity))  # the user's own tuning wins
    return table


def tuned_or(device: torch.device, key: str, default: Config) -> Config:
    """The tuned config stored under ``key`` for ``device``, else ``default`` (the built-in table's)."""
    return _tables(device).get(key, default)


def record(device: torch.device, configs: dict[str, Config]) -> Path:
    """Merge ``configs`` into the user's tuned file for ``device`` and use them from now on; returns the path."""
    identity = device_identity(device)
    folder = config_dir()
    if folder is None:
        raise RuntimeError(f"fusedtx: set {CONFIG_DIR_ENV} (or install platformdirs) to say where tuned configs go")
    path = folder / file_name(identity)
    table = read_file(path, identity)
    table.update(configs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**identity, "configs": {k: list(v) for k, v in sorted(table.items())}}, indent=1))
    _tables.cache_clear()
    return path


def tuning_requested() -> bool:
    """``FUSEDTX_TUNE=1``: a launch whose kernel has no tuned config times its candidates on first call."""
    return os.environ.get(TUNE_ENV, "0") not in ("", "0")


def _time_ms(run: Callable[[Config], object], config: Config, device: torch.device, reps: int = 5) -> float:
    if device.type != "cuda":  # the interpreter: one run says that it works, nothing about speed
        t0 = time.perf_counter()
        run(config)
        return (time.perf_counter() - t0) * 1e3
    run(config)  # compiles
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run(config)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def tune(tuning: Tuning, run: Callable[[Config], object]) -> Config | None:
    """Time every candidate of ``tuning`` with ``run`` (each launch rewrites all its outputs, so rerunning it
    is harmless), skip those that do not fit, record the fastest and return it; None (nothing recorded) when
    none fits."""
    times = {}
    for config in tuning.candidates:
        try:
            times[config] = _time_ms(run, config, tuning.device)
        except OutOfResources:
            continue
    if not times:
        return None
    best = min(times, key=times.get)
    record(tuning.device, {tuning.key: best})
    return best
