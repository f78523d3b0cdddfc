"""Drop-in Swin window attention modules backed by the fused ``window_attention`` op.

* :class:`ShiftedWindowAttention`: torchvision's ``ShiftedWindowAttention`` (same constructor,
  ``state_dict``, outputs): a (B, H, W, dim) map in, the map out.
* :class:`SwinBlockAttention`: timm's ``SwinTransformerBlock`` attention path (its ``_attn``: shift,
  pad, partition, ``WindowAttention``, reverse, crop, un-shift) as one module, with timm
  ``WindowAttention``'s parameters and ``state_dict``; :meth:`SwinBlockAttention.from_module` can also
  install it into a block in place of ``_attn``.
* :class:`WindowAttention`: timm's ``WindowAttention`` for callers that keep the partition themselves:
  (windows, N, dim) in, with timm's optional (nW, N, N) mask, bias and mask fused into the kernel.

* :func:`install_swin_v2`: Swin V2 window attention (timm ``swin_transformer_v2.WindowAttention``,
  torchvision ``ShiftedWindowAttentionV2``, Hugging Face ``Swinv2SelfAttention``) as an instance
  ``forward`` on the stock module: cosine attention (q and k L2-normalized, the per-head
  ``logit_scale`` clamped and exponentiated as stock, folded into q), the continuous position bias
  from the module's own MLP once per call, gathered, ``16·sigmoid``, plus the shift mask, all through
  the fused ``attention`` op's bias (with its gradient). Not yet in the fused window kernel: it runs
  the general attention op over the partitioned windows.

Neither timm nor torchvision is needed. The drop-in classes are Swin V1: ``from_module`` refuses Swin V2
modules with a message.
Dropout on the attention probabilities (training with a nonzero attention dropout) takes the op's
PyTorch path and warns once (see :func:`fusedtx.window_attention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedtx import reference
from fusedtx.nn.attention import InstalledForward, check_like
from fusedtx.ops.attention import attention
from fusedtx.ops.window_attention import window_attention, window_pair

_V2 = ("is Swin V2 (cosine attention, continuous position bias), which the fused window attention does not "
       "compute; leave it as it is")


def _window(v) -> tuple[int, int]:
    """``window_size`` as a pair of ints >= 1 (TypeError/ValueError naming it otherwise)."""
    return window_pair("window_size", v, 1)


def _shift(v) -> tuple[int, int]:
    """``shift_size`` as a pair of ints >= 0 (TypeError/ValueError naming it otherwise)."""
    return window_pair("shift_size", v, 0)


def _dropout_p(attn: nn.Module) -> float:
    """The attention dropout a timm ``WindowAttention``-like module applies now."""
    return attn.attn_drop.p if attn.attn_drop.training else 0.0


def _refuse_v2(module: nn.Module, name: str) -> None:
    if hasattr(module, "logit_scale") or hasattr(module, "cpb_mlp"):
        raise TypeError(f"{name} ({type(module).__name__}) {_V2}")


class ShiftedWindowAttention(nn.Module):
    """Drop-in for torchvision's ``ShiftedWindowAttention`` (Swin V1).

    Same constructor, attributes (``window_size``, ``shift_size``, ``num_heads``, ``attention_dropout``,
    ``dropout``), submodules (``qkv``, ``proj``), ``relative_position_bias_table`` parameter and
    ``relative_position_index`` buffer, hence ``state_dict``. ``forward(x)``: x (B, H, W, dim) ->
    (B, H, W, dim), with torchvision's order (pad, then shift; shift dropped along an axis whose padded
    size is not larger than the window).
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError("window_size and shift_size must be of length 2")
        self.window_size = window_size
        self.shift_size = shift_size
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Unused by the kernel (it computes the index); kept so that state_dicts match torchvision's.
        self.register_buffer("relative_position_index", reference.relative_position_index((wh, ww)).flatten())

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)
        dropout = self.attention_dropout if self.training else 0.0
        out = window_attention(qkv, window_size=tuple(self.window_size), shift_size=tuple(self.shift_size),
                               rel_pos_bias_table=self.relative_position_bias_table, num_heads=self.num_heads,
                               qkv_bias=self.qkv.bias, order="torchvision", dropout_p=dropout)
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)

    @classmethod
    def from_module(cls, attn: nn.Module) -> ShiftedWindowAttention:
        """A fused module sharing the ``qkv`` and ``proj`` Linears and the bias table (the same objects) of
        a torchvision ``ShiftedWindowAttention``, and taking its training mode. Swin V2's
        ``ShiftedWindowAttentionV2`` raises TypeError."""
        _refuse_v2(attn, "attn")
        check_like(attn, "attn", "torchvision ShiftedWindowAttention",
                    ("qkv", "proj", "relative_position_bias_table", "window_size", "shift_size", "num_heads"))
        with torch.device("meta"):
            new = cls(attn.qkv.in_features, list(attn.window_size), list(attn.shift_size), attn.num_heads,
                      attention_dropout=attn.attention_dropout, dropout=attn.dropout)
        new.qkv, new.proj = attn.qkv, attn.proj
        new.relative_position_bias_table = attn.relative_position_bias_table
        new.relative_position_index = attn.relative_position_index
        return new.train(attn.training)


class WindowAttention(nn.Module):
    """Drop-in for timm's ``WindowAttention`` (Swin V1), called on windows partitioned by the caller.

    Same constructor, attributes (``dim``, ``window_size``, ``window_area``, ``num_heads``, ``scale``),
    submodules (``qkv``, ``attn_drop``, ``proj``, ``proj_drop``) and ``relative_position_bias_table``,
    hence ``state_dict``. ``forward(x, mask=None)``: x (num_windows·B, N, dim) with N = wh·ww tokens of
    each window in row-major order -> (num_windows·B, N, dim); ``mask`` (num_windows, N, N) additive
    (0/-100 or 0/-inf) or None, window b taking ``mask[b % num_windows]`` as in timm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = _window(window_size)
        wh, ww = self.window_size
        self.window_area = wh * ww
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim**-0.5
        table = torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads, **dd)
        self.relative_position_bias_table = nn.Parameter(table)
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.window_area:
            raise ValueError(f"x must be (num_windows·B, N = {self.window_area}, dim), "
                             f"got shape {tuple(x.shape)}")
        wins, n, _ = x.shape
        qkv = self.qkv(x).view(wins, *self.window_size, -1)  # each window a one-window map, nothing to pad
        out = window_attention(qkv, window_size=self.window_size, shift_size=0,
                               rel_pos_bias_table=self.relative_position_bias_table, num_heads=self.num_heads,
                               scale=self.scale, mask=mask, dropout_p=_dropout_p(self))
        return self.proj_drop(self.proj(out.view(wins, n, -1)))

    def set_window_size(self, window_size: int | tuple[int, int]) -> None:
        """timm's ``WindowAttention.set_window_size``: take a new window size and resize the bias table to
        it with timm's own ``resize_rel_pos_bias_table`` (so it needs timm), as a new Parameter keeping
        ``requires_grad``. A timm block's ``set_input_size`` calls it."""
        window_size = _window(window_size)
        if window_size == self.window_size:
            return
        from timm.layers import resize_rel_pos_bias_table

        old, table = self.window_size, self.relative_position_bias_table
        wh, ww = self.window_size = window_size
        self.window_area = wh * ww
        with torch.no_grad():
            resized = resize_rel_pos_bias_table(table, new_window_size=window_size,
                                                new_bias_shape=((2 * wh - 1) * (2 * ww - 1), self.num_heads),
                                                old_window_size=old)
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)

    @classmethod
    def from_module(cls, attn: nn.Module) -> WindowAttention:
        """A fused module sharing the submodules and bias table (the same objects) of a timm
        ``WindowAttention`` and taking its training mode. Swin V2's ``WindowAttention`` raises TypeError."""
        return cls._adopt(attn, "attn")

    @classmethod
    def _adopt(cls, attn: nn.Module, name: str):
        """A new module of this class on ``attn``'s submodules and table, after checking what ``attn`` is."""
        _refuse_v2(attn, name)
        check_like(attn, name, "timm WindowAttention",
                    ("qkv", "proj", "attn_drop", "proj_drop", "relative_position_bias_table", "window_size",
                     "num_heads", "scale"))
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim = attn.qkv.in_features
        new.window_size = _window(attn.window_size)
        new.window_area = new.window_size[0] * new.window_size[1]
        new.num_heads, new.scale = attn.num_heads, attn.scale
        new.relative_position_bias_table = attn.relative_position_bias_table
        new.qkv, new.attn_drop, new.proj, new.proj_drop = attn.qkv, attn.attn_drop, attn.proj, attn.proj_drop
        return new.train(attn.training)


class SwinBlockAttention(WindowAttention):
    """timm ``SwinTransformerBlock``'s attention path (``_attn``) fused: cyclic shift, padding, window
    partition, window attention, window reverse, crop and reverse shift in one kernel between the qkv and
    proj Linears.

    Constructor as timm's ``WindowAttention`` plus the keyword ``shift_size`` (int or (sh, sw));
    parameters, submodules and ``state_dict`` are ``WindowAttention``'s (a block's ``attn.state_dict()``
    loads as is). ``window_size`` and ``shift_size`` are what the block uses (timm clamps them to its input
    resolution when built: take them from the block, or use :meth:`from_module`). ``forward(x)``:
    x (B, H, W, dim) -> (B, H, W, dim), timm's order (shift, then pad).
    """

    def __init__(self, *args, shift_size: int | tuple[int, int] = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shift_size = _shift(shift_size)

    def _path(self) -> tuple[nn.Module, tuple[int, int], tuple[int, int]]:
        """The module holding the weights, the window size and the shift to compute with: this module's
        own or, when installed into a block, the block's as they are now (timm's ``set_input_size``
        changes the block's window and shift and gives its ``attn`` a new bias table)."""
        block = self.__dict__.get("_block")
        if block is None:
            return self, self.window_size, self.shift_size
        return block.attn, _window(block.window_size), _shift(block.shift_size)

    def forward(self, x: Tensor) -> Tensor:
        attn, window_size, shift_size = self._path()
        out = window_attention(attn.qkv(x), window_size=window_size, shift_size=shift_size,
                               rel_pos_bias_table=attn.relative_position_bias_table, num_heads=attn.num_heads,
                               qkv_bias=attn.qkv.bias, scale=attn.scale, dropout_p=_dropout_p(attn))
        return attn.proj_drop(attn.proj(out))

    @classmethod
    def from_module(cls, block: nn.Module, install: bool = False) -> SwinBlockAttention:
        """The fused attention path of a timm ``SwinTransformerBlock``: its ``window_size`` and
        ``shift_size``, sharing the submodules and bias table (the same objects) of ``block.attn`` and
        taking its training mode.

        With ``install=True`` it also replaces ``block._attn`` on that block instance, so ``block(x)``
        runs the fused path; it is set as a plain attribute, not a submodule, so the block's
        ``state_dict`` and parameters are unchanged; ``del block._attn`` restores the stock path. Installed,
        it computes with the block's window, shift and ``attn`` as they are at each call, so it stays
        right after ``block.set_input_size``. Swin V2 blocks raise TypeError."""
        check_like(block, "block", "timm SwinTransformerBlock",
                    ("attn", "window_size", "shift_size", "_attn"))
        new = cls._adopt(block.attn, "block.attn")
        new.window_size, new.shift_size = _window(block.window_size), _shift(block.shift_size)
        if install:  # instance attributes outside the module trees (no submodule cycle, no state_dict change)
            object.__setattr__(new, "_block", block)
            object.__setattr__(block, "_attn", new)  # found before the class's method
        return new


_MAX_LOG_SCALE = math.log(1.0 / 0.01)  # Swin V2's clamp of logit_scale


def cosine_window_attention(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, position_bias: Tensor,
                            mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Swin V2's attention over windows: ``softmax(cos(q, k)·exp(min(logit_scale, log 100)) + bias + mask)·v``.

    q, k, v: (B·nW, H, N, D), windows of one image consecutive; ``logit_scale`` (H, 1, 1); ``position_bias``
    (H, N, N), already ``16·sigmoid(...)``; ``mask`` (nW, N, N) additive or None, window b taking
    ``mask[b % nW]``. The scale is folded into the normalized q and the mask into the bias, so it is one
    :func:`fusedtx.attention` call (scale 1). Returns (B·nW, H, N, D).
    """
    wins, h, n, d = q.shape
    scale = torch.clamp(logit_scale, max=_MAX_LOG_SCALE).exp().reshape(1, h, 1, 1)
    q, k = F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(k, dim=-1)
    bias = position_bias.to(q.dtype).unsqueeze(0)
    if mask is not None:  # heads of all windows of an image side by side: (B, nW·H, N, D), bias (1, nW·H, N, N)
        nw = mask.shape[0]
        bias = (bias + mask.to(q.dtype).unsqueeze(1)).reshape(1, nw * h, n, n)
        q, k, v = (t.reshape(wins // nw, nw * h, n, d) for t in (q, k, v))
    out = attention(q, k, v, bias=bias, scale=1.0, dropout_p=dropout_p)
    return out.reshape(wins, h, n, d)


def _cpb(mlp: nn.Module, coords: Tensor, index: Tensor, heads: int, n: int) -> Tensor:
    """The continuous position bias: the MLP over the coordinate table once, gathered, (H, N, N), 16·sigmoid."""
    table = mlp(coords).view(-1, heads)
    return 16 * torch.sigmoid(table[index.view(-1)].view(n, n, heads).permute(2, 0, 1))


def _timm_v2_forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
    b, n, c = x.shape
    if self.q_bias is None:
        qkv = self.qkv(x)
    else:
        qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = self.qkv(x) + qkv_bias if getattr(self, "qkv_bias_separate", False) else \
            F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = _cpb(self.cpb_mlp, self.relative_coords_table, self.relative_position_index, self.num_heads, n)
    out = cosine_window_attention(q, k, v, self.logit_scale, bias, mask, _dropout_p(self))
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def _cosine_qkv(qkv: Tensor, scale: Tensor, heads: int) -> Tensor:
    """``qkv`` (..., 3·C) with q and k L2-normalized per head and q times its head's ``scale`` (H,): what Swin
    V2's cosine attention computes before q·kᵀ, so that the window kernel's plain softmax(q·kᵀ + bias) with
    scale 1 is it."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(-3)
    q = F.normalize(q, dim=-1) * scale.to(q.dtype)[:, None]
    return torch.stack((q, F.normalize(k, dim=-1), v), dim=-3).flatten(-3)


def _cosine_window_attention(x: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: Tensor, cpb: Tensor,
                             heads: int, window: tuple[int, int], shift: tuple[int, int], order: str,
                             dropout_p: float) -> Tensor:
    """Swin V2's shifted-window cosine attention on the (B, H, W, C) map ``x`` as one window kernel call (shift,
    pad, partition, attention, reverse): q and k normalized and q scaled by ``exp(min(logit_scale, log 100))``
    before it, the continuous position bias table ``16·sigmoid(cpb)`` ((T, H), the CPB MLP's output over the
    coordinate table) gathered by the kernel as V1's table is. Padding tokens hold the transformed qkv bias
    (the stock modules pad x with zeros before ``qkv``). Returns the attention output (B, H, W, C), before
    ``proj``."""
    scale = torch.clamp(logit_scale, max=_MAX_LOG_SCALE).exp().reshape(heads)
    qkv = _cosine_qkv(F.linear(x, weight, bias), scale, heads)
    pad = _cosine_qkv(bias if bias is not None else x.new_zeros(qkv.shape[-1]), scale, heads)
    table = 16 * torch.sigmoid(cpb.view(-1, heads))
    return window_attention(qkv, window_size=window, shift_size=shift, rel_pos_bias_table=table, num_heads=heads,
                            qkv_bias=pad, scale=1.0, order=order, dropout_p=dropout_p)


def _timm_v2_block_attn(block: nn.Module, x: Tensor) -> Tensor:
    """timm ``SwinTransformerV2Block._attn`` (shift, pad, partition, cosine attention, reverse) as one window
    kernel call on the map (:func:`_cosine_window_attention`)."""
    attn = block.attn
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    out = _cosine_window_attention(x, attn.qkv.weight, bias, attn.logit_scale, attn.cpb_mlp(attn.relative_coords_table),
                                   attn.num_heads, _window(block.window_size), _shift(block.shift_size), "timm",
                                   _dropout_p(attn))
    return attn.proj_drop(attn.proj(out))


def install_swin_v2_block(block: nn.Module) -> nn.Module:
    """Install the fused window path on a timm ``SwinTransformerV2Block`` instance, as its ``_attn``
    (:func:`_timm_v2_block_attn`, reading the block's window, shift and ``attn`` at each call); ``del
    block._attn`` (what :func:`fusedtx.unswap` does) restores the stock one."""
    check_like(block, "block", "timm SwinTransformerV2Block", ("attn", "window_size", "shift_size", "_attn"))
    check_like(block.attn, "block.attn", "timm Swin V2 WindowAttention", ("qkv", "cpb_mlp", "logit_scale"))
    object.__setattr__(block, "_attn", InstalledForward(block, _timm_v2_block_attn))
    return block


def _hf_v2_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                   output_attentions: bool | None = False, **kwargs):
    if output_attentions:  # the probabilities are wanted: the stock forward forms them
        return type(self).forward(self, hidden_states, attention_mask, output_attentions, **kwargs)
    b, n, _ = hidden_states.shape
    h, d = self.num_attention_heads, self.attention_head_size
    q, k, v = (lin(hidden_states).view(b, n, h, d).transpose(1, 2) for lin in (self.query, self.key, self.value))
    bias = _cpb(self.continuous_position_bias_mlp, self.relative_coords_table, self.relative_position_index, h, n)
    # As transformers' Swinv2SelfAttention, which adds the shift mask twice.
    mask = 2 * attention_mask if attention_mask is not None else None
    out = cosine_window_attention(q, k, v, self.logit_scale, bias, mask,
                                  self.dropout.p if self.training else 0.0)
    return (out.transpose(1, 2).reshape(b, n, h * d),)


def _torchvision_v2_forward(self, x: Tensor) -> Tensor:
    """torchvision ``ShiftedWindowAttentionV2.forward`` (its ``shifted_window_attention``: pad, shift,
    partition, cosine attention, reverse) as one window kernel call on the map (:func:`_cosine_window_attention`,
    torchvision's order), its qkv bias without the key part as stock."""
    bias = self.qkv.bias
    if bias is not None:
        length = bias.numel() // 3
        bias = torch.cat((bias[:length], torch.zeros_like(bias[length:2 * length]), bias[2 * length:]))
    dropout = self.attention_dropout if self.training else 0.0
    out = _cosine_window_attention(x, self.qkv.weight, bias, self.logit_scale, self.cpb_mlp(self.relative_coords_table),
                                   self.num_heads, _window(self.window_size), _shift(self.shift_size), "torchvision",
                                   dropout)
    return F.dropout(self.proj(out), p=self.dropout, training=self.training)


def install_swin_v2(module: nn.Module) -> nn.Module:
    """Install the Swin V2 cosine path as ``module``'s instance ``forward`` (timm's
    ``swin_transformer_v2.WindowAttention``, torchvision's ``ShiftedWindowAttentionV2`` or transformers'
    ``Swinv2SelfAttention``); ``del module.forward``
    (what :func:`fusedtx.unswap` does) restores the stock one. TypeError for anything else."""
    if all(hasattr(module, a) for a in ("get_relative_position_bias", "shift_size", "attention_dropout", "cpb_mlp")):
        forward = _torchvision_v2_forward
    elif all(hasattr(module, a) for a in ("qkv", "cpb_mlp", "logit_scale", "relative_coords_table", "proj")):
        forward = _timm_v2_forward
    elif all(hasattr(module, a) for a in ("query", "key", "value", "continuous_position_bias_mlp", "logit_scale")):
        forward = _hf_v2_forward
    else:
        raise TypeError(f"module must be a timm or Hugging Face Swin V2 window attention, got {type(module).__name__}")
    object.__setattr__(module, "forward", InstalledForward(module, forward))
    return module
