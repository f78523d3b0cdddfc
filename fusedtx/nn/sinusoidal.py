"""Sinusoidal position-encoding modules: no parameters, no buffers, no maximum length or grid size."""

from __future__ import annotations

import numbers

from torch import Tensor, nn

from fusedtx import reference
from fusedtx.ops.common import check_count
from fusedtx.ops.sinusoidal import add_sincos_2d, add_sinusoidal, check_encoding_args


def _check_width(x: Tensor, dim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (batch, seq, {dim}), got {shape}")


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the 1D sinusoidal encoding ``PE(pos, 2i) = sin(pos / base^(2i/dim))``,
    ``PE(pos, 2i+1) = cos(...)`` to its input, then applies dropout (the original Transformer's
    ``dropout(x + PE)``).

    No parameters, no buffers (an empty ``state_dict``) and no maximum length: the encoding is computed
    on the fly, fused into the addition. ``layout`` is ``"interleaved"`` (the formula as written) or
    ``"concat"`` ([all sines | all cosines]).

    ``forward(x, offset=0, positions=None)``: x (batch, seq, dim), float16 / bfloat16 / float32, any
    strides. Positions are ``offset + arange(seq)`` (``offset`` = the number of tokens already decoded,
    for incremental decoding) or ``positions + offset`` for integer ``positions`` (seq,) or (batch, seq).
    Returns a new tensor of x's shape and dtype.
    """

    def __init__(self, dim: int, base: float = 10000.0, layout: str = "interleaved", dropout: float = 0.0) -> None:
        super().__init__()
        check_encoding_args(dim, 2, base, layout, reference.SINUSOIDAL_LAYOUTS)
        self.dim, self.base, self.layout = int(dim), float(base), layout
        self.dropout = nn.Dropout(dropout)  # validates the probability

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        _check_width(x, self.dim)
        return self.dropout(add_sinusoidal(x, offset=offset, positions=positions, base=self.base,
                                               layout=self.layout))

    def extra_repr(self) -> str:
        return f"{self.dim}, base={self.base}, layout={self.layout!r}"


class SinCos2dPositionalEncoding(nn.Module):
    """Adds the 2D sin-cos patch-grid encoding of ViT / MAE to its input, then applies dropout.

    The grid size is given at call time, so one module serves 14x14 (196 patches) and 64x64 (4096)
    alike: no parameters, no buffers (an empty ``state_dict``), no table to interpolate.
    ``num_prefix_tokens`` leading tokens (class / register tokens) pass unchanged (MAE gives its class
    token a zero encoding). ``dim`` must be divisible by 4; ``layout`` is ``"mae"`` (MAE's
    ``get_2d_sincos_pos_embed``: [sin x | cos x | sin y | cos y], x the column), ``"mae_hw"`` (rows
    first) or ``"timm"`` ([sin y | sin x | cos y | cos x]); see :func:`fusedtx.sincos_2d`.

    ``forward(x, grid_size)``: x (batch, num_prefix_tokens + h * w, dim), float16 / bfloat16 / float32,
    any strides; ``grid_size`` an int (square grid) or ``(h, w)``; patches in row-major order. Returns a
    new tensor of x's shape and dtype.
    """

    def __init__(self, dim: int, base: float = 10000.0, layout: str = "mae", num_prefix_tokens: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        check_encoding_args(dim, 4, base, layout, reference.SINCOS_2D_LAYOUTS)
        check_count("num_prefix_tokens", num_prefix_tokens, 0)
        self.dim, self.base, self.layout = int(dim), float(base), layout
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.dropout = nn.Dropout(dropout)  # validates the probability

    def forward(self, x: Tensor, grid_size: int | tuple[int, int]) -> Tensor:
        _check_width(x, self.dim)
        if isinstance(grid_size, numbers.Integral):
            grid_h = grid_w = grid_size
        elif isinstance(grid_size, (tuple, list)) and len(grid_size) == 2:
            grid_h, grid_w = grid_size
        else:
            raise ValueError(f"grid_size must be an int or a (height, width) pair, got {grid_size!r}")
        return self.dropout(add_sincos_2d(x, grid_h, grid_w, self.num_prefix_tokens, base=self.base,
                                              layout=self.layout))

    def extra_repr(self) -> str:
        return (f"{self.dim}, base={self.base}, layout={self.layout!r}, "
                f"num_prefix_tokens={self.num_prefix_tokens}")
