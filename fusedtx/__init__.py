"""fusedtx: fused Triton kernels for transformers and vision transformers.

Functional ops live at the top level (``fusedtx.attention``, ``fusedtx.layer_norm_gelu``, ...), drop-in
modules in ``fusedtx.nn``, model surgery in ``fusedtx.swap`` / ``fusedtx.unswap``, the PyTorch
references in ``fusedtx.reference``. ``fusedtx.use_backend`` and the ``FUSEDTX_BACKEND`` variable choose
the backend (see ``fusedtx._backend``).
"""

import sys as _sys

from fusedtx import highres, nn, reference
from fusedtx._backend import use_backend
from fusedtx._checkout import import_installed_kernels as _import_installed_kernels
from fusedtx.ops.attention import attention
from fusedtx.ops.highres import merge_tokens, select_patches
from fusedtx.ops.layer_norm_gelu import layer_norm, layer_norm_gelu
from fusedtx.ops.sinusoidal import add_sincos_2d, add_sinusoidal, sincos_2d, sinusoidal_encoding
from fusedtx.ops.window_attention import window_attention
from fusedtx.surgery import SwapReport, swap, unswap

_import_installed_kernels()  # a checkout's kernels/ must not shadow the kernels that transformers imports
if "transformers" in _sys.modules:  # attn_implementation="fusedtx" works from here on (else: at swap)
    nn.attention.register_hf_attention()

__version__ = "0.1.0"

__all__ = [
    "SwapReport",
    "add_sincos_2d",
    "add_sinusoidal",
    "attention",
    "highres",
    "layer_norm",
    "layer_norm_gelu",
    "merge_tokens",
    "nn",
    "reference",
    "select_patches",
    "sincos_2d",
    "sinusoidal_encoding",
    "swap",
    "unswap",
    "use_backend",
    "window_attention",
    "__version__",
]
