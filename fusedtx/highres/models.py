"""What the strategies need from a ViT, for each model library: its patch embedding, its position embeddings
resampled the library's own way, its prefix tokens, its blocks (whole, or split at the attention for token
merging and attention-based selection), and its head.

* :class:`TimmViT`: timm ``VisionTransformer`` and its subclasses that keep its layout (DeiT, distilled DeiT,
  DeiT-3, register tokens, ``dynamic_img_size``); position embeddings resampled with timm's
  ``resample_abs_pos_embed``, as ``dynamic_img_size`` does.
* :class:`HFViT`: Hugging Face ``ViTModel`` / ``ViTForImageClassification``; position embeddings from the
  model's own ``interpolate_pos_encoding``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusedtx.ops.attention import attention


def _class_names(model: nn.Module) -> list[str]:
    return [c.__name__ for c in type(model).__mro__]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def cls_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """(B, N): the class token's attention to every token, averaged over heads (EViT's importance). Only
    the first query row is computed: O(N) memory."""
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


class Adapter:
    """The common interface; see the module docstring."""

    library: str
    patch_size: tuple[int, int]
    native_size: tuple[int, int]
    num_prefix: int
    embed_dim: int
    depth: int
    mlp_hidden: int

    def check_split_blocks(self, why: str) -> None:
        """TypeError naming ``model`` unless every block can run split at its attention."""

    def patch_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        raise NotImplementedError

    def pos_tables(self, grid: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError

    def prefix(self, batch: int, prefix_pos: Tensor | None) -> Tensor | None:
        raise NotImplementedError


class TimmViT(Adapter):
    library = "timm"

    def __init__(self, model: nn.Module) -> None:
        self.model = m = model
        pe = m.patch_embed
        if not hasattr(pe, "proj") or not isinstance(pe.proj, nn.Conv2d):
            raise TypeError(f"model must be a ViT with a convolutional patch embedding; {type(m).__name__}'s "
                            f"patch_embed is {type(pe).__name__} (for a hybrid CNN stem use strategy='hybrid')")
        self.patch_size = _pair(pe.patch_size)
        self.native_size = _pair(pe.img_size) if pe.img_size is not None else (224, 224)
        self.grid = _pair(pe.grid_size) if getattr(pe, "grid_size", None) is not None else (
            self.native_size[0] // self.patch_size[0], self.native_size[1] // self.patch_size[1])
        self.num_prefix = int(m.num_prefix_tokens)
        self.has_class_token = getattr(m, "cls_token", None) is not None
        self.embed_dim = int(m.embed_dim)
        self.blocks = list(m.blocks)
        self.depth = len(self.blocks)
        mlp = self.blocks[0].mlp
        self.mlp_hidden = mlp.fc1.out_features if hasattr(mlp, "fc1") else 4 * self.embed_dim

    def check_split_blocks(self, why: str) -> None:
        for i, blk in enumerate(self.blocks):
            attn = getattr(blk, "attn", None)
            if type(blk).__name__ != "Block" or type(attn).__name__ != "Attention" or not hasattr(attn, "qkv"):
                raise TypeError(f"model: {why} runs timm's pre-norm Block with its Attention; block {i} is "
                                f"{type(blk).__name__} with {type(attn).__name__}")

    def patch_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        pe = self.model.patch_embed
        x = pe.proj(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        return pe.norm(x), grid

    def pos_tables(self, grid):
        m = self.model
        if m.pos_embed is None:
            return None, None
        from timm.layers import resample_abs_pos_embed

        p = 0 if m.no_embed_class else self.num_prefix
        table = m.pos_embed
        if tuple(grid) != self.grid:
            table = resample_abs_pos_embed(table, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=p)
        return (table[:, :p] if p else None), table[:, p:]

    def prefix(self, batch, prefix_pos):
        m = self.model
        parts = [t.expand(batch, -1, -1) for t in (getattr(m, "cls_token", None), getattr(m, "dist_token", None),
                                                    getattr(m, "reg_token", None)) if t is not None]
        if not parts:
            return None
        x = torch.cat(parts, dim=1)
        return x + prefix_pos if prefix_pos is not None else x

    def pre_blocks(self, x: Tensor) -> Tensor:
        return self.model.norm_pre(self.model.pos_drop(x))

    def run_block(self, i: int, x: Tensor) -> Tensor:
        return self.blocks[i](x)

    def attention_part(self, i: int, x: Tensor, bias: Tensor | None, need_cls: bool):
        """The block's attention half (x + attention(norm1 x)), its keys averaged over heads (ToMe's metric)
        and, when asked, the class token's attention (EViT's)."""
        blk = self.blocks[i]
        a = blk.attn
        y = blk.norm1(x)
        b, n, _ = y.shape
        gate = a.gate(y).sigmoid() if getattr(a, "gate", None) is not None else None
        q, k, v = a.qkv(y).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        o = attention(q, k, v, bias=bias, scale=a.scale)
        o = a.norm(o.transpose(1, 2).reshape(b, n, a.num_heads * a.head_dim))
        if gate is not None:
            o = o * gate
        x = x + blk.drop_path1(blk.ls1(a.proj_drop(a.proj(o))))
        return x, k.mean(dim=1), (cls_attention(q, k, a.scale, bias) if need_cls else None)

    def mlp_part(self, i: int, x: Tensor) -> Tensor:
        blk = self.blocks[i]
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def outputs(self, x: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor]:
        """(normed final tokens, pooled features, logits); merged tokens are pooled by size."""
        m = self.model
        x = m.norm(x)
        if sizes is not None and m.global_pool == "avg" and getattr(m, "attn_pool", None) is None:
            w = sizes[:, self.num_prefix:, None].to(x.dtype)
            pooled = (x[:, self.num_prefix:] * w).sum(1) / w.sum(1)
            pooled = m.head_drop(m.fc_norm(pooled))
            return x, pooled, m.head(pooled)
        pooled = m.forward_head(x, pre_logits=True)
        if type(m).forward_head.__qualname__ == "VisionTransformer.forward_head":
            return x, pooled, m.head(pooled)
        return x, pooled, m.forward_head(x)

    def wrap(self, x: Tensor, pooled: Tensor, logits: Tensor):
        return logits


class HFViT(Adapter):
    library = "transformers"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.vit = vit = model.vit if hasattr(model, "vit") else model
        emb = vit.embeddings
        self.emb = emb
        self.patch_size = _pair(emb.patch_size)
        self.native_size = _pair(emb.patch_embeddings.image_size)
        self.grid = (self.native_size[0] // self.patch_size[0], self.native_size[1] // self.patch_size[1])
        self.num_prefix = 1
        self.has_class_token = True
        self.embed_dim = int(emb.cls_token.shape[-1])
        self.blocks = list(vit.layers if hasattr(vit, "layers") else vit.encoder.layer)
        self.depth = len(self.blocks)
        self.mlp_hidden = int(vit.config.intermediate_size)

    def patch_tokens(self, images):
        x = self.emb.patch_embeddings.projection(images.to(self.emb.patch_embeddings.projection.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid

    def pos_tables(self, grid):
        gh, gw = grid
        table = self.emb.position_embeddings
        if tuple(grid) != self.grid:
            shape_only = table.new_zeros(()).expand(1, 1 + gh * gw, table.shape[-1])
            table = self.emb.interpolate_pos_encoding(shape_only, gh * self.patch_size[0], gw * self.patch_size[1])
        return table[:, :1], table[:, 1:]

    def prefix(self, batch, prefix_pos):
        return self.emb.cls_token.expand(batch, -1, -1) + prefix_pos

    def pre_blocks(self, x):
        return self.emb.dropout(x)

    def run_block(self, i, x):
        out = self.blocks[i](x)
        return out[0] if isinstance(out, tuple) else out

    def _projections(self, layer):
        att = layer.attention
        if hasattr(att, "q_proj"):  # transformers >= 5
            return att.q_proj, att.k_proj, att.v_proj, att.o_proj, att.num_attention_heads, att.head_dim, layer.dropout
        sa = att.attention  # transformers 4.x: ViTAttention(ViTSelfAttention, ViTSelfOutput)
        return sa.query, sa.key, sa.value, att.output.dense, sa.num_attention_heads, sa.attention_head_size, \
            att.output.dropout

    def attention_part(self, i, x, bias, need_cls):
        layer = self.blocks[i]
        wq, wk, wv, wo, heads, hd, drop = self._projections(layer)
        y = layer.layernorm_before(x)
        b, n, _ = y.shape
        q, k, v = (w(y).view(b, n, heads, hd).transpose(1, 2) for w in (wq, wk, wv))
        scale = hd**-0.5
        o = attention(q, k, v, bias=bias, scale=scale)
        x = x + drop(wo(o.transpose(1, 2).reshape(b, n, heads * hd)))
        return x, k.mean(dim=1), (cls_attention(q, k, scale, bias) if need_cls else None)

    def mlp_part(self, i, x):
        layer = self.blocks[i]
        y = layer.layernorm_after(x)
        if hasattr(layer, "mlp"):
            return x + layer.dropout(layer.mlp(y))
        return layer.output(layer.intermediate(y), x)  # transformers 4.x adds the residual itself

    def outputs(self, x, sizes):
        x = self.vit.layernorm(x)
        pooled = x[:, 0]
        classifier = getattr(self.model, "classifier", None)
        return x, pooled, (classifier(pooled) if classifier is not None else None)

    def wrap(self, x, pooled, logits):
        if hasattr(self.model, "classifier"):
            from transformers.modeling_outputs import ImageClassifierOutput

            return ImageClassifierOutput(logits=logits)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooler = getattr(self.vit, "pooler", None)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooler(x) if pooler is not None else None)


def adapter_for(model) -> Adapter:
    """The adapter of a supported ViT; TypeError naming ``model`` otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a timm VisionTransformer or a Hugging Face ViT), "
                        f"got {type(model).__name__}")
    names = _class_names(model)
    if "VisionTransformer" in names and hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return TimmViT(model)
    if "ViTModel" in names or "ViTForImageClassification" in names:
        return HFViT(model)
    raise TypeError(f"model must be a ViT: a timm VisionTransformer (DeiT and dynamic_img_size included) or a "
                    f"Hugging Face ViTModel / ViTForImageClassification, got {type(model).__name__}")
