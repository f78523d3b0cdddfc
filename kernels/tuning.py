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
import warnings
from collections.abc import Callable

import torch
from triton.runtime import OutOfResources

from fusedtx.kernels.support import CONSERVATIVE_FAMILY, arch_family

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


def launch(kernel: str, key: tuple, config: Config, run: Callable[[Config], object], fixed_m: bool = False):
    """``run(config)`` (it launches one kernel, or a set of them, with that config) and its result; on
    ``OutOfResources`` the same with :func:`shrink`'s next config until one launches, with one warning per
    (kernel, key). Re-raises when even the smallest config does not fit."""
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
