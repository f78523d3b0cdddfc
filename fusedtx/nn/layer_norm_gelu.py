"""Drop-in LayerNorm modules backed by the fused ``layer_norm_gelu`` op."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from fusedtx import ops, reference

_GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


class LayerNormGELU(nn.Module):
    """``activation(LayerNorm(x))`` in one kernel: a drop-in for ``nn.Sequential(nn.LayerNorm, nn.GELU)``.

    Constructor, attributes (``normalized_shape``, ``eps``, ``elementwise_affine``, ``weight``,
    ``bias``) and ``state_dict`` are those of ``torch.nn.LayerNorm``, plus ``activation``
    (``"gelu"`` exact, ``"gelu_tanh"``, ``"relu"`` or ``"none"``).

    Shapes: input (..., *normalized_shape), output the same shape and dtype (float32 under CUDA
    autocast, as ``nn.LayerNorm``). ``forward(x, residual=None)``: with a residual of x's shape it
    returns ``(act(LayerNorm(x + residual)), x + residual)``.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(d) for d in normalized_shape)
        if not self.normalized_shape or min(self.normalized_shape) < 1:
            raise ValueError(f"normalized_shape must be positive sizes, got {normalized_shape!r}")
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ValueError(
                f"x must end in normalized_shape {self.normalized_shape}, got shape {tuple(x.shape)}"
            )
        if k == 1:
            return ops.layer_norm_gelu(x, self.weight, self.bias, self.eps, self.activation, residual)
        # Several normalized dims: normalize their flattening, as nn.LayerNorm does.
        flat = (*x.shape[:-k], -1)
        out = ops.layer_norm_gelu(
            x.reshape(flat),
            self.weight.reshape(-1) if self.weight is not None else None,
            self.bias.reshape(-1) if self.bias is not None else None,
            self.eps,
            self.activation,
            residual.reshape(flat) if residual is not None else None,
        )
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, act: nn.Module | None = None) -> LayerNormGELU:
        """A fused module computing ``act(norm(x))`` for an existing ``nn.LayerNorm`` and activation
        (``nn.GELU`` either approximation, ``nn.ReLU``, or ``None`` / ``nn.Identity`` for none).

        The new module shares ``norm``'s parameters (the same ``nn.Parameter`` objects, so optimizers
        and tied weights keep working) and takes its training mode.
        """
        _check_norm(norm)
        return cls(
            norm.normalized_shape, norm.eps, norm.elementwise_affine, norm.bias is not None,
            device="meta", activation=_activation_name(act),
        )._adopt(norm)

    def _adopt(self, norm: nn.LayerNorm):
        """Take ``norm``'s parameters (the same objects) and training mode."""
        self.weight = norm.weight
        self.bias = norm.bias
        return self.train(norm.training)


class LayerNorm(LayerNormGELU):
    """Drop-in for ``torch.nn.LayerNorm``: same constructor, attributes and ``state_dict``.

    Input (..., *normalized_shape); output of the same shape and dtype (float32 under CUDA autocast,
    as ``nn.LayerNorm``). ``forward(x, residual=None)`` also takes an optional residual, returning
    ``(LayerNorm(x + residual), x + residual)``.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, activation="none")

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )

    @classmethod
    def from_module(cls, norm: nn.LayerNorm) -> LayerNorm:
        """A fused ``LayerNorm`` sharing ``norm``'s parameters (the same ``nn.Parameter`` objects)
        and training mode."""
        _check_norm(norm)
        return cls(
            norm.normalized_shape, norm.eps, norm.elementwise_affine, norm.bias is not None, device="meta"
        )._adopt(norm)


def _check_norm(norm: nn.Module) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"norm must be a torch.nn.LayerNorm, got {type(norm).__name__}")


def _activation_name(act: nn.Module | None) -> str:
    if act is None or isinstance(act, nn.Identity):
        return "none"
    if isinstance(act, nn.GELU):
        return _GELU_APPROXIMATE[act.approximate]
    if isinstance(act, nn.ReLU):
        return "relu"
    raise TypeError(f"act must be nn.GELU, nn.ReLU, nn.Identity or None, got {type(act).__name__}")
