"""Sinusoidal position encodings, 1D and 2D, generated or fused into ``x + PE``: ``sinusoidal_encoding``,
``sincos_2d``, ``add_sinusoidal``, ``add_sincos_2d``."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedtx import fastpath, reference
from fusedtx.kernels.support import SINCOS_2D_MAX_CELLS
from fusedtx.ops.common import call, check_count, check_dtype, check_tensor, kernels, try_kernel, unsupported_dtype


def check_encoding_args(dim, multiple: int, base, layout: str, layouts: tuple[str, ...]) -> None:
    """TypeError/ValueError naming the argument unless ``dim`` is a positive multiple of ``multiple``,
    ``base`` a positive finite number and ``layout`` one of ``layouts`` (the modules' constructors too)."""
    check_count("dim", dim, multiple)
    if dim % multiple != 0:
        what = "even (sin, cos pairs)" if multiple == 2 else "divisible by 4 (sin, cos of rows and of columns)"
        raise ValueError(f"dim must be {what}, got dim={dim}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < float("inf"):
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if layout not in layouts:
        raise ValueError(f"layout must be one of {layouts}, got {layout!r}")


def _check_positions(positions: Tensor, length, device: torch.device, batch=None) -> Tensor:
    """Validate integer ``positions`` of shape (length,) or (batch, length); return them as int32/int64."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.device != device:
        raise ValueError(f"positions is on {positions.device} but the encoding is for {device}")
    rows = "(length,)" if batch is None else f"({length},) or ({batch}, {length})"
    if positions.dim() not in (1, 2) or positions.shape[-1] != length:
        raise ValueError(f"positions must have shape {rows}, got {tuple(positions.shape)}")
    if batch is not None and positions.dim() == 2:
        if positions.shape[0] not in (1, batch):
            raise ValueError(f"positions must have shape {rows}, got {tuple(positions.shape)}")
        positions = positions.expand(batch, length)
    return positions if positions.dtype in (torch.int32, torch.int64) else positions.long()


def _check_add_input(x: Tensor) -> None:
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, seq, dim), got {tuple(x.shape)}")


def _sincos_2d_unsupported(dtype: torch.dtype, cells: int) -> str | None:
    if cells >= SINCOS_2D_MAX_CELLS:
        return f"covers grids of fewer than {SINCOS_2D_MAX_CELLS} patches"
    return unsupported_dtype(dtype)


@torch.library.custom_op("fusedtx::sinusoidal_encoding", mutates_args=())
def _sinusoidal_encoding(
    length: int, dim: int, positions: Tensor | None, offset: int, base: float, layout: str,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    done, impl = try_kernel("sinusoidal", device, unsupported_dtype(dtype),
                            lambda: kernels("sinusoidal").sinusoidal_1d(None, positions, length, dim, offset, base,
                                                                        layout, dtype, device))
    if impl is None:
        return done
    if impl is fastpath:
        return fastpath.sinusoidal_encoding(length, dim, positions, offset, base, layout, dtype, device)
    # The reference in float64, rounded once: exact at any position (a float32 one is not; see the tests).
    pe = reference.sinusoidal_encoding(length, dim, positions, offset, base, layout, torch.float64, device)
    return pe.to(dtype)


@_sinusoidal_encoding.register_fake
def _(length, dim, positions, offset, base, layout, dtype, device):
    lead = (length,) if positions is None or positions.dim() == 1 else (positions.shape[0], length)
    return torch.empty((*lead, dim), dtype=dtype, device=device)


@torch.library.custom_op("fusedtx::sincos_2d", mutates_args=())
def _sincos_2d(
    grid_h: int, grid_w: int, dim: int, num_prefix_tokens: int, base: float, layout: str,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    done, impl = try_kernel("sinusoidal", device, _sincos_2d_unsupported(dtype, grid_h * grid_w),
                            lambda: kernels("sinusoidal").sincos_2d(None, grid_h, grid_w, dim, num_prefix_tokens, base,
                                                                    layout, dtype, device))
    if impl is None:
        return done
    if impl is fastpath:
        return fastpath.sincos_2d(grid_h, grid_w, dim, base, num_prefix_tokens, layout, dtype, device)
    pe = reference.sincos_2d(grid_h, grid_w, dim, base, num_prefix_tokens, layout, torch.float64, device)
    return pe.to(dtype)


@_sincos_2d.register_fake
def _(grid_h, grid_w, dim, num_prefix_tokens, base, layout, dtype, device):
    return torch.empty((num_prefix_tokens + grid_h * grid_w, dim), dtype=dtype, device=device)


@torch.library.custom_op("fusedtx::add_sinusoidal", mutates_args=())
def _add_sinusoidal(x: Tensor, positions: Tensor | None, offset: int, base: float, layout: str) -> Tensor:
    """x + PE as a new contiguous tensor of x's shape and dtype."""
    _, seq, dim = x.shape
    done, impl = try_kernel("sinusoidal", x.device, unsupported_dtype(x.dtype),
                            lambda: kernels("sinusoidal").sinusoidal_1d(x, positions, seq, dim, offset, base, layout,
                                                                        x.dtype, x.device))
    if impl is None:
        return done
    if impl is fastpath:
        return fastpath.add_sinusoidal(x, positions, offset, base, layout)
    out = reference.add_sinusoidal(x.to(torch.float64), positions, offset, base, layout)
    return out.to(x.dtype).contiguous()  # for float64 x, .to() is x's own layout: the fake says contiguous


@_add_sinusoidal.register_fake
def _(x, positions, offset, base, layout):
    return x.new_empty(x.shape)


@torch.library.custom_op("fusedtx::add_sincos_2d", mutates_args=())
def _add_sincos_2d(x: Tensor, grid_h: int, grid_w: int, num_prefix_tokens: int, base: float, layout: str) -> Tensor:
    """x + the 2D encoding as a new contiguous tensor of x's shape and dtype."""
    done, impl = try_kernel("sinusoidal", x.device, _sincos_2d_unsupported(x.dtype, grid_h * grid_w),
                            lambda: kernels("sinusoidal").sincos_2d(x, grid_h, grid_w, x.shape[2], num_prefix_tokens,
                                                                    base, layout, x.dtype, x.device))
    if impl is None:
        return done
    if impl is fastpath:
        return fastpath.add_sincos_2d(x, grid_h, grid_w, num_prefix_tokens, base, layout)
    out = reference.add_sincos_2d(x.to(torch.float64), grid_h, grid_w, num_prefix_tokens, base, layout)
    return out.to(x.dtype).contiguous()  # for float64 x, .to() is x's own layout: the fake says contiguous


@_add_sincos_2d.register_fake
def _(x, grid_h, grid_w, num_prefix_tokens, base, layout):
    return x.new_empty(x.shape)


def _no_context(ctx, inputs, output):
    pass


def _add_sinusoidal_backward(ctx, dy):
    # d(x + PE)/dx is the identity; the positions and the encoding's settings get no gradient.
    return dy, None, None, None, None


def _add_sincos_2d_backward(ctx, dy):
    return dy, None, None, None, None, None


_add_sinusoidal.register_autograd(_add_sinusoidal_backward, setup_context=_no_context)
_add_sincos_2d.register_autograd(_add_sincos_2d_backward, setup_context=_no_context)


def _resolve_device(device, positions: Tensor | None) -> torch.device:
    if device is None:
        return positions.device if isinstance(positions, Tensor) else torch.get_default_device()
    return torch.device(device)


def sinusoidal_encoding(
    length: int,
    dim: int,
    *,
    positions: Tensor | None = None,
    offset: int = 0,
    base: float = 10000.0,
    layout: str = "interleaved",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """The sinusoidal position encoding ``PE(pos, 2i) = sin(pos / base^(2i/dim))``,
    ``PE(pos, 2i+1) = cos(pos / base^(2i/dim))``, generated for any positions (no table, no maximum).

    Args:
        length: number of positions.
        dim: channels, even.
        positions: optional integer tensor of position ids, shape (length,) or (batch, length); default
            ``arange(length)``. ``offset`` is added to either.
        offset: added to every position (e.g. the cache length in incremental decoding).
        base: the wavelength base (10000 in the original Transformer).
        layout: ``"interleaved"`` (sin, cos, sin, cos, ...: the formula as written) or ``"concat"``
            ([all sines | all cosines], as fairseq and many ViTs lay it out).
        dtype: float16, bfloat16, float32 (float64 takes the fast PyTorch path).
        device: default ``positions``' device, else torch's default device.

    Returns:
        (length, dim), or (batch, length, dim) for 2-D ``positions``, in ``dtype``. Angles are reduced in
        float64, so float32 results are within 1e-6 of the exact values for |position| up to 2^32 (a
        float32 ``pos * freq`` is off by up to |pos|·2⁻²⁴ before the sine: 0.06 at 2^20). Beyond
        that float64 itself loses the angle's digits; the kernel clamps positions to ±2^48.
    """
    check_count("length", length, 0)
    check_encoding_args(dim, 2, base, layout, reference.SINUSOIDAL_LAYOUTS)
    check_count("offset", offset, -(2**62))
    check_dtype("dtype", dtype)
    device = _resolve_device(device, positions)
    if positions is not None:
        positions = _check_positions(positions, length, device)
    return call(_sinusoidal_encoding, length, dim, positions, offset, float(base), layout, dtype, device)


def sincos_2d(
    grid_h: int,
    grid_w: int,
    dim: int,
    *,
    positions: Tensor | None = None,
    base: float = 10000.0,
    num_prefix_tokens: int = 0,
    layout: str = "mae",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """The 2D sin-cos position encoding of a grid_h x grid_w patch grid (ViT / MAE), for any grid size.

    Returns (num_prefix_tokens + grid_h * grid_w, dim) in ``dtype``: the prefix (class) tokens get zeros
    (MAE's ``cls_token=True``), then the patches in row-major order. With ``positions`` (integer flat patch
    indices ``row * grid_w + column`` in [0, grid_h * grid_w), shape (K,) or (B, K), e.g. the patches a
    selection kept) it returns only their encodings, (K, dim) or (B, K, dim), computed from their
    coordinates by :func:`sinusoidal_encoding` with no table of the grid (``num_prefix_tokens`` must be 0).
    ``dim`` must be divisible by 4: each quarter holds sin or cos of one axis' index times the frequencies
    ``1 / base^(i / (dim/4))``, in the order of ``layout``:

    * ``"mae"`` (default): [sin x | cos x | sin y | cos y], x the column index, y the row: equal to MAE's
      ``get_2d_sincos_pos_embed`` (whose half named ``emb_h`` is in fact built from the column index);
    * ``"mae_hw"``: [sin y | cos y | sin x | cos x]: rows first, as timm's ``build_sincos2d_pos_embed``
      with ``interleave_sin_cos=True``;
    * ``"timm"``: [sin y | sin x | cos y | cos x]: timm's ``build_sincos2d_pos_embed`` default.

    dtype: float16, bfloat16, float32 (float64 takes the fast PyTorch path); device: default torch's default.
    """
    check_count("grid_h", grid_h, 1)
    check_count("grid_w", grid_w, 1)
    check_count("num_prefix_tokens", num_prefix_tokens, 0)
    check_encoding_args(dim, 4, base, layout, reference.SINCOS_2D_LAYOUTS)
    check_dtype("dtype", dtype)
    device = _resolve_device(device, positions)
    if positions is not None:
        return _sincos_2d_at(grid_h, grid_w, dim, positions, base, num_prefix_tokens, layout, dtype, device)
    return call(_sincos_2d, grid_h, grid_w, dim, num_prefix_tokens, float(base), layout, dtype, device)


def _sincos_2d_at(grid_h, grid_w, dim, positions, base, num_prefix_tokens, layout, dtype, device) -> Tensor:
    """:func:`sincos_2d` of the patches at ``positions``. Each axis' half of the channels is the 1D encoding
    of that axis' index in ``"concat"`` layout ([sin | cos], frequencies ``base^(-2i/(dim/2))``, the same as
    the 2D formula's ``base^(-i/(dim/4))``), so two 1D encodings, arranged in ``layout``'s order, are it."""
    if num_prefix_tokens:
        raise ValueError(f"num_prefix_tokens must be 0 with positions (they index patches), got {num_prefix_tokens}")
    length = positions.shape[-1] if isinstance(positions, Tensor) and positions.dim() else 0
    positions = _check_positions(positions, length, device)
    cells = grid_h * grid_w
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= cells):
        raise ValueError(f"positions must lie in [0, {cells}) (the grid's patches), got "
                         f"[{int(positions.min())}, {int(positions.max())}]")
    rows, cols = (sinusoidal_encoding(positions.shape[-1], dim // 2, positions=p, base=base, layout="concat",
                                      dtype=dtype, device=device)
                  for p in (positions // grid_w, positions % grid_w))
    if layout == "mae":  # [sin x | cos x | sin y | cos y]
        return torch.cat([cols, rows], dim=-1)
    if layout == "mae_hw":  # [sin y | cos y | sin x | cos x]
        return torch.cat([rows, cols], dim=-1)
    q = dim // 4  # "timm": [sin y | sin x | cos y | cos x]
    return torch.cat([rows[..., :q], cols[..., :q], rows[..., q:], cols[..., q:]], dim=-1)


def add_sinusoidal(
    x: Tensor,
    *,
    offset: int = 0,
    positions: Tensor | None = None,
    base: float = 10000.0,
    layout: str = "interleaved",
) -> Tensor:
    """``x + PE`` in one pass with no table in memory: :func:`sinusoidal_encoding` of the positions
    ``offset + arange(seq)`` (or ``positions + offset``) added to x.

    Args:
        x: (batch, seq, dim), float16 / bfloat16 / float32 (float64 takes the fast PyTorch path), any strides;
            dim even.
        offset: added to every position (incremental decoding: the number of cached tokens).
        positions: optional integer position ids, (seq,) or (batch, seq), on x's device.
        base, layout: as in :func:`sinusoidal_encoding`.

    Returns:
        A new contiguous tensor of x's shape and dtype; the sum is formed in float32 and rounded once.
        The gradient flows to x unchanged (nothing else has one).
    """
    _check_add_input(x)
    _, seq, dim = x.shape
    check_encoding_args(dim, 2, base, layout, reference.SINUSOIDAL_LAYOUTS)
    check_count("offset", offset, -(2**62))
    if positions is not None:
        positions = _check_positions(positions, seq, x.device, batch=x.shape[0])
    return call(_add_sinusoidal, x, positions, offset, float(base), layout)


def add_sincos_2d(
    x: Tensor,
    grid_h: int,
    grid_w: int,
    num_prefix_tokens: int = 0,
    *,
    base: float = 10000.0,
    layout: str = "mae",
) -> Tensor:
    """``x + sincos_2d(grid_h, grid_w, dim)`` in one pass with no table in memory.

    Args:
        x: (batch, num_prefix_tokens + grid_h * grid_w, dim), float16 / bfloat16 / float32 (float64 runs
            the fast PyTorch path), any strides; dim divisible by 4. The prefix (class) tokens pass unchanged.
        grid_h, grid_w: the patch grid; patches in row-major order.
        base, layout: as in :func:`sincos_2d`.

    Returns:
        A new contiguous tensor of x's shape and dtype (sum in float32, rounded once); the gradient flows
        to x unchanged.
    """
    _check_add_input(x)
    check_count("grid_h", grid_h, 1)
    check_count("grid_w", grid_w, 1)
    check_count("num_prefix_tokens", num_prefix_tokens, 0)
    check_encoding_args(x.shape[2], 4, base, layout, reference.SINCOS_2D_LAYOUTS)
    if x.shape[1] != num_prefix_tokens + grid_h * grid_w:
        raise ValueError(
            f"x must have num_prefix_tokens + grid_h * grid_w = {num_prefix_tokens + grid_h * grid_w} tokens "
            f"(dim 1), got shape {tuple(x.shape)}"
        )
    return call(_add_sincos_2d, x, grid_h, grid_w, num_prefix_tokens, float(base), layout)
