"""Drop-in LayerNorm modules backed by the fused ``layer_norm_gelu`` op."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusedtx import reference
from fusedtx.ops.layer_norm_gelu import layer_norm_gelu

_GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


class LayerNorm(nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm`` running the fused ``layer_norm_gelu`` op (no activation).

    It subclasses ``torch.nn.LayerNorm``: constructor, attributes (``normalized_shape``, ``eps``,
    ``elementwise_affine``, ``weight``, ``bias``), initialization, ``state_dict`` and ``isinstance``
    checks are the stock ones. Input (..., *normalized_shape), output of the same shape and dtype
    (float32 under CUDA autocast, as ``nn.LayerNorm``). ``forward(x, residual=None)`` also takes an
    optional residual of x's shape, returning ``(LayerNorm(x + residual), x + residual)``.
    """

    activation = "none"

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != tuple(self.normalized_shape):
            raise ValueError(
                f"x must end in normalized_shape {tuple(self.normalized_shape)}, got shape {tuple(x.shape)}"
            )
        if k == 1:
            return layer_norm_gelu(x, self.weight, self.bias, self.eps, self.activation, residual)
        # Several normalized dims: normalize their flattening, as nn.LayerNorm does.
        flat = (*x.shape[:-k], -1)
        out = layer_norm_gelu(
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

    @classmethod
    def from_module(cls, norm: nn.LayerNorm) -> LayerNorm:
        """A fused ``LayerNorm`` sharing ``norm``'s parameters (the same ``nn.Parameter`` objects, so
        optimizers and tied weights keep working) and taking its training mode."""
        return cls._like(norm)

    @classmethod
    def _like(cls, norm: nn.LayerNorm, **kwargs):
        """A new module of this class with ``norm``'s settings, parameters (the same objects) and mode."""
        _check_norm(norm)
        new = cls(norm.normalized_shape, norm.eps, norm.elementwise_affine, norm.bias is not None, device="meta",
                  **kwargs)
        new.weight, new.bias = norm.weight, norm.bias
        return new.train(norm.training)


class LayerNormGELU(LayerNorm):
    """``activation(LayerNorm(x))`` in one kernel: a drop-in for ``nn.Sequential(nn.LayerNorm, nn.GELU)``.

    Constructor, attributes and ``state_dict`` are those of ``torch.nn.LayerNorm`` (it is one, through
    :class:`LayerNorm`), plus the keyword ``activation`` (``"gelu"`` exact, ``"gelu_tanh"``, ``"relu"``
    or ``"none"``). Shapes: input (..., *normalized_shape), output the same shape and dtype (float32
    under CUDA autocast, as ``nn.LayerNorm``). ``forward(x, residual=None)``: with a residual of x's
    shape it returns ``(act(LayerNorm(x + residual)), x + residual)``.
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
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.activation = activation

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, act: nn.Module | None = None) -> LayerNormGELU:
        """A fused module computing ``act(norm(x))`` for an existing ``nn.LayerNorm`` and activation
        (``nn.GELU`` either approximation, ``nn.ReLU``, timm's ``GELU`` / ``GELUTanh``, or ``None`` /
        ``nn.Identity`` for none).

        The new module shares ``norm``'s parameters (the same ``nn.Parameter`` objects, so optimizers
        and tied weights keep working) and takes its training mode.
        """
        return cls._like(norm, activation=_activation_name(act))


def _check_norm(norm: nn.Module) -> None:
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"norm must be a torch.nn.LayerNorm, got {type(norm).__name__}")


# timm's own activation modules (what its act_layer="gelu" builds, e.g. in Swin V2), by qualified class name:
# fusedtx does not import timm.
_TIMM_ACTIVATIONS = {"timm.layers.activations.GELU": "gelu", "timm.layers.activations.GELUTanh": "gelu_tanh"}


def activation_name(act: nn.Module | None) -> str | None:
    """The ``reference.ACTIVATIONS`` name of what the module ``act`` computes ("none" for None and
    ``nn.Identity``), or None when fusedtx has no such activation. Exact classes only (``nn.GELU`` either
    approximation, ``nn.ReLU``, timm's ``GELU`` and ``GELUTanh``): a subclass may compute something else."""
    kind = type(act)
    if act is None or kind is nn.Identity:
        return "none"
    if kind is nn.GELU:
        return _GELU_APPROXIMATE[act.approximate]
    if kind is nn.ReLU:
        return "relu"
    return _TIMM_ACTIVATIONS.get(f"{kind.__module__}.{kind.__qualname__}")


def _activation_name(act: nn.Module | None) -> str:
    name = activation_name(act)
    if name is None:
        raise TypeError("act must be nn.GELU, nn.ReLU, timm's GELU or GELUTanh, nn.Identity or None, got "
                        f"{type(act).__name__}")
    return name
