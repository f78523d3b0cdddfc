"""Swin window attention, the whole path from the block's normed input to proj (qkv Linear, cyclic shift,
padding, partition, attention with relative position bias and shift mask, reverse, crop, un-shift, proj):
fusedtx vs timm eager, timm with its fused (SDPA) path on, torchvision, FlexAttention (bias as score_mod,
shift regions as a block mask) and torch.compile of timm's eager path.

    python -m fusedtx.bench.bench_window_attention [--out DIR] [--quick]
    python -m pytest bench/bench_window_attention.py --benchmark-only   # pytest-benchmark

FLOPs counted: the Linears (8·T·C² for T = B·H·W tokens) plus attention over the padded windows
(4·windows·heads·N²·head_dim), forward; fwd+bwd counts 3x. Peak memory is what one call allocates above
its inputs. A peer that cannot run a case shows as n/a with its error (SDPA beyond 65,535 batch·heads,
out of memory). FlexAttention's block mask is a hard mask where the stock modules add -100 (the same
probabilities to fp32 precision, exp(-100) ~ 4e-44).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fusedtx import nn as fnn
from fusedtx import reference
from fusedtx.bench.harness import FUSEDTX, Table, bench_main, default_device, measure_ceilings, synchronized

# (name, B, H, W, C, heads, window): stage shapes of Swin-T (C 96, heads 3..24) and Swin-B (C 128, heads
# 4..32), all shifted blocks (shift = window // 2). The headline case first: the table is rewritten after
# every case, so a run stopped by its time limit still leaves the cases it finished.
GPU_CASES = [
    ("Swin-T 1024 stage 1", 16, 256, 256, 96, 3, 7),  # 65,712 batch·heads: past SDPA's grid limit
    ("Swin-T 224 stage 1", 64, 56, 56, 96, 3, 7),
    ("Swin-T 1024 stage 2", 16, 128, 128, 192, 6, 7),
    ("Swin-B 1024 stage 1", 8, 256, 256, 128, 4, 7),
    ("Swin-T 224 stage 3", 64, 14, 14, 384, 12, 7),
    ("Swin-B 224 stage 2", 64, 28, 28, 256, 8, 7),
]
CPU_CASES = [("tiny", 1, 4, 6, 16, 1, 4)]  # two windows, shifted along W only (timm clamps H)


def _timm_block(c, h, w, heads, window, fused, device, dtype):
    from timm.models.swin_transformer import SwinTransformerBlock

    block = SwinTransformerBlock(c, (h, w), heads, window_size=window, shift_size=window // 2)
    block.attn.fused_attn = fused
    return block.to(device=device, dtype=dtype)


def _flex_path(block):
    """timm's path with the attention computed by FlexAttention (compiled)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attn = block.attn
    (wh, ww), (sh, sw), heads = block.window_size, block.shift_size, attn.num_heads
    n = wh * ww
    index = reference.relative_position_index((wh, ww), attn.qkv.weight.device)
    flex = torch.compile(flex_attention)

    @functools.cache
    def block_mask(batch, hp, wp):
        ids = reference.shift_mask((hp, wp), (wh, ww), (sh, sw), device=index.device) == 0  # (nW, N, N)
        windows = ids.shape[0]
        return create_block_mask(lambda b, h, q, kv: ids[b % windows, q, kv], batch, None, n, n,
                                 device=index.device)

    def run(x):
        bsz, h, w, c = x.shape
        x = torch.roll(x, (-sh, -sw), (1, 2))
        x = F.pad(x, (0, 0, 0, (-w) % ww, 0, (-h) % wh))
        hp, wp = x.shape[1:3]
        x = x.view(bsz, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        q, k, v = attn.qkv(x).view(x.shape[0], n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        table = attn.relative_position_bias_table

        def bias(score, b, hd, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], hd]

        o = flex(q, k, v, score_mod=bias, block_mask=block_mask(x.shape[0], hp, wp))
        o = attn.proj(o.transpose(1, 2).reshape(x.shape[0], n, -1))
        o = o.view(bsz, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(bsz, hp, wp, c)
        return torch.roll(o[:, :h, :w], (sh, sw), (1, 2))

    return run


def implementations(c, h, w, heads, window, device, dtype) -> dict:
    """The whole attention path of one shifted Swin block, per implementation (same weights)."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    eager = _timm_block(c, h, w, heads, window, False, device, dtype)
    sdpa = _timm_block(c, h, w, heads, window, True, device, dtype)
    sdpa.load_state_dict(eager.state_dict())
    tv = ShiftedWindowAttention(c, [window] * 2, [window // 2] * 2, heads).to(device=device, dtype=dtype)
    tv.load_state_dict(eager.attn.state_dict(), strict=False)
    impls = {
        FUSEDTX: fnn.SwinBlockAttention.from_module(eager),
        "timm eager": eager._attn,
        "timm fused_attn (SDPA)": sdpa._attn,
        "torchvision": tv,
    }
    if device.type == "cuda":  # compiling on the CPU takes minutes
        impls["FlexAttention (compiled)"] = _flex_path(eager)
        impls["torch.compile(timm eager)"] = torch.compile(eager._attn)
    return impls


def _parameters(impls: dict) -> list[torch.Tensor]:
    """Every parameter behind the implementations, once: each is an nn.Module or a bound method of one
    (timm's ``_attn``); the FlexAttention closure and the compiled ``_attn`` use the eager block's."""
    owners = [fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None) for fn in impls.values()]
    params = {id(p): p for m in owners if isinstance(m, torch.nn.Module) for p in m.parameters()}
    return list(params.values())


def _step(fn, x, dy, backward: bool, grads: list[torch.Tensor] = ()):
    """One forward (inference, no autograd graph) or one forward and backward (x and weight gradients).
    The backward first sets the .grad of x and of ``grads`` to None, so that it allocates fresh gradients
    (counted in peak memory) instead of accumulating into the last call's."""
    if not backward:
        return torch.no_grad()(lambda: fn(x))

    def run():
        x.grad = None
        for t in grads:
            t.grad = None
        fn(x).backward(dy)

    return run


def flops(b, h, w, c, heads, window, backward: bool) -> float:
    windows = b * -(-h // window) * -(-w // window)
    fwd = 8 * b * h * w * c * c + 4 * windows * window**4 * c  # heads · head_dim = c
    return fwd * (3 if backward else 1)


def run(out_dir, quick: bool = False, device: torch.device | None = None) -> Table:
    device = device or default_device()
    gpu = device.type == "cuda"
    table = Table("window_attention", "TFLOP/s", device, measure_ceilings(device))
    cases = GPU_CASES if gpu else CPU_CASES
    if quick:
        cases = cases[:1]
    dtype = torch.bfloat16 if gpu else torch.float32
    for name, b, h, w, c, heads, window in cases:
        x = torch.randn(b, h, w, c, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        impls = implementations(c, h, w, heads, window, device, dtype)
        params = _parameters(impls)
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            for impl, fn in impls.items():
                work = flops(b, h, w, c, heads, window, backward)
                table.time(f"{name} B={b} {h}x{w} C={c} heads={heads} w={window}", dtype, mode, impl,
                           _step(fn, x, dy, backward, params), work, memory=True)
        del x, dy, impls, params
        table.write(out_dir)
    return table


def test_window_attention(benchmark):
    """pytest-benchmark entry: Swin-T stage 1 at 224 px (a tiny map on the CPU), fused forward."""
    device = default_device()
    name, b, h, w, c, heads, window = GPU_CASES[1] if device.type == "cuda" else CPU_CASES[0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fused = implementations(c, h, w, heads, window, device, dtype)[FUSEDTX]
    x = torch.randn(b, h, w, c, device=device, dtype=dtype)
    with torch.no_grad():
        benchmark(synchronized(lambda: fused(x), device))


def main(argv=None) -> None:
    bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
