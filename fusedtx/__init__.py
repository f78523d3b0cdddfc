"""fusedtx: fused Triton kernels for transformers and vision transformers.

Functional ops live at the top level (``fusedtx.layer_norm_gelu``, ...), drop-in modules in
``fusedtx.nn``, the PyTorch references in ``fusedtx.reference``. ``fusedtx.use_backend`` and the
``FUSEDTX_BACKEND`` variable choose between the Triton kernels and the references.
"""

from fusedtx import nn, reference
from fusedtx._backend import use_backend
from fusedtx.ops import (
    add_sincos_2d,
    add_sinusoidal,
    attention,
    layer_norm,
    layer_norm_gelu,
    sincos_2d,
    sinusoidal_encoding,
    window_attention,
)

__version__ = "0.1.0"

__all__ = [
    "add_sincos_2d",
    "add_sinusoidal",
    "attention",
    "layer_norm",
    "layer_norm_gelu",
    "nn",
    "reference",
    "sincos_2d",
    "sinusoidal_encoding",
    "use_backend",
    "window_attention",
    "__version__",
]
