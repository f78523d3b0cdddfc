"""Ways to run a ViT trained at 224 px on a large image (1024 px: 4096 patches instead of 196).

``fusedtx.highres.apply(model, strategy, **settings)`` returns a :class:`HighResModel` wrapping a timm
``VisionTransformer`` (DeiT and ``dynamic_img_size`` included) or a Hugging Face ``ViTModel`` /
``ViTForImageClassification``; it takes images of any size (multiples of the patch size) and returns what
the wrapped model returns (timm: logits; Hugging Face: its output object). Strategies:

* ``full``: every patch; position embeddings resampled as the model's library does it (timm's
  ``resample_abs_pos_embed``, Hugging Face's ``interpolate_pos_encoding``).
* ``resize``: the image resized (bilinear, antialiased) to the model's native size.
* ``tiles``: overlapping native-size crops, ``stride`` apart (default 3/4 of the native size), run as one
  batch; pooled features and logits averaged over the crops.
* ``select``: adaptive patch selection. ``score="variance"`` or ``"gradient"``: keep the ``k`` patches of
  highest pixel variance / gradient energy (``k`` a count, default 196, or a fraction such as 0.25), gathered
  with their own position embeddings after the prefix tokens. ``score="attention"`` (EViT): run every patch
  up to block ``layer``, keep the ``k`` patch tokens the class token attends to most there, and fuse the rest
  into one token (their attention-weighted mean).
* ``merge``: ToMe's bipartite soft matching, ``r`` tokens per block (an int, or one per block; or
  ``flops=0.5`` picks the constant r that halves the FLOPs), size-weighted averages and proportional
  attention: log token sizes as ``fusedtx.attention``'s key bias.
* ``hybrid``: a timm hybrid CNN + ViT of the same width (``name=`` to choose) at the same resolution; a
  reference row with its own (random unless ``pretrained=True``) weights, not the wrapped model's.

Every strategy but ``hybrid`` takes ``pos``: ``"table"`` (default) adds the model's position table, resampled
as its library does it; ``"sincos"``, for a model whose table is a 2D sin-cos encoding (MAE-style fixed
encodings, checked at its native grid in each of ``fusedtx.sincos_2d``'s layouts), generates each token's
encoding from its patch coordinates with ``fusedtx.sincos_2d(positions=...)``: exact at any grid, and for
``select`` only the kept patches' encodings are computed (no table of the full grid).

The functional pieces are :func:`fusedtx.select_patches` and :func:`fusedtx.merge_tokens`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedtx import reference
from fusedtx.highres.models import Adapter, adapter_for
from fusedtx.ops.highres import _gather_tokens, _keep_count, _patch_scores, merge_step, top_patches
from fusedtx.ops.sinusoidal import sincos_2d

STRATEGIES = ("full", "resize", "tiles", "select", "merge", "hybrid")
SELECT_SCORES = ("variance", "gradient", "attention")
# timm hybrids by embedding width: a ResNet stem of output stride 32 (16 for tiny) and the ViT of that width.
HYBRIDS = {192: "vit_tiny_r_s16_p8_224", 384: "vit_small_r26_s32_224", 768: "vit_base_r26_s32_224",
           1024: "vit_large_r50_s32_224"}
POS_SOURCES = ("table", "sincos")
_SETTINGS = {"full": ("pos",), "resize": ("pos",), "tiles": ("stride", "pos"), "select": ("k", "score", "layer", "pos"),
             "merge": ("r", "flops", "proportional", "pos"), "hybrid": ("name", "pretrained")}


def block_flops(tokens: int, kept: int, dim: int, hidden: int) -> float:
    """FLOPs of one pre-norm ViT block whose attention sees ``tokens`` and whose MLP sees ``kept`` (2 per
    multiply-add): qkv and output projections, q·kᵀ and attention·v, the two MLP layers."""
    return 8.0 * tokens * dim * dim + 4.0 * tokens * tokens * dim + 4.0 * kept * dim * hidden


def merge_schedule(r, depth: int, patches: int) -> list[int]:
    """Per-block r for ``patches`` patch tokens; ValueError naming ``r`` when a block would merge more than
    half of the patch tokens it has (what one bipartite step can)."""
    rs = [r] * depth if isinstance(r, int) else list(r)
    left = patches
    for i, ri in enumerate(rs):
        if ri > left // 2:
            largest = max_constant_r(depth, patches)
            raise ValueError(f"r={r} is too large for {depth} blocks at {patches} patches: block {i} has {left} "
                             f"patch tokens and can merge at most {left // 2} (the largest constant r here is "
                             f"{largest})")
        left -= ri
    return rs


def max_constant_r(depth: int, patches: int) -> int:
    """The largest r that every one of ``depth`` blocks can merge, starting from ``patches`` tokens."""
    lo, hi = 0, patches // 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        left, ok = patches, True
        for _ in range(depth):
            if mid > left // 2:
                ok = False
                break
            left -= mid
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    return lo


def merge_flops(r: int | list[int], depth: int, patches: int, prefix: int, dim: int, hidden: int) -> float:
    """FLOPs of the blocks with ToMe merging ``r`` per block (merging sits between attention and MLP)."""
    n, total = patches + prefix, 0.0
    for ri in ([r] * depth if isinstance(r, int) else r):
        total += block_flops(n, n - ri, dim, hidden)
        n -= ri
    return total


def r_for_flops(fraction: float, depth: int, patches: int, prefix: int, dim: int, hidden: int) -> int:
    """The smallest constant r whose blocks cost at most ``fraction`` of the unmerged ones."""
    full = merge_flops(0, depth, patches, prefix, dim, hidden)
    for r in range(max_constant_r(depth, patches) + 1):
        if merge_flops(r, depth, patches, prefix, dim, hidden) <= fraction * full:
            return r
    raise ValueError(f"flops={fraction} cannot be reached by merging at {patches} patches over {depth} blocks (the "
                     f"largest r, {max_constant_r(depth, patches)}, leaves "
                     f"{merge_flops(max_constant_r(depth, patches), depth, patches, prefix, dim, hidden) / full:.2f})")


def tile_boxes(size: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left corners of native-size crops covering an image of ``size``: evenly spaced, at most ``stride``
    apart, the last one flush with the border."""
    def starts(n, t, s):
        if n <= t:
            return [0]
        count = math.ceil((n - t) / s) + 1
        return [round(i * (n - t) / (count - 1)) for i in range(count)]

    return [(y, x) for y in starts(size[0], tile[0], stride[0]) for x in starts(size[1], tile[1], stride[1])]


class HighResModel(nn.Module):
    """A ViT running one high-resolution strategy (made by :func:`apply`). ``forward(images)`` returns what the
    wrapped model returns; :meth:`features` returns ``(pooled features, logits or None)``; :meth:`tokens`
    the tokens each image's blocks see (the first block's)."""

    def __init__(self, model: nn.Module, strategy: str, adapter: Adapter | None, settings: dict,
                 sincos_layout: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.strategy = strategy
        self.settings = settings
        self._adapter = adapter
        self._sincos_layout = sincos_layout  # pos="sincos": the layout of the model's sin-cos table

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.settings.items())

    # -- the strategies --------------------------------------------------------------------------------

    def forward(self, images: Tensor):
        x, pooled, logits = self._run(images)
        if self.strategy == "hybrid":
            return logits
        return self._adapter.wrap(x, pooled, logits)

    def features(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C) pooled features and (B, classes) logits (None for a model without a head)."""
        _, pooled, logits = self._run(images)
        return pooled, logits

    def tokens(self, height: int, width: int) -> int:
        """Tokens per image entering the blocks (a tile run counts all its crops)."""
        if self.strategy == "hybrid":
            return self._hybrid_tokens(height, width)
        ad = self._adapter
        ph, pw = ad.patch_size
        if self.strategy == "resize":
            return ad.grid[0] * ad.grid[1] + ad.num_prefix
        if self.strategy == "tiles":
            boxes = tile_boxes((height, width), ad.native_size, self.settings["stride"])
            return len(boxes) * (ad.grid[0] * ad.grid[1] + ad.num_prefix)
        patches = (height // ph) * (width // pw)
        if self.strategy == "select" and self.settings["score"] != "attention":
            return _keep_count(self.settings["k"], patches) + ad.num_prefix
        return patches + ad.num_prefix

    def _run(self, images: Tensor):
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if self.strategy == "hybrid":
            return self._run_hybrid(images)
        ad = self._adapter
        if self.strategy == "resize":
            images = _resize(images, ad.native_size, antialias=True)
        elif self.strategy == "tiles":
            return self._run_tiles(images)
        ph, pw = ad.patch_size
        if images.shape[-2] % ph or images.shape[-1] % pw:
            raise ValueError(f"images must have a height and width divisible by the patch size {ad.patch_size}, "
                             f"got {tuple(images.shape[-2:])}")
        return self._run_tokens(images)

    def _run_tiles(self, images: Tensor):
        ad = self._adapter
        th, tw = ad.native_size
        boxes = tile_boxes(tuple(images.shape[-2:]), ad.native_size, self.settings["stride"])
        if images.shape[-2] < th or images.shape[-1] < tw:
            images = _resize(images, (max(th, images.shape[-2]), max(tw, images.shape[-1])), antialias=False)
        crops = torch.stack([images[:, :, y:y + th, x:x + tw] for y, x in boxes], dim=1)  # (B, T, C, th, tw)
        b, t = crops.shape[:2]
        x, pooled, logits = self._run_tokens(crops.flatten(0, 1))
        mean = (lambda v: v.unflatten(0, (b, t)).mean(dim=1) if v is not None else None)  # noqa: E731
        return mean(x), mean(pooled), mean(logits)

    def _run_tokens(self, images: Tensor):
        ad, s = self._adapter, self.settings
        patches, grid = ad.patch_tokens(images)
        # pos="sincos": only the prefix rows of the table, which no grid changes; the patches' come below.
        prefix_pos, pos = ad.pos_tables(ad.grid if self._sincos_layout else grid)
        pos = None if self._sincos_layout else pos
        batch, n = patches.shape[:2]
        prefix = ad.prefix(batch, prefix_pos)
        if self.strategy == "select" and s["score"] != "attention":
            keep = _keep_count(s["k"], n)
            index = top_patches(_patch_scores(images.detach(), ad.patch_size[0], s["score"]), keep)
        else:
            index = torch.arange(n, device=patches.device).expand(batch, n)
        if prefix is not None:
            prefix = prefix.to(patches.dtype)
        x = _gather_tokens(patches, index, pos.to(patches.dtype) if pos is not None else None, prefix)
        if self._sincos_layout:
            p = x.shape[1] - index.shape[1]
            x[:, p:] += sincos_2d(*grid, ad.embed_dim, positions=index, layout=self._sincos_layout)  # fp32, 1 rounding
        x = ad.pre_blocks(x)
        sizes = None
        if self.strategy == "merge":
            rs = s["r"] if s["r"] is not None else r_for_flops(s["flops"], ad.depth, n, ad.num_prefix, ad.embed_dim,
                                                               ad.mlp_hidden)
            rs = merge_schedule(rs, ad.depth, n)
            for i in range(ad.depth):
                if rs[i] == 0 and sizes is None:
                    x = ad.run_block(i, x)
                    continue
                bias = None
                if sizes is not None and s["proportional"]:
                    bias = sizes.log().to(x.dtype)[:, None, None, :]
                x, metric, _ = ad.attention_part(i, x, bias, False)
                if sizes is None:
                    sizes = x.new_ones(x.shape[:2], dtype=torch.float32)
                if rs[i]:
                    x, sizes = merge_step(x, rs[i], metric, sizes, ad.num_prefix)
                x = ad.mlp_part(i, x)
        elif self.strategy == "select" and s["score"] == "attention":
            layer, keep = s["layer"], _keep_count(s["k"], n)
            for i in range(ad.depth):
                if i != layer or keep == n:
                    x = ad.run_block(i, x)
                    continue
                x, _, cls = ad.attention_part(i, x, None, True)
                x = _evit_keep(x, cls, keep, ad.num_prefix)
                x = ad.mlp_part(i, x)
        else:
            for i in range(ad.depth):
                x = ad.run_block(i, x)
        return ad.outputs(x, sizes)

    # -- hybrid ------------------------------------------------------------------------------------------

    def _run_hybrid(self, images: Tensor):
        m = self.model
        x = m.forward_features(images)
        pooled = m.forward_head(x, pre_logits=True)
        return x, pooled, m.forward_head(x)

    def _hybrid_tokens(self, height: int, width: int) -> int:
        m = self.model
        with torch.no_grad():
            probe = torch.zeros(1, 3, height, width, device=next(m.parameters()).device,
                                dtype=next(m.parameters()).dtype)
            return int(m.patch_embed(probe).flatten(1, -2).shape[1]) + int(m.num_prefix_tokens)


def _resize(images: Tensor, size: tuple[int, int], antialias: bool) -> Tensor:
    """Bilinear resize computed in float32 (PyTorch's antialiased resize has no bfloat16 CPU kernel), returned in
    the images' dtype."""
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return out.to(images.dtype)


def _evit_keep(x: Tensor, cls: Tensor, keep: int, p: int) -> Tensor:
    """EViT's token reorganization: the prefix, the ``keep`` patch tokens of highest class attention (in
    order), and one token fusing the others (their class-attention-weighted mean)."""
    att = cls[:, p:]
    index = top_patches(att, keep)
    rest = torch.ones_like(att, dtype=torch.bool).scatter_(1, index, False)
    w = (att * rest).to(x.dtype)[..., None]
    fused = (x[:, p:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
    kept = torch.gather(x[:, p:], 1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :p], kept, fused], dim=1)


def _check_settings(strategy: str, settings: dict) -> None:
    unknown = set(settings) - set(_SETTINGS[strategy])
    if unknown:
        raise TypeError(f"strategy {strategy!r} takes the settings {list(_SETTINGS[strategy])}, got "
                        f"unknown {sorted(unknown)}")


def apply(model: nn.Module, strategy: str = "full", **settings) -> HighResModel:
    """A model running ``strategy`` on ``model`` (which it shares: no copy). See the module docstring for the
    strategies and their settings; bad settings raise ``ValueError``/``TypeError`` naming the setting."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_settings(strategy, settings)
    adapter = adapter_for(model)
    s = dict(settings)
    if strategy == "tiles":
        stride = s.get("stride") or tuple(3 * t // 4 for t in adapter.native_size)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        if len(stride) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in stride):
            raise ValueError(f"stride must be a positive int or a pair of them, got {settings.get('stride')!r}")
        s["stride"] = stride
    elif strategy == "select":
        s.setdefault("k", 196)
        s.setdefault("score", "variance")
        if s["score"] not in SELECT_SCORES:
            raise ValueError(f"score must be one of {SELECT_SCORES}, got {s['score']!r}")
        _keep_count(s["k"], 1 << 62)  # type and range (a count's upper bound needs the image)
        if s["score"] == "attention":
            s.setdefault("layer", max(adapter.depth // 4, 0))
            layer = s["layer"]
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < adapter.depth:
                raise ValueError(f"layer must be a block index in [0, {adapter.depth}), got {layer!r}")
            if not adapter.has_class_token:
                raise ValueError("score='attention' ranks tokens by the class token's attention; this model has no "
                                 "class token")
            adapter.check_split_blocks("select with score='attention'")
        elif "layer" in s:
            raise TypeError("layer is a setting of score='attention' only")
    elif strategy == "merge":
        r, flops = s.get("r"), s.get("flops")
        if (r is None) == (flops is None):
            raise ValueError("merge takes exactly one of r (tokens merged per block) or flops (a FLOPs fraction)")
        if r is not None:
            rs = [r] * adapter.depth if isinstance(r, int) and not isinstance(r, bool) else r
            if not isinstance(rs, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                                        for v in rs):
                raise ValueError(f"r must be a non-negative int or a list of them, got {r!r}")
            if len(rs) != adapter.depth:
                raise ValueError(f"r as a list must have one entry per block ({adapter.depth}), got {len(rs)}")
            native = adapter.grid[0] * adapter.grid[1]
            if sum(rs) >= native * 4 ** 3:  # beyond any image a ViT is run on: say so before the first call
                raise ValueError(f"r={r} is too large for the layer count: {adapter.depth} blocks would merge "
                                 f"{sum(rs)} tokens")
            s["r"] = r if isinstance(r, int) else list(r)
        elif isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops <= 1:
            raise ValueError(f"flops must be a fraction in (0, 1], got {flops!r}")
        s.setdefault("r", None)
        s.setdefault("flops", None)
        s.setdefault("proportional", True)
        if s["r"] != 0:
            adapter.check_split_blocks("merge")
    elif strategy == "hybrid":
        return _hybrid(model, adapter, s)
    pos = s.setdefault("pos", "table")
    if pos not in POS_SOURCES:
        raise ValueError(f"pos must be one of {POS_SOURCES}, got {pos!r}")
    return HighResModel(model, strategy, adapter, s, _sincos_layout(adapter) if pos == "sincos" else None)


def _sincos_layout(adapter: Adapter) -> str:
    """The layout of ``fusedtx.sincos_2d`` (base 10000) equal to the model's patch position table at its native
    grid; ValueError naming ``pos`` when there is none (a learned table, say)."""
    _, table = adapter.pos_tables(adapter.grid)
    if table is not None:
        atol = max(1e-5, 4 * torch.finfo(table.dtype).eps)  # a table stored in bf16 is rounded to its eps
        table = table.detach().reshape(adapter.grid[0] * adapter.grid[1], -1).double().cpu()
        for layout in reference.SINCOS_2D_LAYOUTS:
            if table.shape[-1] % 4 == 0 and torch.allclose(
                    table, reference.sincos_2d(*adapter.grid, table.shape[-1], layout=layout, dtype=torch.float64),
                    rtol=0.0, atol=atol):
                return layout
    found = "absent" if table is None else f"not one, in any of {reference.SINCOS_2D_LAYOUTS}"
    raise ValueError(f"pos='sincos' needs a model whose position table is a 2D sin-cos encoding (MAE-style); this "
                     f"model's is {found}")


def _hybrid(model: nn.Module, adapter: Adapter, s: dict) -> HighResModel:
    import timm

    name = s.get("name") or HYBRIDS.get(adapter.embed_dim)
    if name is None:
        raise ValueError(f"timm has no hybrid CNN+ViT of width {adapter.embed_dim} here; pass name= "
                         f"(one of {sorted(HYBRIDS.values())})")
    p = next(model.parameters())
    hybrid = timm.create_model(name, pretrained=bool(s.get("pretrained", False)), dynamic_img_size=True)
    hybrid = hybrid.to(device=p.device, dtype=p.dtype).train(model.training)
    s = {"name": name, "pretrained": bool(s.get("pretrained", False))}
    return HighResModel(hybrid, "hybrid", None, s)
