"""Plain PyTorch references of every fusedtx op.

Each function here is written straight from its formula. It is the specification the Triton kernels
are judged against (the tests call it on float64 inputs), and the fallback the ops take where Triton
cannot run. Half-precision inputs are computed in float32 and the result is cast back, as the kernels
do; float64 inputs stay in float64.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------------
# layer_norm_gelu
# --------------------------------------------------------------------------------------------------

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """``none``: z; ``gelu``: z·Φ(z) (exact, erf); ``gelu_tanh``: the tanh approximation; ``relu``."""
    if name == "none":
        return z
    if name == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    if name == "relu":
        return torch.clamp_min(z, 0.0)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(biased variance + eps) over the last dimension, shapes ``x.shape[:-1]``."""
    mean = x.mean(dim=-1)
    var = ((x - mean.unsqueeze(-1)) ** 2).mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def layer_norm_gelu(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "gelu",
    residual: torch.Tensor | None = None,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``act(LayerNorm(x [+ residual]))`` over the last dimension.

    Shapes: ``x`` and ``residual`` (..., N); ``weight`` and ``bias`` (N,) or ``None``.
    With a residual, the sum ``s = x + residual`` is formed in the dtype of ``x`` (as ``x + residual``
    in PyTorch would), normalized, and returned too: ``(y, s)``. Without, returns ``y``.
    ``y`` has the dtype of ``x``. With ``return_stats`` the mean and rstd that normalized each row
    (shapes ``x.shape[:-1]``, compute dtype) follow: ``(y, mean, rstd)`` or ``(y, s, mean, rstd)``.
    """
    s = x if residual is None else x + residual
    t = s.to(compute_dtype(x.dtype))
    mean, rstd = layer_norm_stats(t, eps)
    z = (t - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        z = z * weight.to(t.dtype)
    if bias is not None:
        z = z + bias.to(t.dtype)
    y = apply_activation(z, activation).to(x.dtype)
    out = (y,) if residual is None else (y, s)
    if return_stats:
        out += (mean, rstd)
    return out if len(out) > 1 else y


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q·kᵀ·scale + bias, masked)·v`` over the keys.

    Shapes: ``q`` (B, H, Nq, D), ``k`` and ``v`` (B, H, Nk, D); ``bias`` broadcastable to
    (B, H, Nq, Nk); ``key_padding_mask`` bool (B, Nk), True for keys to ignore. ``causal`` lets query
    i see keys j <= i (top-left aligned, as ``F.scaled_dot_product_attention``). ``scale`` defaults to
    1/sqrt(D). A row whose keys are all masked (by the padding mask, causality or a bias of -inf)
    gives zeros, never NaN. ``dropout_p`` drops probabilities (scaling the rest by 1/(1-p)).

    Returns the output (B, H, Nq, D) in q's dtype, and with ``return_lse`` also the natural-log
    log-sum-exp of each row's masked scores (B, H, Nq) in the compute dtype (-inf for fully masked rows).
    """
    ct = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(ct)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        nq, nk = s.shape[-2:]
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~allowed, float("-inf"))
    # Max-subtracted softmax; a fully masked row has max -inf, so subtract 0 there and divide by 1.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(total > 0, total, torch.ones_like(total))
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = torch.matmul(p, v.to(ct)).to(q.dtype)
    if not return_lse:
        return out
    return out, (m + torch.log(total)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# sinusoidal
# --------------------------------------------------------------------------------------------------

SINUSOIDAL_LAYOUTS = ("interleaved", "concat")
SINCOS_2D_LAYOUTS = ("mae", "mae_hw", "timm")


def sinusoidal_frequencies(count: int, base: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``1 / base^(i / count)`` for i in [0, count): with count = d/2 these are the 1D encoding's
    ``1 / base^(2i/d)``; with count = d/4, the 2D encoding's per-axis frequencies."""
    return base ** -(torch.arange(count, dtype=dtype, device=device) / count)


def sinusoidal_encoding(
    length: int,
    dim: int,
    positions: torch.Tensor | None = None,
    offset: int = 0,
    base: float = 10000.0,
    layout: str = "interleaved",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """``PE(pos, 2i) = sin(pos / base^(2i/dim))``, ``PE(pos, 2i+1) = cos(pos / base^(2i/dim))``.

    Positions are ``offset + arange(length)``, or ``positions + offset`` for an integer tensor
    ``positions`` of shape (length,) or (batch, length). Returns (length, dim) or (batch, length, dim)
    in ``dtype``. ``layout="interleaved"`` is the formula as written (sin, cos, sin, cos, ...);
    ``"concat"`` puts all sines first: [sin(pos * f_0..f_{d/2-1}) | cos(...)].
    """
    ct = compute_dtype(dtype)
    if positions is None:
        positions = torch.arange(length, device=device)
    pos = (positions.long() + offset).to(ct)
    angle = pos.unsqueeze(-1) * sinusoidal_frequencies(dim // 2, base, ct, positions.device)
    if layout == "interleaved":
        pe = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)
    elif layout == "concat":
        pe = torch.cat([angle.sin(), angle.cos()], dim=-1)
    else:
        raise ValueError(f"layout must be one of {SINUSOIDAL_LAYOUTS}, got {layout!r}")
    return pe.to(dtype)


def sincos_2d(
    grid_h: int,
    grid_w: int,
    dim: int,
    base: float = 10000.0,
    num_prefix_tokens: int = 0,
    layout: str = "mae",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """The 2D sin-cos encoding of a grid_h x grid_w patch grid: (num_prefix_tokens + grid_h * grid_w, dim).

    Patches are in row-major order (token ``num_prefix_tokens + y * grid_w + x``); the prefix (class)
    tokens get zeros. Each quarter of the channels holds sin or cos of one axis' coordinate times the
    frequencies ``1 / base^(i / (dim/4))``, i < dim/4, in the order of ``layout``:

    * ``"mae"``: [sin x | cos x | sin y | cos y], x the column: MAE's ``get_2d_sincos_pos_embed`` (its
      ``np.meshgrid(grid_w, grid_h)`` makes ``grid[0]``, named emb_h, the column index);
    * ``"mae_hw"``: [sin y | cos y | sin x | cos x]: rows first; timm's ``build_sincos2d_pos_embed``
      with ``interleave_sin_cos=True``;
    * ``"timm"``: [sin y | sin x | cos y | cos x]: timm's ``build_sincos2d_pos_embed`` default.
    """
    ct = compute_dtype(dtype)
    y, x = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
    omega = sinusoidal_frequencies(dim // 4, base, ct, device)
    ay = y.reshape(-1, 1).to(ct) * omega
    ax = x.reshape(-1, 1).to(ct) * omega
    if layout == "mae":
        parts = [ax.sin(), ax.cos(), ay.sin(), ay.cos()]
    elif layout == "mae_hw":
        parts = [ay.sin(), ay.cos(), ax.sin(), ax.cos()]
    elif layout == "timm":
        parts = [ay.sin(), ax.sin(), ay.cos(), ax.cos()]
    else:
        raise ValueError(f"layout must be one of {SINCOS_2D_LAYOUTS}, got {layout!r}")
    prefix = torch.zeros(num_prefix_tokens, dim, dtype=ct, device=device)
    return torch.cat([prefix, torch.cat(parts, dim=1)], dim=0).to(dtype)


def add_sinusoidal(
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
    offset: int = 0,
    base: float = 10000.0,
    layout: str = "interleaved",
) -> torch.Tensor:
    """``x + PE`` for x of (batch, seq, dim): the encoding of ``offset + arange(seq)``, or of
    ``positions + offset`` ((seq,) or (batch, seq) integers). Added in the compute dtype, rounded once to
    x's dtype."""
    ct = compute_dtype(x.dtype)
    _, seq, dim = x.shape
    pe = sinusoidal_encoding(seq, dim, positions, offset, base, layout, ct, x.device)
    return (x.to(ct) + pe).to(x.dtype)


def add_sincos_2d(
    x: torch.Tensor,
    grid_h: int,
    grid_w: int,
    num_prefix_tokens: int = 0,
    base: float = 10000.0,
    layout: str = "mae",
) -> torch.Tensor:
    """``x + sincos_2d(grid_h, grid_w, ...)`` for x of (batch, num_prefix_tokens + grid_h * grid_w, dim);
    the prefix tokens pass unchanged. Added in the compute dtype, rounded once to x's dtype."""
    ct = compute_dtype(x.dtype)
    pe = sincos_2d(grid_h, grid_w, x.shape[-1], base, num_prefix_tokens, layout, ct, x.device)
    return (x.to(ct) + pe).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# window_attention
# --------------------------------------------------------------------------------------------------

WINDOW_ORDERS = ("timm", "torchvision")
SHIFT_MASK_VALUE = -100.0  # what both stock modules add between regions of the shifted map


def relative_position_index(window_size: tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) row of the ((2wh-1)(2ww-1), heads) bias table for each (query, key) pair of a window,
    N = wh·ww tokens in row-major order (as timm and torchvision build it)."""
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def effective_shift(size: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int],
                    order: str) -> tuple[int, int]:
    """The shift actually applied: torchvision drops it along an axis whose padded size is not larger
    than the window; timm applies what it is given (its block clamps window and shift when built)."""
    if order == "timm":
        return tuple(shift_size)
    padded = [math.ceil(n / w) * w for n, w in zip(size, window_size, strict=True)]
    return tuple(0 if w >= p else s for p, w, s in zip(padded, window_size, shift_size, strict=True))


def shift_mask(padded_size: tuple[int, int], window_size: tuple[int, int], shift_size: tuple[int, int],
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(windows, N, N): 0 between tokens of one region of the shifted, padded map, -100 across regions.

    The regions are numbered exactly as timm's ``get_attn_mask`` and torchvision's
    ``shifted_window_attention`` number them, by the same slices of the padded map."""
    (hp, wp), (wh, ww), (sh, sw) = padded_size, window_size, shift_size
    img = torch.zeros(hp, wp, device=device)
    count = 0
    for rows in ((0, -wh), (-wh, -sh), (-sh, None)):
        for cols in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[rows[0]:rows[1], cols[0]:cols[1]] = count
            count += 1
    ids = img.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros(diff.shape, dtype=dtype, device=device).masked_fill(diff != 0, SHIFT_MASK_VALUE)


def _pad_map(x: torch.Tensor, window_size: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) padded at the bottom and right to multiples of the window, new positions holding ``fill``
    (C,): what the qkv Linear gives for the zero-padded positions of the stock modules."""
    bsz, h, w, c = x.shape
    pad_h, pad_w = (-h) % window_size[0], (-w) % window_size[1]
    x = torch.cat([x, fill.expand(bsz, h, pad_w, c)], dim=2)
    return torch.cat([x, fill.expand(bsz, pad_h, w + pad_w, c)], dim=1)


def cosine_qk(q: torch.Tensor, k: torch.Tensor, cosine_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Swin V2's cosine attention as plain attention: (q̂·cosine_scale[h], k̂, scale 1) for q, k (..., heads, N,
    head_dim), where x̂ = x / max(|x|, 1e-12) (``F.normalize``)."""
    def unit(x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return unit(q) * cosine_scale.to(q.dtype).view(-1, 1, 1), unit(k), 1.0


def window_attention(
    qkv: torch.Tensor,
    window_size: tuple[int, int],
    shift_size: tuple[int, int],
    rel_pos_bias_table: torch.Tensor,
    num_heads: int,
    qkv_bias: torch.Tensor | None = None,
    scale: float | None = None,
    order: str = "timm",
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    cosine_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Swin (shifted) window attention on the qkv projection of a (B, H, W, C) map, both stock orders.

    ``qkv`` (B, H, W, 3·C) is the qkv Linear's output, channels laid out (3, heads, head_dim). Per
    window of N = wh·ww tokens: ``softmax(q·kᵀ·scale + table[relative_position_index] + shift mask
    [+ mask])·v``, then the windows are put back, un-shifted and cropped: (B, H, W, C) in qkv's dtype.

    ``order="timm"`` (``SwinTransformerBlock._attn``): roll by -shift, then pad to a multiple of the
    window; ``"torchvision"`` (``shifted_window_attention``): pad, then roll the padded map (the shift is
    dropped along an axis whose padded size is not larger than the window). Padded positions hold
    ``qkv_bias`` (3·C,) (zero without one) and take part as keys, as in both modules, where padding comes
    before the Linear. ``rel_pos_bias_table`` is ((2wh-1)(2ww-1), heads); ``scale`` defaults to
    head_dim^-0.5. ``mask`` (M, N, N) is an extra additive mask: window number g (counted over
    (batch, window row, window column)) adds ``mask[g % M]``. ``dropout_p`` drops attention probabilities.
    ``cosine_scale`` (heads,), Swin V2's cosine attention: q and k L2-normalized (padded tokens' too), and
    ``q̂·k̂ᵀ·cosine_scale[h]`` in place of ``q·kᵀ·scale``.

    With ``return_lse``, also the natural-log log-sum-exp of every window row, (B·windows, heads, N), in
    the compute dtype.
    """
    if order not in WINDOW_ORDERS:
        raise ValueError(f"order must be one of {WINDOW_ORDERS}, got {order!r}")
    bsz, h, w, c3 = qkv.shape
    wh, ww = window_size
    n = wh * ww
    head_dim = c3 // (3 * num_heads)
    sh, sw = effective_shift((h, w), window_size, shift_size, order)
    ct = compute_dtype(qkv.dtype)
    # Padded positions: the qkv Linear of a zero input, i.e. its bias rounded to the output dtype.
    fill = (qkv_bias.to(qkv.dtype) if qkv_bias is not None else qkv.new_zeros(c3)).to(ct)
    x = qkv.to(ct)
    if order == "timm" and (sh or sw):
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = _pad_map(x, window_size, fill)
    if order == "torchvision" and (sh or sw):
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    hp, wp = x.shape[1:3]
    windows = (hp // wh) * (wp // ww)
    # partition: (3, B·windows, heads, N, head_dim)
    x = x.view(bsz, hp // wh, wh, wp // ww, ww, 3, num_heads, head_dim).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = x.reshape(3, bsz * windows, num_heads, n, head_dim).unbind(0)
    if cosine_scale is not None:
        q, k, scale = cosine_qk(q, k, cosine_scale)
    idx = relative_position_index(window_size, qkv.device)
    bias = rel_pos_bias_table.to(ct)[idx].permute(2, 0, 1).unsqueeze(0)  # 1, heads, N, N
    if sh or sw:
        bias = bias + shift_mask((hp, wp), window_size, (sh, sw), ct, qkv.device).repeat(bsz, 1, 1)[:, None]
    if mask is not None:
        g = torch.arange(bsz * windows, device=qkv.device)
        bias = bias + mask.to(ct)[g % mask.shape[0]][:, None]
    out, lse = attention(q, k, v, bias, scale=scale, dropout_p=dropout_p, return_lse=True)
    # reverse the partition: (B, Hp, Wp, C)
    out = out.view(bsz, hp // wh, wp // ww, num_heads, wh, ww, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(bsz, hp, wp, num_heads * head_dim)
    if order == "timm":
        out = out[:, :h, :w]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    out = out[:, :h, :w].to(qkv.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# highres: patch scoring, token gather, bipartite matching, size-weighted merge
# --------------------------------------------------------------------------------------------------

PATCH_SCORES = ("variance", "gradient")


def patch_scores(images: torch.Tensor, patch_size: int, method: str = "variance") -> torch.Tensor:
    """(B, gh * gw) importance of each ``patch_size`` patch of ``images`` (B, C, H, W), row-major over the
    grid of whole patches (gh = H // patch_size, gw = W // patch_size), in the compute dtype.

    * ``variance``: the pixels' variance inside the patch (biased, about the patch's own mean), per channel,
      averaged over the channels.
    * ``gradient``: gradient energy, the mean squared difference of horizontally adjacent pixels plus that of
      vertically adjacent pixels, both pixels inside the patch, averaged over the channels (0 for 1-pixel
      patches)."""
    p = patch_size
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    x = images[:, :, : gh * p, : gw * p].to(compute_dtype(images.dtype))
    tiles = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)  # (B, gh, gw, C, p, p)
    if method == "variance":
        mean = tiles.mean(dim=(-1, -2), keepdim=True)
        per_channel = (tiles - mean).square().mean(dim=(-1, -2))
    else:
        pairs = max(p * (p - 1), 1)
        dx = (tiles[..., :, 1:] - tiles[..., :, :-1]).square().sum(dim=(-1, -2))
        dy = (tiles[..., 1:, :] - tiles[..., :-1, :]).square().sum(dim=(-1, -2))
        per_channel = (dx + dy) / pairs
    return per_channel.mean(dim=-1).reshape(b, gh * gw)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor, pos: torch.Tensor | None = None,
                  prefix: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P + K, C): the ``prefix`` tokens (B, P, C) as they are, then for each kept index i of ``index``
    (B, K) the token ``tokens[b, i] + pos[b or 0, i]`` (``tokens`` (B, N, C), ``pos`` (1 or B, N, C));
    the add in the compute dtype."""
    ct = compute_dtype(tokens.dtype)
    rows = torch.stack([tokens[b, index[b]] for b in range(tokens.shape[0])]).to(ct)
    if pos is not None:
        rows = rows + torch.stack([pos[b if pos.shape[0] > 1 else 0, index[b]] for b in range(tokens.shape[0])]).to(ct)
    if prefix is not None:
        rows = torch.cat([prefix.to(ct), rows], dim=1)
    return rows.to(tokens.dtype)


def match_tokens(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's bipartite edge for each token of set A: (score, index), each (B, Na): the largest cosine
    similarity of ``a[:, i]`` (B, Na, D) with the tokens of ``b`` (B, Nb, D) and the (first) index reaching
    it. Rows are normalized as ``x / max(||x||, eps)``. Scores in the compute dtype (float32 for halves)."""
    ct = compute_dtype(a.dtype)
    an = a.to(ct) / a.to(ct).norm(dim=-1, keepdim=True).clamp_min(eps)
    bn = b.to(ct) / b.to(ct).norm(dim=-1, keepdim=True).clamp_min(eps)
    score, index = (an @ bn.transpose(-1, -2)).max(dim=-1)
    return score, index


def merge_weighted(xb: torch.Tensor, sb: torch.Tensor, xs: torch.Tensor, ss: torch.Tensor,
                   dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of source tokens into destination tokens: for each destination j,
    ``(sb_j * xb_j + sum over sources i with dst_i = j of ss_i * xs_i) / (sb_j + sum ss_i)`` and its new size
    ``sb_j + sum ss_i``. ``xb`` (B, Nb, C), ``sb`` (B, Nb), ``xs`` (B, R, C), ``ss`` (B, R), ``dst`` (B, R)
    indices into Nb. Returns (x (B, Nb, C) in xb's dtype, sizes (B, Nb) in sb's dtype)."""
    ct = compute_dtype(xb.dtype)
    out = torch.zeros(xb.shape, dtype=ct, device=xb.device)
    size = torch.zeros(sb.shape, dtype=ct, device=xb.device)
    for bi in range(xb.shape[0]):
        for j in range(xb.shape[1]):
            src = (dst[bi] == j).nonzero().flatten()
            w = torch.cat([sb[bi, j:j + 1].to(ct), ss[bi, src].to(ct)])
            rows = torch.cat([xb[bi, j:j + 1].to(ct), xs[bi, src].to(ct)])
            size[bi, j] = w.sum()
            out[bi, j] = (w[:, None] * rows).sum(0) / w.sum()
    return out.to(xb.dtype), size.to(sb.dtype)
