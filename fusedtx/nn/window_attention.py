"""Drop-in Swin window attention modules backed by the fused ``window_attention`` op.

* :class:`ShiftedWindowAttention`: torchvision's ``ShiftedWindowAttention`` (same constructor,
  ``state_dict``, outputs): a (B, H, W, dim) map in, the map out.
* :class:`SwinBlockAttention`: timm's ``SwinTransformerBlock`` attention path (its ``_attn``: shift,
  pad, partition, ``WindowAttention``, reverse, crop, un-shift) as one module, with timm
  ``WindowAttention``'s parameters and ``state_dict``; :meth:`SwinBlockAttention.from_module` can also
  install it into a block in place of ``_attn``.
* :class:`WindowAttention`: timm's ``WindowAttention`` for callers that keep the partition themselves:
  (windows, N, dim) in, with timm's optional (nW, N, N) mask, bias and mask fused into the kernel.

* :func:`install_swin_v2` and :func:`install_swin_v2_block`: Swin V2 window attention (timm
  ``swin_transformer_v2.WindowAttention`` and ``SwinTransformerV2Block._attn``, torchvision
  ``ShiftedWindowAttentionV2``, Hugging Face ``Swinv2SelfAttention``) installed on the stock module, in
  the fused window kernel: cosine attention (q and k L2-normalized inside the kernel, the per-head
  ``logit_scale`` clamped and exponentiated as stock), the continuous position bias table from the
  module's own MLP once per call, ``16·sigmoid``, gathered by the kernel, plus the shift mask. timm's
  block and torchvision's module run it on the map, shift to reverse; timm's ``WindowAttention`` and
  Hugging Face's, whose callers partition the windows, on those windows with the caller's mask.

Neither timm nor torchvision is needed. The drop-in classes are Swin V1: ``from_module`` refuses Swin V2
modules with a message.
Dropout on the attention probabilities (training with a nonzero attention dropout) takes the op's
PyTorch path and warns once (see :func:`fusedtx.window_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedtx import reference
from fusedtx.nn.attention import InstalledForward, check_like
from fusedtx.ops.window_attention import window_attention, window_pair

_V2 = ("is Swin V2 (cosine attention, continuous position bias), which this Swin V1 drop-in does not compute; "
       "fusedtx.swap (or fusedtx.nn.window_attention.install_swin_v2) installs the fused V2 path on it")


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


def _cosine_window_attention(x: Tensor, weight: Tensor, bias: Tensor | None, logit_scale: Tensor, cpb: Tensor,
                             heads: int, window: tuple[int, int], shift: tuple[int, int] = (0, 0), order: str = "timm",
                             mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """Swin V2's (shifted) window cosine attention on the (B, H, W, C) map ``x`` as one window kernel call (shift,
    pad, partition, attention, reverse) after the qkv Linear (``weight``, ``bias``): q and k L2-normalized in the
    kernel, the logits scaled by ``exp(min(logit_scale, log 100))``, the continuous position bias table
    ``16·sigmoid(cpb)`` ((T, H), the CPB MLP's output over the coordinate table) gathered by the kernel as V1's
    table is, plus ``mask`` (M, N, N) or None for windows partitioned by the caller. Padding tokens hold the qkv
    bias (the stock modules pad x with zeros before the Linear). Returns the attention output (B, H, W, C),
    before ``proj``."""
    return window_attention(F.linear(x, weight, bias), window_size=window, shift_size=shift,
                            rel_pos_bias_table=16 * torch.sigmoid(cpb.view(-1, heads)), num_heads=heads,
                            qkv_bias=bias, order=order, mask=mask, dropout_p=dropout_p, logit_scale=logit_scale)


def _windows(x: Tensor, window: tuple[int, int]) -> Tensor:
    """Windows partitioned by the caller, (windows, N, C), as one-window maps (windows, wh, ww, C)."""
    return x.view(x.shape[0], *window, x.shape[2])


def _zero_key_bias(q_bias: Tensor, v_bias: Tensor) -> Tensor:
    """The qkv bias (3·C,) of a Swin V2 module whose key projection has no bias, as stock computes it."""
    return torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))


def _timm_v2_qkv_bias(attn: nn.Module) -> Tensor | None:
    return None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))


def _timm_v2_forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """timm ``swin_transformer_v2.WindowAttention.forward`` on windows the caller partitioned: (B·nW, N, C) and its
    optional (nW, N, N) mask, one window kernel call."""
    b, n, c = x.shape
    window = _window(self.window_size)
    if n != window[0] * window[1]:  # not windows of its size: as stock (which raises)
        return type(self).forward(self, x, mask)
    out = _cosine_window_attention(_windows(x, window), self.qkv.weight, _timm_v2_qkv_bias(self), self.logit_scale,
                                   self.cpb_mlp(self.relative_coords_table), self.num_heads, window, mask=mask,
                                   dropout_p=_dropout_p(self))
    return self.proj_drop(self.proj(out.view(b, n, c)))


def _timm_v2_block_attn(block: nn.Module, x: Tensor) -> Tensor:
    """timm ``SwinTransformerV2Block._attn`` (shift, pad, partition, cosine attention, reverse) as one window
    kernel call on the map (:func:`_cosine_window_attention`)."""
    attn = block.attn
    out = _cosine_window_attention(x, attn.qkv.weight, _timm_v2_qkv_bias(attn), attn.logit_scale,
                                   attn.cpb_mlp(attn.relative_coords_table), attn.num_heads, _window(block.window_size),
                                   _shift(block.shift_size), "timm", dropout_p=_dropout_p(attn))
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
    """transformers ``Swinv2SelfAttention.forward`` on the windows its layer partitioned, (B·nW, N, C), as one
    window kernel call: the query, key and value Linears as one (key without bias, as stock), and the shift mask
    (nW, N, N) added twice, as transformers does."""
    b, n, c = hidden_states.shape
    window = _window(self.window_size)
    if output_attentions or n != window[0] * window[1]:  # the probabilities are wanted, or other windows
        return type(self).forward(self, hidden_states, attention_mask, output_attentions, **kwargs)
    weight = torch.cat((self.query.weight, self.key.weight, self.value.weight))
    bias = _zero_key_bias(self.query.bias, self.value.bias) if self.query.bias is not None else None
    mask = 2 * attention_mask if attention_mask is not None else None
    out = _cosine_window_attention(_windows(hidden_states, window), weight, bias, self.logit_scale,
                                   self.continuous_position_bias_mlp(self.relative_coords_table),
                                   self.num_attention_heads, window, mask=mask,
                                   dropout_p=self.dropout.p if self.training else 0.0)
    return (out.view(b, n, c),)


def _torchvision_v2_forward(self, x: Tensor) -> Tensor:
    """torchvision ``ShiftedWindowAttentionV2.forward`` (its ``shifted_window_attention``: pad, shift,
    partition, cosine attention, reverse) as one window kernel call on the map (:func:`_cosine_window_attention`,
    torchvision's order), its qkv bias without the key part as stock."""
    bias = self.qkv.bias
    if bias is not None:
        length = bias.numel() // 3
        bias = _zero_key_bias(bias[:length], bias[2 * length:])
    dropout = self.attention_dropout if self.training else 0.0
    out = _cosine_window_attention(x, self.qkv.weight, bias, self.logit_scale, self.cpb_mlp(self.relative_coords_table),
                                   self.num_heads, _window(self.window_size), _shift(self.shift_size), "torchvision",
                                   dropout_p=dropout)
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
