"""The fast PyTorch path: every fusedtx op in stock PyTorch kernels, for where Triton cannot run.

``fusedtx._backend`` calls it the ``torch`` backend. ``auto`` takes it for CPU tensors (without Triton's
interpreter) and, on CUDA, for the calls a kernel does not cover. It computes what :mod:`fusedtx.reference`
specifies, with the same signatures, but the way a performance engineer would write it in PyTorch:

* attention is ``F.scaled_dot_product_attention``'s own flash kernel (O(N) memory on the CPU), the bias
  as ``attn_mask`` with the key padding mask and causality folded in;
* LayerNorm is ``F.layer_norm`` (one pass), then the activation;
* sinusoidal tables are the reference's float64 formulas (accurate angle reduction, vectorized), cached in
  a bounded cache, since they are pure functions of their arguments;
* window attention gathers the windows straight from the qkv map with one cached index (no roll, pad or
  partition copies), runs SDPA over all windows with the gathered bias and the cached shift mask, and
  scatters the outputs back to the map with another cached index.

Autograd runs through these functions (the ops' backward takes their vector-Jacobian product).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fusedtx import reference

# --------------------------------------------------------------------------------------------------
# layer_norm_gelu
# --------------------------------------------------------------------------------------------------


def activate(z: torch.Tensor, name: str) -> torch.Tensor:
    """The activation (a name of ``reference.ACTIVATIONS``) of a fresh tensor ``z`` that nothing else
    holds, in place when autograd is not recording: a second output buffer costs more than the activation
    on a CPU (a new 25 MB tensor is 6,000 page faults)."""
    if name == "none":
        return z
    approximate = "tanh" if name == "gelu_tanh" else "none"
    if torch.is_grad_enabled():
        return F.relu(z) if name == "relu" else F.gelu(z, approximate=approximate)
    return z.relu_() if name == "relu" else torch.ops.aten.gelu_(z, approximate=approximate)


def layer_norm_gelu(x, weight=None, bias=None, eps=1e-5, activation="gelu", residual=None, return_stats=False):
    """:func:`fusedtx.reference.layer_norm_gelu` with ``torch.native_layer_norm`` (which also gives the
    statistics, in one pass) and PyTorch's activations. Half-precision inputs are normalized in float32
    inside the kernel, as the reference does."""
    s = x if residual is None else x + residual
    n = x.shape[-1]
    if return_stats:
        z, mean, rstd = torch.native_layer_norm(s, (n,), weight, bias, eps)
        stats = (mean.squeeze(-1), rstd.squeeze(-1))
    else:
        z, stats = F.layer_norm(s, (n,), weight, bias, eps), ()
    y = activate(z, activation)
    out = (y,) if residual is None else (y, s)
    out += stats
    return out if len(out) > 1 else y


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------


def _attn_mask(bias, key_padding_mask, causal: bool, nq: int, nk: int, dtype: torch.dtype):
    """SDPA's ``attn_mask`` (None, or additive and broadcastable to (B, H, Nq, Nk)) and ``is_causal``.

    SDPA takes causality only without a mask, so with one it is folded in as -inf above the diagonal;
    the key padding mask becomes -inf on the padded keys. Each is only as large as its own dims."""
    parts = []
    if bias is not None:
        parts.append(bias.to(dtype))
    if key_padding_mask is not None:
        kpm = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
        parts.append(kpm.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :])
    if causal and parts:
        above = torch.ones(nq, nk, dtype=torch.bool, device=parts[0].device).triu_(1)
        parts.append(torch.zeros(nq, nk, dtype=dtype, device=above.device).masked_fill_(above, float("-inf")))
    if not parts:
        return None, causal
    mask = parts[0]
    for p in parts[1:]:
        mask = mask + p
    return mask, False


def attention(q, k, v, bias=None, key_padding_mask=None, causal=False, scale=None, dropout_p=0.0,
              return_lse=False):
    """:func:`fusedtx.reference.attention` by ``F.scaled_dot_product_attention``.

    With ``return_lse`` (the log-sum-exp the Triton backward reads) CPU tensors take the CPU flash
    kernel itself, which returns it; elsewhere (CUDA calls the kernels do not cover, such as float64 or
    head dims above 256) the reference computes it. Fully masked rows give zeros: SDPA's flash and math
    paths do so on the supported torch versions (its math path uses a safe softmax since torch 2.5), and
    the tests check it on every backend."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask, is_causal = _attn_mask(bias, key_padding_mask, causal, q.shape[2], k.shape[2], q.dtype)
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    if q.device.type == "cpu" and dropout_p == 0:
        # The kernel itself reads the last dim as contiguous (SDPA's front end copies such inputs; this
        # call must do it): a head dim with a stride gave garbage.
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                          scale=scale)
    return reference.attention(q, k, v, bias, key_padding_mask, causal, scale, dropout_p, return_lse=True)


# --------------------------------------------------------------------------------------------------
# sinusoidal
# --------------------------------------------------------------------------------------------------

# Pure functions of their arguments, so cached; bounded (a decoder's growing offset must not grow it).
_TABLES = 32


@functools.lru_cache(maxsize=_TABLES)
def _sinusoidal_table(length, dim, offset, base, layout, dtype, device) -> torch.Tensor:
    pe = reference.sinusoidal_encoding(length, dim, None, offset, base, layout, torch.float64, device)
    return pe.to(dtype)


@functools.lru_cache(maxsize=_TABLES)
def _sincos_2d_table(grid_h, grid_w, dim, base, num_prefix_tokens, layout, dtype, device) -> torch.Tensor:
    pe = reference.sincos_2d(grid_h, grid_w, dim, base, num_prefix_tokens, layout, torch.float64, device)
    return pe.to(dtype)


def sinusoidal_encoding(length, dim, positions=None, offset=0, base=10000.0, layout="interleaved",
                        dtype=torch.float32, device=None):
    """The reference's encoding, evaluated in float64 (exact angle reduction) and rounded once to ``dtype``;
    the table of ``offset + arange(length)`` comes from a bounded cache (a fresh copy each call)."""
    if positions is None:
        return _sinusoidal_table(length, dim, offset, base, layout, dtype, torch.device(device)).clone()
    pe = reference.sinusoidal_encoding(length, dim, positions, offset, base, layout, torch.float64, device)
    return pe.to(dtype)


def sincos_2d(grid_h, grid_w, dim, base=10000.0, num_prefix_tokens=0, layout="mae", dtype=torch.float32,
              device=None):
    """The reference's 2D encoding, from the bounded cache (a fresh copy each call)."""
    return _sincos_2d_table(grid_h, grid_w, dim, base, num_prefix_tokens, layout, dtype, torch.device(device)).clone()


def _add(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """``x + pe`` formed in the compute dtype (``pe``'s) and rounded once to x's dtype, contiguous."""
    out = x + pe if x.dtype == pe.dtype else (x.to(pe.dtype) + pe).to(x.dtype)
    return out.contiguous()


def add_sinusoidal(x, positions=None, offset=0, base=10000.0, layout="interleaved"):
    """``x + PE`` with the cached table (or the encoding of ``positions``) in the compute dtype."""
    _, seq, dim = x.shape
    ct = reference.compute_dtype(x.dtype)
    if positions is None:
        return _add(x, _sinusoidal_table(seq, dim, offset, base, layout, ct, x.device))
    return _add(x, sinusoidal_encoding(seq, dim, positions, offset, base, layout, ct, x.device))


def add_sincos_2d(x, grid_h, grid_w, num_prefix_tokens=0, base=10000.0, layout="mae"):
    """``x + sincos_2d(...)`` with the cached table in the compute dtype."""
    ct = reference.compute_dtype(x.dtype)
    return _add(x, _sincos_2d_table(grid_h, grid_w, x.shape[-1], base, num_prefix_tokens, layout, ct, x.device))


# --------------------------------------------------------------------------------------------------
# window_attention
# --------------------------------------------------------------------------------------------------


def _grid_source(size: int, padded: int, shift: int, order: str, device) -> torch.Tensor:
    """For each row (or column) p of the shifted, padded grid, the map row it holds, or -1 for padding.

    timm rolls the map by -shift, then pads: p < size holds (p + shift) mod size. torchvision pads, then
    rolls the padded map: p holds r = (p + shift) mod padded when r < size."""
    p = torch.arange(padded, device=device)
    if order == "timm":
        return torch.where(p < size, (p + shift) % size, -1)
    r = (p + shift) % padded
    return torch.where(r < size, r, -1)


@functools.lru_cache(maxsize=64)
def window_geometry(h: int, w: int, window_size: tuple[int, int], shift_size: tuple[int, int], order: str,
                    device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                   torch.Tensor]:
    """Built once per (map size, window, shift, order, device), then cached (bounded):

    * ``gather`` (windows·N,): for the N tokens of each window of the shifted, padded grid (windows and
      their tokens in row-major order), the flat map position it reads (0 for padding); None when that is
      the identity (one unshifted window covering the map: timm's pre-partitioned windows);
    * ``padding`` (P,): the positions in that order that are padding (they hold the qkv bias);
    * ``scatter`` (H·W, 2): for each map position, (window, token) where its output is, which undoes the
      partition, the shift and the padding in one gather;
    * ``shift`` (windows, 1, N, N) float32: the shift mask (0 within a region, -100 across), or None;
    * ``rel_index`` (N·N,): the bias table row of each (query, key) pair.
    """
    (wh, ww), (sh, sw) = window_size, shift_size
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    rows = _grid_source(h, hp, sh, order, device)
    cols = _grid_source(w, wp, sw, order, device)
    # Grid position of token t of window g: row (g // n_wx)·wh + t // ww, column (g % n_wx)·ww + t % ww.
    grid_rows = rows.view(hp // wh, 1, wh, 1).expand(-1, wp // ww, -1, ww)
    grid_cols = cols.view(1, wp // ww, 1, ww).expand(hp // wh, -1, wh, -1)
    pad = ((grid_rows < 0) | (grid_cols < 0)).reshape(-1)
    source = (grid_rows * w + grid_cols).reshape(-1)
    gather = torch.where(pad, 0, source)
    order_pos = torch.arange(source.numel(), device=device)
    position = torch.empty(h * w, dtype=torch.long, device=device)
    position[source[~pad]] = order_pos[~pad]
    n = wh * ww
    scatter = torch.stack([position // n, position % n], dim=1)
    shift = None
    if sh or sw:
        shift = reference.shift_mask((hp, wp), window_size, (sh, sw), torch.float32, device)[:, None]
    rel_index = reference.relative_position_index(window_size, device).reshape(-1)
    identity = bool((gather == order_pos).all()) and not pad.any()
    return None if identity else gather, pad.nonzero().squeeze(1), scatter, shift, rel_index


def _cosine_qkv(rows: torch.Tensor, cosine_scale: torch.Tensor, in_place: bool):
    """Swin V2's cosine attention as plain attention (:func:`fusedtx.reference.cosine_qk`, with scale 1) on the
    qkv rows (windows, N, 3, heads, head_dim): q and k L2-normalized, q times ``cosine_scale[h]``, by one norm and
    one product over both, in ``rows`` itself when ``in_place`` (a tensor this module made) and autograd is not
    recording. Returns q, k, v (windows, heads, N, head_dim)."""
    qk = rows[:, :, :2]
    scales = torch.stack((cosine_scale, torch.ones_like(cosine_scale))).float()  # (2, heads): q's, k's
    # In float32: in half precision the 1e-12 floor is 0, and a zero row (padding without a qkv bias) gave NaN.
    factor = qk.norm(dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12).reciprocal() * scales[:, :, None]
    qk = qk.mul_(factor) if in_place and not torch.is_grad_enabled() else (qk * factor).to(rows.dtype)
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, rows[:, :, 2].transpose(1, 2)


def window_attention(qkv, window_size, shift_size, rel_pos_bias_table, num_heads, qkv_bias=None, scale=None,
                     order="timm", mask=None, dropout_p=0.0, return_lse=False, cosine_scale=None):
    """:func:`fusedtx.reference.window_attention` as one gather, SDPA over every window, one gather back."""
    bsz, h, w, c3 = qkv.shape
    window_size, shift_size = tuple(window_size), tuple(shift_size)
    n, c = window_size[0] * window_size[1], c3 // 3
    head_dim = c // num_heads
    shift_size = reference.effective_shift((h, w), window_size, shift_size, order)
    gather, padding, scatter, shift, rel_index = window_geometry(h, w, window_size, shift_size, order, qkv.device)
    windows = scatter.shape[0] // n if gather is None else gather.numel() // n
    x = qkv_rows = qkv.reshape(bsz, h * w, c3)
    if gather is not None:
        x = x.index_select(1, gather)
    if padding.numel():
        # The stock modules pad before the qkv Linear: padded tokens hold its bias (zeros without one).
        fill = qkv_bias.to(qkv.dtype) if qkv_bias is not None else qkv.new_zeros(c3)
        x = x.index_copy(1, padding, fill.expand(bsz, padding.numel(), c3))
    rows = x.view(bsz * windows, n, 3, num_heads, head_dim)
    if cosine_scale is None:
        q, k, v = rows.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        (q, k, v), scale = _cosine_qkv(rows, cosine_scale, in_place=x is not qkv_rows), 1.0
    ct = reference.compute_dtype(qkv.dtype)
    # (1, heads, N, N), contiguous: the sum with the shift mask then is too, which SDPA's CPU kernel wants (it
    # copied the permuted sum, window by window, at every call).
    bias = rel_pos_bias_table.to(ct)[rel_index].view(n, n, num_heads).permute(2, 0, 1).contiguous()[None]
    if shift is not None:
        bias = bias + shift.to(ct)
    if mask is not None:
        mask = mask.to(ct)
        if mask.shape[0] != bsz * windows:  # window g takes mask g mod M
            mask = mask[torch.arange(bsz * windows, device=qkv.device) % mask.shape[0]]
        bias = (bias.expand(bsz, windows, -1, -1, -1) + mask.view(bsz, windows, 1, n, n)).view(
            bsz * windows, num_heads, n, n)  # one sum, no copy of the expanded bias
    if bias.shape[0] not in (1, bsz * windows):  # (windows, heads, N, N): the same for every image
        bias = bias.expand(bsz, -1, -1, -1, -1).reshape(bsz * windows, num_heads, n, n)
    result = attention(q, k, v, bias.to(qkv.dtype), scale=scale, dropout_p=dropout_p, return_lse=return_lse)
    out = result[0] if return_lse else result
    # (B·windows, heads, N, head_dim) -> the map: one gather by (window, token) of each map position.
    if gather is None:
        out = out.transpose(1, 2).reshape(bsz, h, w, c)
    else:
        win = (torch.arange(bsz, device=qkv.device) * windows)[:, None] + scatter[:, 0]
        out = out.transpose(1, 2)[win, scatter[:, 1]].reshape(bsz, h, w, c)
    return (out, result[1]) if return_lse else out


# --------------------------------------------------------------------------------------------------
# highres
# --------------------------------------------------------------------------------------------------

# Elements of match_tokens' score block (B, Na, chunk), all of the score matrix that exists at once (16 MiB in
# float32): O(N) memory, and one matmul up to Na = Nb = 2048 (4096 tokens), where chunking only cost time.
MATCH_BLOCK = 1 << 22


def patch_scores(images, patch_size, method="variance"):
    """:func:`fusedtx.reference.patch_scores` with pooling instead of unfolded copies: variance as
    E[x^2] - E[x]^2 from two average pools (accumulated about the image's mean, so the subtraction does not
    cancel), gradient energy from one shifted difference per axis with the cross-patch pairs zeroed."""
    p = patch_size
    b, c, h, w = images.shape
    gh, gw = h // p, w // p
    x = images[:, :, : gh * p, : gw * p]
    if x.dtype != torch.float64:
        x = x.float()
    if method == "variance":
        x = x - x.mean(dim=(-1, -2), keepdim=True)
        mean = F.avg_pool2d(x, p)
        var = F.avg_pool2d(x * x, p) - mean * mean
        return var.clamp_min_(0).mean(dim=1).reshape(b, gh * gw)
    pairs = max(p * (p - 1), 1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).square()
    dy = (x[..., 1:, :] - x[..., :-1, :]).square()
    dx[..., :, p - 1::p] = 0  # pairs straddling two patches (every pair of 1-pixel patches)
    dy[..., p - 1::p, :] = 0
    dx = F.pad(dx, (0, 1))
    dy = F.pad(dy, (0, 0, 0, 1))
    energy = F.avg_pool2d(dx + dy, p, divisor_override=1) / pairs
    return energy.mean(dim=1).reshape(b, gh * gw)


def gather_tokens(tokens, index, pos=None, prefix=None):
    """:func:`fusedtx.reference.gather_tokens`: one ``torch.gather`` per tensor (a shared position table is
    read through a broadcast view, never copied per image), then one concatenation with the prefix."""
    bsz, _, c = tokens.shape
    idx = index[:, :, None].expand(bsz, index.shape[1], c)
    rows = torch.gather(tokens, 1, idx)
    if pos is not None:
        picked = torch.gather(pos.expand(bsz, -1, -1), 1, idx)
        if rows.dtype in (torch.float16, torch.bfloat16) or picked.dtype != rows.dtype:
            ct = reference.compute_dtype(rows.dtype)
            rows = (rows.to(ct) + picked.to(ct)).to(tokens.dtype)
        else:
            rows = rows + picked
    if prefix is None:
        return rows
    return torch.cat([prefix.to(tokens.dtype), rows], dim=1)


# Adjacent columns per group in _row_max (measured on a 2-core CPU: 16 and 64 are slower, 32 fastest), and the
# narrowest score block it is used on (measured there: 1.15x torch.max at 512x512, ToMe's 1024 tokens, 2x with 8
# images; at 384 columns and below, for one image, its ops cost more than the scalar max they save).
MATCH_GROUP = 32
MATCH_GROUPED_WIDTH = 512


def _row_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.max(dim=-1)`` (values and the first index of each row's max), 3x faster on a CPU at 2048
    columns, where a max with indices is a scalar loop and ``amax`` is vectorized: the max of each group of
    ``MATCH_GROUP`` adjacent columns by ``amax``, then the indexed max over the groups (1/32 of the elements;
    the first group holding the row's max holds its first occurrence), then the argmax inside that group."""
    b, n, w = scores.shape
    if w < MATCH_GROUPED_WIDTH:
        return scores.max(dim=-1)
    if w % MATCH_GROUP:  # pad to whole groups with -inf, which never wins
        scores = F.pad(scores, (0, MATCH_GROUP - w % MATCH_GROUP), value=-math.inf)
    groups = scores.view(b * n, -1, MATCH_GROUP)
    best, group = groups.amax(dim=-1).max(dim=-1)
    inner = groups[torch.arange(b * n, device=scores.device), group].argmax(dim=-1)  # indexing: faster than gather
    return best.view(b, n), (group * MATCH_GROUP + inner).view(b, n)


def match_tokens(a, b, eps=1e-12):
    """:func:`fusedtx.reference.match_tokens` streaming over B in chunks of ``MATCH_BLOCK // (batch·Na)`` tokens
    with a running max and argmax (the earlier chunk keeps ties), so no (Na, Nb) matrix exists at once. Only
    B is normalized: dividing a row of scores by its A token's norm changes neither its argmax nor (up to
    rounding) the cosine, so the best score is divided once instead of every A feature."""
    ct = reference.compute_dtype(a.dtype)
    a = a.to(ct)
    bsz, na, _ = a.shape
    nb = b.shape[1]
    chunk = max(1, MATCH_BLOCK // max(1, bsz * na))
    best = idx = None
    for start in range(0, nb, chunk):
        bn = b[:, start:start + chunk].to(ct)
        bn = bn / torch.linalg.vector_norm(bn, dim=-1, keepdim=True).clamp_min(eps)  # F.normalize, less Python
        score, arg = _row_max(torch.bmm(a, bn.transpose(1, 2)))
        if best is None:
            best, idx = score, arg
        else:
            better = score > best
            best = torch.where(better, score, best)
            idx = torch.where(better, arg + start, idx)
    if best is None:  # Nb == 0
        raise ValueError("b must hold at least one token")
    return best / torch.linalg.vector_norm(a, dim=-1).clamp_min(eps), idx


def merge_weighted(xb, sb, xs, ss, dst):
    """:func:`fusedtx.reference.merge_weighted` as two ``scatter_add``: weighted sums and sizes, then one
    division."""
    ct = reference.compute_dtype(xb.dtype)
    c = xb.shape[-1]
    wsb, wss = sb.to(ct), ss.to(ct)
    acc = (xb.to(ct) * wsb[..., None]).scatter_add_(1, dst[..., None].expand(-1, -1, c), xs.to(ct) * wss[..., None])
    size = wsb.scatter_add(1, dst, wss)
    return (acc / size[..., None]).to(xb.dtype), size.to(sb.dtype)
