"""Drop-in ``torch.nn`` modules backed by fusedtx kernels, one file per family."""

from fusedtx.nn.attention import Attention, MultiheadAttention
from fusedtx.nn.layer_norm_gelu import LayerNorm, LayerNormGELU

__all__ = [
    "Attention",
    "LayerNorm",
    "LayerNormGELU",
    "MultiheadAttention",
]
