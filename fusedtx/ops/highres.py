"""High-resolution inference's hot spots: patch scoring, token gather, bipartite matching, size-weighted merge.

Four ops (``patch_scores``, ``gather_tokens``, ``match_tokens``, ``merge_weighted``), each a custom op with a
fake giving the real strides and a Triton kernel behind ``fusedtx.ops.common.try_kernel``, and the two functional
pieces built on them that ``fusedtx.highres`` runs and users call directly:

* :func:`select_patches`: the k most important patches of an image batch (variance or gradient energy);
* :func:`merge_tokens`: one step of ToMe's bipartite soft matching (Bolya et al., 2023), size-weighted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedtx import _backend, reference
from fusedtx.kernels.support import HIGHRES_MAX_MATCH_DIM, HIGHRES_MAX_PATCH
from fusedtx.ops.common import (
    call,
    check_count,
    check_same_device,
    check_tensor,
    first_reason,
    implementation,
    kernels,
    try_kernel,
    unsupported_dtype,
    vjp,
)

_INDEX_DTYPES = (torch.int32, torch.int64)


def _check_index(name: str, index: Tensor, like: tuple[str, Tensor], shape: tuple[int, int]) -> None:
    if not isinstance(index, Tensor) or index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got "
                        f"{index.dtype if isinstance(index, Tensor) else type(index).__name__}")
    check_same_device(name, index, *like)
    if tuple(index.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(index.shape)}")


# --------------------------------------------------------------------------------------------------
# patch_scores
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedtx::patch_scores", mutates_args=())
def _patch_scores(images: Tensor, patch_size: int, method: str) -> Tensor:
    reason = first_reason(unsupported_dtype(images.dtype),
                          f"holds patches up to {HIGHRES_MAX_PATCH} pixels" if patch_size > HIGHRES_MAX_PATCH else None)
    done, impl = try_kernel("patch_scores", images.device, reason,
                            lambda: kernels("highres").patch_scores(images, patch_size, method))
    if impl is None:
        return done
    scores = impl.patch_scores(images, patch_size, method)
    return scores.to(reference.compute_dtype(images.dtype)).contiguous()


@_patch_scores.register_fake
def _(images, patch_size, method):
    b, _, h, w = images.shape
    return images.new_empty((b, (h // patch_size) * (w // patch_size)), dtype=reference.compute_dtype(images.dtype))


def patch_scores(images: Tensor, patch_size: int, method: str = "variance") -> Tensor:
    """(B, gh * gw) importance of every ``patch_size`` x ``patch_size`` patch of ``images`` (B, C, H, W), in one
    pass over the image (no unfolded copies): ``"variance"`` (pixel variance inside the patch) or
    ``"gradient"`` (mean squared difference of adjacent pixels inside the patch), averaged over channels.
    Row-major over the grid of whole patches (a remainder of H or W that is not a whole patch is ignored).
    float32 scores (float64 for float64 images); not differentiable."""
    check_tensor("images", images)
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (batch, channels, height, width), got shape {tuple(images.shape)}")
    check_count("patch_size", patch_size, 1)
    if method not in reference.PATCH_SCORES:
        raise ValueError(f"method must be one of {reference.PATCH_SCORES}, got {method!r}")
    if images.shape[-2] < patch_size or images.shape[-1] < patch_size:
        raise ValueError(f"images of {tuple(images.shape[-2:])} pixels hold no whole patch of {patch_size}")
    return call(_patch_scores, images.detach(), int(patch_size), method)


# --------------------------------------------------------------------------------------------------
# gather_tokens
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedtx::gather_tokens", mutates_args=())
def _gather_tokens(tokens: Tensor, index: Tensor, pos: Tensor | None, prefix: Tensor | None) -> Tensor:
    done, impl = try_kernel("gather_tokens", tokens.device, unsupported_dtype(tokens.dtype),
                            lambda: kernels("highres").gather_tokens(tokens, index, pos, prefix))
    return done if impl is None else impl.gather_tokens(tokens, index, pos, prefix).contiguous()


@_gather_tokens.register_fake
def _(tokens, index, pos, prefix):
    extra = prefix.shape[1] if prefix is not None else 0
    return tokens.new_empty((tokens.shape[0], extra + index.shape[1], tokens.shape[2]))


def _gather_setup(ctx, inputs, output):
    tokens, index, pos, prefix = inputs
    ctx.save_for_backward(tokens, index, pos, prefix)


def _gather_backward(ctx, grad):
    tokens, index, pos, prefix = ctx.saved_tensors
    impl = implementation("reference" if _backend.requested() == "reference" else "torch")
    wrt = (ctx.needs_input_grad[0], False, pos is not None and ctx.needs_input_grad[2],
           prefix is not None and ctx.needs_input_grad[3])
    if not any(wrt):
        return None, None, None, None
    dt, _, dp, dpre = vjp(impl.gather_tokens, (tokens, index, pos, prefix), wrt, grad)
    return dt, None, dp, dpre


_gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_tokens(tokens: Tensor, index: Tensor, pos: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
    """The kept tokens with their own position embeddings, after the prefix tokens, in one pass.

    Args:
        tokens: (B, N, C) patch tokens; any strides.
        index: (B, K) int32/int64 patch indices in [0, N) to keep (e.g. :func:`select_patches`).
        pos: optional (N, C), (1, N, C) or (B, N, C) position embeddings, added to each kept token (in fp32).
        prefix: optional (B, P, C) tokens (class / register tokens, position already added) put first.

    Returns:
        (B, P + K, C) in tokens' dtype, differentiable in tokens, pos and prefix.
    """
    check_tensor("tokens", tokens)
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be 3-D (batch, tokens, channels), got shape {tuple(tokens.shape)}")
    bsz, n, c = tokens.shape
    if not isinstance(index, Tensor) or index.dim() != 2 or index.shape[0] != bsz:
        raise ValueError(f"index must be a (B, K) = ({bsz}, K) integer tensor, got "
                         f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}")
    _check_index("index", index, ("tokens", tokens), (bsz, index.shape[1]))
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"index must lie in [0, {n}) (the token count), got [{int(index.min())}, {int(index.max())}]")
    if pos is not None:
        check_tensor("pos", pos, like=("tokens", tokens))
        pos = pos[None] if pos.dim() == 2 else pos
        if pos.dim() != 3 or pos.shape[0] not in (1, bsz) or tuple(pos.shape[1:]) != (n, c):
            raise ValueError(f"pos must have shape (N, C), (1, N, C) or (B, N, C) with N, C = {n}, {c}, "
                             f"got {tuple(pos.shape)}")
    if prefix is not None:
        check_tensor("prefix", prefix, like=("tokens", tokens))
        if prefix.dim() != 3 or prefix.shape[0] != bsz or prefix.shape[2] != c:
            raise ValueError(f"prefix must have shape (B, P, C) = ({bsz}, P, {c}), got {tuple(prefix.shape)}")
        prefix = prefix.to(tokens.dtype)
    return call(_gather_tokens, tokens, index.long(), pos, prefix)


# --------------------------------------------------------------------------------------------------
# match_tokens
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedtx::match_tokens", mutates_args=())
def _match_tokens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    reason = first_reason(unsupported_dtype(a.dtype), f"compares rows of up to {HIGHRES_MAX_MATCH_DIM} features"
                          if a.shape[-1] > HIGHRES_MAX_MATCH_DIM else None)
    done, impl = try_kernel("match_tokens", a.device, reason, lambda: kernels("highres").match_tokens(a, b))
    if impl is None:
        return done
    score, index = impl.match_tokens(a, b)
    return score.to(reference.compute_dtype(a.dtype)).contiguous(), index.long().contiguous()


@_match_tokens.register_fake
def _(a, b):
    shape = a.shape[:2]
    return a.new_empty(shape, dtype=reference.compute_dtype(a.dtype)), a.new_empty(shape, dtype=torch.int64)


def match_tokens(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """For each token of set A its most similar token of set B by cosine similarity: ``(score, index)``,
    each (B, Na) (float32 scores, int64 indices into Nb; the first index on ties). ``a`` (B, Na, D) and ``b``
    (B, Nb, D) of one dtype, any strides. Streams over B (no (Na, Nb) matrix is stored); not differentiable."""
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t, like=("a", a))
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (batch, tokens, features), got shape {tuple(t.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"a and b must have one dtype, got {a.dtype} and {b.dtype}")
    if b.shape[0] != a.shape[0] or b.shape[2] != a.shape[2]:
        raise ValueError(f"b must have shape (B, Nb, D) = ({a.shape[0]}, Nb, {a.shape[2]}), got {tuple(b.shape)}")
    if b.shape[1] < 1:
        raise ValueError("b must hold at least one token")
    return call(_match_tokens, a.detach(), b.detach())


# --------------------------------------------------------------------------------------------------
# merge_weighted
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fusedtx::merge_weighted", mutates_args=())
def _merge_weighted(xb: Tensor, sb: Tensor, xs: Tensor, ss: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    done, impl = try_kernel("merge_weighted", xb.device, unsupported_dtype(xb.dtype),
                            lambda: kernels("highres").merge_weighted(xb, sb, xs, ss, dst))
    if impl is None:
        return done
    x, s = impl.merge_weighted(xb, sb, xs, ss, dst)
    return x.contiguous(), s.contiguous()


@_merge_weighted.register_fake
def _(xb, sb, xs, ss, dst):
    return xb.new_empty(xb.shape), sb.new_empty(sb.shape)


def _merge_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _merge_backward(ctx, dx, ds):
    xb, sb, xs, ss, dst = ctx.saved_tensors
    impl = implementation("reference" if _backend.requested() == "reference" else "torch")
    wrt = tuple(ctx.needs_input_grad[:4]) + (False,)
    if not any(wrt):
        return None, None, None, None, None

    def forward(xb, sb, xs, ss, dst):
        x, s = impl.merge_weighted(xb, sb, xs, ss, dst)
        return x, s

    grads = vjp(forward, (xb, sb, xs, ss, dst), wrt, (dx, ds))
    return (*grads[:4], None)


_merge_weighted.register_autograd(_merge_backward, setup_context=_merge_setup)


def merge_weighted(xb: Tensor, sb: Tensor, xs: Tensor, ss: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted scatter-reduce of source tokens into destination tokens.

    Destination j becomes ``(sb_j xb_j + sum_{i: dst_i = j} ss_i xs_i) / (sb_j + sum ss_i)`` with size
    ``sb_j + sum ss_i`` (accumulated in fp32). ``xb`` (B, Nb, C) destinations and ``sb`` (B, Nb) their sizes,
    ``xs`` (B, R, C) sources and ``ss`` (B, R) theirs, ``dst`` (B, R) int indices into Nb. Returns
    ``(x (B, Nb, C) in xb's dtype, sizes (B, Nb) in sb's dtype)``; differentiable in the tokens and sizes."""
    check_tensor("xb", xb)
    if xb.dim() != 3:
        raise ValueError(f"xb must be 3-D (batch, tokens, channels), got shape {tuple(xb.shape)}")
    bsz, nb, c = xb.shape
    check_tensor("sb", sb, like=("xb", xb), shape=(bsz, nb))
    check_tensor("xs", xs, like=("xb", xb))
    if xs.dim() != 3 or xs.shape[0] != bsz or xs.shape[2] != c:
        raise ValueError(f"xs must have shape (B, R, C) = ({bsz}, R, {c}), got {tuple(xs.shape)}")
    if xs.dtype != xb.dtype:
        raise TypeError(f"xs must have xb's dtype {xb.dtype}, got {xs.dtype}")
    r = xs.shape[1]
    check_tensor("ss", ss, like=("xb", xb), shape=(bsz, r))
    if ss.dtype != sb.dtype:
        raise TypeError(f"ss must have sb's dtype {sb.dtype}, got {ss.dtype}")
    _check_index("dst", dst, ("xb", xb), (bsz, r))
    if dst.numel() and (int(dst.min()) < 0 or int(dst.max()) >= nb):
        raise ValueError(f"dst must lie in [0, {nb}) (the destination count)")
    return call(_merge_weighted, xb, sb, xs, ss, dst.long())


# --------------------------------------------------------------------------------------------------
# The functional pieces
# --------------------------------------------------------------------------------------------------


def _keep_count(k, n: int, name: str = "k") -> int:
    """``k`` (a count, or a fraction in (0, 1]) as a count of the ``n`` patches; ValueError naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{name} must be a patch count (int) or a fraction in (0, 1] (float), got {type(k).__name__}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"{name} as a fraction must lie in (0, 1], got {k}")
        return max(1, round(k * n))
    if k < 1:
        raise ValueError(f"{name} must keep at least 1 patch, got {k}")
    if k > n:
        raise ValueError(f"{name}={k} is larger than the {n} patches of this image")
    return k


def select_patches(images: Tensor, k: int | float, patch_size: int, score: str = "variance") -> Tensor:
    """The k most important patches of each image: (B, k) int64 patch indices, in raster order.

    ``k`` is a count (e.g. 196, the seed's example) or a fraction of the patches (0.25); ``score`` is
    ``"variance"`` or ``"gradient"`` (see :func:`patch_scores`). Gather the kept tokens with
    :func:`gather_tokens`, which also adds their own position embeddings."""
    scores = patch_scores(images, patch_size, score)
    return top_patches(scores, _keep_count(k, scores.shape[1]))


def top_patches(scores: Tensor, keep: int) -> Tensor:
    """(B, keep) indices of the highest ``scores`` (B, N) of each row, in raster (ascending) order."""
    if keep == scores.shape[1]:
        return torch.arange(keep, device=scores.device).expand(scores.shape[0], keep)
    return scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


def merge_tokens(x: Tensor, r: int, metric: Tensor | None = None, sizes: Tensor | None = None,
                 num_prefix_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """One step of ToMe's bipartite soft matching: merge ``r`` tokens of ``x`` away, size-weighted.

    The non-prefix tokens alternate into set A (even positions) and set B (odd). Each A token's edge is
    its most similar B token by cosine similarity of ``metric`` (default: x itself; ToMe uses the
    attention keys averaged over heads); the ``r`` A tokens with the most similar edges are merged into
    their B tokens as size-weighted averages; the other A tokens stay. Prefix tokens are never merged.

    Args:
        x: (B, N, C) tokens; metric: (B, N, D) or None; sizes: (B, N) token sizes (patches per token;
            None: all 1), float.
        r: tokens to remove, 0 <= r <= (N - num_prefix_tokens) // 2.
        num_prefix_tokens: leading tokens (class / register) left as they are.

    Returns:
        ``(x, sizes)``: (B, N - r, C) as [prefix, kept A tokens in order, B tokens in order], and their
        (B, N - r) sizes. Proportional attention uses ``log(sizes)`` as the attention key bias.
    """
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (batch, tokens, channels), got shape {tuple(x.shape)}")
    bsz, n, _ = x.shape
    check_count("num_prefix_tokens", num_prefix_tokens, 0)
    if num_prefix_tokens > n:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} exceeds the {n} tokens")
    check_count("r", r, 0)
    m = n - num_prefix_tokens
    if r > m // 2:
        raise ValueError(f"r={r} is too large: one step merges at most half of the {m} non-prefix tokens ({m // 2})")
    if sizes is None:
        sizes = x.new_ones((bsz, n), dtype=torch.float32)
    check_tensor("sizes", sizes, like=("x", x), shape=(bsz, n))
    if r == 0:
        return x, sizes
    if metric is None:
        metric = x
    check_tensor("metric", metric, like=("x", x))
    if metric.dim() != 3 or tuple(metric.shape[:2]) != (bsz, n):
        raise ValueError(f"metric must have shape (B, N, D) = ({bsz}, {n}, D), got {tuple(metric.shape)}")
    return merge_step(x, r, metric, sizes, num_prefix_tokens)


def merge_step(x: Tensor, r: int, metric: Tensor, sizes: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """:func:`merge_tokens` on checked arguments (r >= 1), calling the ops without their public checks: the
    loop inside a model takes this (the checks of a destination index would synchronize a GPU per block)."""
    xa, xb = x[:, p::2], x[:, p + 1::2]
    sa, sb = sizes[:, p::2], sizes[:, p + 1::2]
    score, match = call(_match_tokens, metric[:, p::2].detach(), metric[:, p + 1::2].detach())
    order = score.argsort(dim=1, descending=True)
    src, keep = order[:, :r], order[:, r:].sort(dim=1).values
    dst = match.gather(1, src)
    merged, merged_sizes = call(_merge_weighted, xb, sb, _rows(xa, src), sa.gather(1, src).to(sb.dtype), dst)
    # No empty prefix slice in the concatenations: a strided empty input takes torch.cat off its copy fast path.
    out = torch.cat([x[:, :p]] * bool(p) + [_rows(xa, keep), merged], dim=1)
    out_sizes = torch.cat([sizes[:, :p]] * bool(p) + [sa.gather(1, keep), merged_sizes], dim=1)
    return out, out_sizes


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b]] for every b: (B, K, C)."""
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[-1]))
