"""Drop-in ``torch.nn`` modules backed by fusedtx kernels, one file per family."""

from fusedtx.nn.attention import Attention, MultiheadAttention
from fusedtx.nn.layer_norm_gelu import LayerNorm, LayerNormGELU
from fusedtx.nn.sinusoidal import SinCos2dPositionalEncoding, SinusoidalPositionalEncoding
from fusedtx.nn.window_attention import ShiftedWindowAttention, SwinBlockAttention, WindowAttention

__all__ = [
    "Attention",
    "LayerNorm",
    "LayerNormGELU",
    "MultiheadAttention",
    "SinCos2dPositionalEncoding",
    "ShiftedWindowAttention",
    "SinusoidalPositionalEncoding",
    "SwinBlockAttention",
    "WindowAttention",
]
