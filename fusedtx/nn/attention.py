"""Drop-in attention modules backed by the fused ``attention`` op.

* :class:`MultiheadAttention`: ``torch.nn.MultiheadAttention`` (it subclasses it, so constructor,
  parameters, initialization, ``state_dict`` and ``isinstance`` checks are the stock ones).
* :class:`Attention`: timm's ``Attention`` (``timm.layers.Attention``, the ViT block's attention):
  same constructor, submodules and ``state_dict``; timm itself is not needed.

* :func:`sdpa` and :class:`SDPARoute`: ``F.scaled_dot_product_attention`` computed by the fused op,
  and the scoped mode that sends a module's SDPA calls to it (how :func:`fusedtx.swap` covers modules
  that call SDPA themselves: BEiT, EVA, SAM, MaxViT, PVT v2, Twins, Hiera, attention pools, ...).
* :func:`hf_attention_forward`: the fused op behind Hugging Face's ``AttentionInterface`` ("fusedtx").

What the kernel does not compute (attention weights, dropout on the attention probabilities) takes a
PyTorch path and says so once (``fusedtx.use_backend("triton")`` turns that into an error).
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fusedtx.ops.attention import attention
from fusedtx.ops.common import fallback

# transformers < 5: these ViT modules pass their head_mask where the interface takes the attention mask.
_HF_HEAD_MASK_CLASSES = ("ViTSelfAttention", "ViTSdpaSelfAttention")
_WEIGHTS = "does not return attention weights; pass need_weights=False to use it"


def check_like(module: nn.Module, name: str, kind: str, attrs: tuple[str, ...]) -> None:
    """TypeError naming ``name`` unless ``module`` has every attribute in ``attrs`` (it is a ``kind``)."""
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise TypeError(f"{name} must be a {kind}; {type(module).__name__} lacks {missing}")


def _additive(mask: Tensor, masked_value: bool, dtype: torch.dtype) -> Tensor:
    """A float mask as is; a bool mask as 0 / -inf of its own shape (-inf where it equals ``masked_value``)."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == masked_value, float("-inf"))


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` running the fused flash-attention kernel.

    Same constructor, parameters (``in_proj_weight`` / ``q_proj_weight``, ``k_proj_weight``,
    ``v_proj_weight`` when kdim/vdim differ, ``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``),
    ``state_dict`` and ``forward`` signature and semantics: inputs (L, N, E), or (N, L, E) with
    ``batch_first``, or unbatched (L, E); ``key_padding_mask`` (N, S) bool (True = ignore) or float
    (added); ``attn_mask`` (L, S) or (N·num_heads, L, S), bool (True = not allowed) or float (added);
    ``is_causal`` applies the causal mask (as a hint for ``attn_mask``, as torch treats it; here an
    ``attn_mask`` is not required with it). Returns ``(attn_output, None)``.

    ``need_weights=True`` (torch's default) is computed by ``torch.nn.MultiheadAttention``'s own forward,
    with a one-time warning: pass ``need_weights=False`` for the kernel. Dropout > 0 in training takes
    the op's PyTorch path (see :func:`fusedtx.attention`).
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        reason = None
        if need_weights and not self.__dict__.get("weights_unused", False):
            reason = _WEIGHTS
        elif query.is_nested or key.is_nested or value.is_nested:
            reason = "does not take nested tensors"
        if fallback("attention", query.device, reason):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self_attention:
            key = value = query
        # As torch: is_causal is a hint that attn_mask is causal, taken as such unless a padding mask
        # comes too (then attn_mask is applied instead). Here attn_mask may also be left out.
        causal = is_causal and (key_padding_mask is None or attn_mask is None)
        out = self._attend(query, key, value, key_padding_mask, None if causal else attn_mask, causal)
        if batched and not self.batch_first:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(0)), None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """q, k, v projections (N, L|S, E) of batch-first inputs; one matmul for self-attention."""
        if self._qkv_same_embed_dim and query is key and key is value:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True))

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                attn_mask: Tensor | None, causal: bool) -> Tensor:
        """The block on batch-first (N, L, E) inputs: projections, attention, output projection."""
        n, length = query.shape[:2]
        h, d = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        extra = []  # key/value rows appended by add_bias_kv and add_zero_attn
        if self.bias_k is not None:
            extra.append((self.bias_k.expand(n, 1, -1), self.bias_v.expand(n, 1, -1)))
        if self.add_zero_attn:
            extra.append((k.new_zeros(n, 1, self.embed_dim), v.new_zeros(n, 1, self.embed_dim)))
        for k_row, v_row in extra:
            k, v = torch.cat([k, k_row], dim=1), torch.cat([v, v_row], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        s = k.shape[1]
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in (q, k, v))

        bias = None
        if attn_mask is not None:
            bias = _additive(attn_mask, True, q.dtype)
            bias = bias.reshape(n, h, length, s) if bias.dim() == 3 else bias
        padding = None
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
            padding = key_padding_mask
        elif key_padding_mask is not None:
            kpm = key_padding_mask.view(n, 1, 1, s)
            bias = kpm if bias is None else bias + kpm
        out = attention(q, k, v, bias=bias, key_padding_mask=padding, causal=causal,
                        dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, weights_unused: bool = False) -> MultiheadAttention:
        """A fused module sharing ``mha``'s parameters (the same ``nn.Parameter`` objects and the same
        ``out_proj`` module) and taking its training mode.

        ``weights_unused=True`` is for a caller known to discard the weights (it calls the module with
        torch's default ``need_weights=True`` and keeps only ``[0]``, as SigLIP's attention-pool head
        does): ``need_weights`` is then taken as False, and the weights come back as None."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        new = cls(
            mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device="meta",
        )
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v", "out_proj"):
            setattr(new, name, getattr(mha, name))
        new.weights_unused = bool(weights_unused)
        return new.train(mha.training)


class Attention(nn.Module):
    """Drop-in for timm's ``Attention`` (``timm.layers.Attention``, used by ViT/DeiT/BEiT-style blocks).

    Constructor, attributes (``num_heads``, ``head_dim``, ``attn_dim``, ``scale``) and submodules
    (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``, ``proj_drop``) are
    timm 1.0's, so a timm ``state_dict`` loads as is. ``forward(x, attn_mask=None, is_causal=False)``:
    x (B, N, dim) -> (B, N, dim_out); ``attn_mask`` broadcastable to (B, num_heads, N, N), bool
    (True = attend, SDPA's convention) or float (added). Given together, ``attn_mask`` and
    ``is_causal`` both apply.

    Dropout on the attention probabilities (training with ``attn_drop`` > 0) takes the op's PyTorch path
    and warns once (see :func:`fusedtx.attention`).
    """

    fused_attn: bool = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be provided if qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = _additive(attn_mask, False, q.dtype) if attn_mask is not None else None
        x = attention(q, k, v, bias=bias, causal=is_causal, scale=self.scale,
                      dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    @classmethod
    def from_module(cls, attn: nn.Module) -> Attention:
        """A fused module sharing the submodules (hence the parameters) of a timm ``Attention`` and
        taking its training mode. Older timm versions without ``norm``/``gate``/``attn_dim`` work too."""
        check_like(attn, "attn", "timm Attention", ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop",
                                                     "num_heads"))
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = attn.num_heads
        new.head_dim = getattr(attn, "head_dim", attn.qkv.out_features // 3 // attn.num_heads)
        new.attn_dim = new.num_heads * new.head_dim
        new.scale = getattr(attn, "scale", new.head_dim**-0.5)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop"):
            setattr(new, name, getattr(attn, name))
        new.norm = getattr(attn, "norm", None) or nn.Identity()
        new.gate = getattr(attn, "gate", None)
        new.proj, new.proj_drop = attn.proj, attn.proj_drop
        return new.train(attn.training)


def hf_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[Tensor, None]:
    """The fused op behind Hugging Face transformers' attention interface (``AttentionInterface``).

    :func:`fusedtx.swap` registers it as ``"fusedtx"`` and points the swapped modules' (copied) config at
    it. ``query`` (B, H, Nq, D), ``key`` and ``value`` (B, H, Nk, D); ``attention_mask`` additive float
    broadcastable to (B, H, Nq, Nk) (ViT passes none, Swin its relative position bias plus shift mask), or
    bool with True = attend. Returns ``(output (B, Nq, H, D), None)``, as transformers' functions do when
    no weights are wanted. Dropout in training takes the PyTorch path with a one-time warning, and so does
    the ``head_mask`` that transformers < 5's ViT passes as ``attention_mask`` (it multiplies the
    probabilities: the module's own ``eager_attention_forward`` computes it).
    """
    if attention_mask is not None and type(module).__name__ in _HF_HEAD_MASK_CLASSES:
        fallback("attention", query.device,
                 "does not apply a head_mask (a multiplicative mask on the attention probabilities)")
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, _ = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return out, None
    # As transformers' own sdpa function: causal only without a mask and for more than one query.
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    if key.shape[1] != query.shape[1]:  # grouped K/V heads (num_key_value_groups)
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-1] > key.shape[2]:
        attention_mask = attention_mask[..., : key.shape[2]]  # transformers' masks may be longer than the keys
    bias = _additive(attention_mask, False, query.dtype) if attention_mask is not None else None
    out = attention(query, key, value, bias=bias, causal=is_causal, scale=scaling,
                    dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2), None


def _stock_sdpa_reason(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                       enable_gqa: bool) -> str | None:
    """Why a ``F.scaled_dot_product_attention`` call is not one :func:`fusedtx.attention` expresses, or None."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return "inputs are not tensors"
    if q.is_nested or k.is_nested or v.is_nested:
        return "nested tensors"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return "inputs are not (B, H, N, D) or (B, N, D)"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return "mixed or non-float dtypes"
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1] or v.shape[:-1] != k.shape[:-1]:
        return "value head dim differs from the query's"
    if k.shape[0] != q.shape[0]:
        return "batch sizes differ"
    if q.dim() == 4 and k.shape[1] != q.shape[1] and not (enable_gqa and q.shape[1] % k.shape[1] == 0):
        return "head counts differ"
    if attn_mask is not None:
        if is_causal:
            return "is_causal with an attn_mask"  # stock SDPA raises; let it
        if not isinstance(attn_mask, Tensor) or attn_mask.dim() > q.dim():
            return "attn_mask of another form"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return "an integer attn_mask"
        full = (*q.shape[:-1], k.shape[-2])
        if any(n not in (1, m) for n, m in zip(attn_mask.shape, full[len(full) - attn_mask.dim():], strict=True)):
            return "attn_mask does not broadcast"
    return None


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention``'s signature and semantics, computed by :func:`fusedtx.attention`.

    A float ``attn_mask`` is the bias (its gradient flows, deterministically); a bool one (True = attend)
    becomes the key padding mask when it only masks keys per batch element, else a 0 / -inf bias;
    ``is_causal`` and ``scale`` are the kernel's; ``enable_gqa`` repeats the grouped K/V heads; dropout
    (``dropout_p`` > 0) takes the op's fast PyTorch path. A call the op cannot express (nested tensors,
    a value head dim unlike the query's, ``is_causal`` with a mask, other ranks) runs stock SDPA.
    """
    if _stock_sdpa_reason(query, key, value, attn_mask, is_causal, enable_gqa) is not None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    unbatched = query.dim() == 3  # (B, N, D): one head
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    b, h, nq, d = query.shape
    hk, nk = key.shape[1], key.shape[2]
    if hk != h:  # grouped K/V heads: head i reads K/V head i // (h // hk), as SDPA's enable_gqa
        key, value = (t.repeat_interleave(h // hk, dim=1) for t in (key, value))
    bias = padding = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        mask = attn_mask[(None,) * (4 - attn_mask.dim())]
        if mask.shape[1] == 1 and mask.shape[2] == 1:  # masks keys only: the kernel's key padding mask
            padding = ~mask[:, 0, 0, :].expand(b, nk)
        else:
            bias = _additive(attn_mask, False, query.dtype)
    elif attn_mask is not None:
        bias = attn_mask
    out = attention(query, key, value, bias=bias, key_padding_mask=padding, causal=bool(is_causal), scale=scale,
                    dropout_p=dropout_p)
    return out.squeeze(1) if unbatched else out


class SDPARoute(TorchFunctionMode):
    """A scoped mode: inside it, ``F.scaled_dot_product_attention`` calls run :func:`sdpa` (the fused op);
    every other function runs as it is. :func:`fusedtx.swap` enters it in the ``forward`` it installs on
    modules that call SDPA themselves, so nothing outside those modules is touched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa(*args, **kwargs)
        return func(*args, **kwargs)


@functools.cache
def register_hf_attention() -> None:
    """Register :func:`hf_attention_forward` as ``"fusedtx"`` in transformers' ``AttentionInterface`` (and
    SDPA's mask format under that name in its ``AttentionMaskInterface``, where there is one), so that
    ``from_pretrained(..., attn_implementation="fusedtx")`` and ``model.set_attn_implementation("fusedtx")``
    select it. ``import fusedtx`` does it when transformers is already imported; :func:`fusedtx.swap` does
    it before it points a module at it."""
    import transformers

    transformers.AttentionInterface.register("fusedtx", hf_attention_forward)
    masks = getattr(transformers, "AttentionMaskInterface", None)
    if masks is not None:
        from transformers.masking_utils import sdpa_mask

        masks.register("fusedtx", sdpa_mask)


class InstalledForward:
    """A ``forward`` installed on one module instance: calls ``fn(module, *args, **kwargs)``. Unlike a bound
    method of a module-level function, it pickles (``torch.save(model)``), and a deep copy of the module
    gets one bound to the copy."""

    def __init__(self, module: nn.Module, fn) -> None:
        self.module, self.fn = module, fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)
