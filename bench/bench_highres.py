"""High-resolution hot spots: fusedtx vs ToMe's algorithm in eager PyTorch (and torch.compile on a GPU).

    python -m fusedtx.bench.bench_highres [--out DIR] [--quick]
    python -m pytest bench/bench_highres.py --benchmark-only   # pytest-benchmark

Modes (the ``mode`` column):

* ``match``: for each token of set A (the even tokens) the most similar token of set B (the odd ones) by
  cosine similarity, on ToMe's metric (keys averaged over heads: D = 64). Work counted: 2·|A|·|B|·D FLOPs.
  Peer: ToMe's eager way, normalize, one |A| x |B| score matrix, ``max``. fusedtx streams over B (no
  matrix): the Triton kernel on a GPU, chunks of B on the CPU.
* ``merge step``: one whole ToMe step merging r = N/4 tokens (matching, ranking, size-weighted
  scatter-reduce) at C = 768: ``fusedtx.merge_tokens`` vs the same step written the eager ToMe way
  (``scatter_reduce``). Work counted as for ``match``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

import fusedtx
from fusedtx.bench.harness import FUSEDTX, Table, bench_main, default_device, measure_ceilings, synchronized
from fusedtx.ops.highres import match_tokens

GPU_TOKENS = [1024, 4096, 16384]
CPU_TOKENS = [1024, 4096]
QUICK_TOKENS = [197]
DIM, WIDTH = 64, 768


def tome_match(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's matching in eager PyTorch: the whole |A| x |B| cosine matrix, then its row max."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    return scores.max(dim=-1)


def tome_step(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int):
    """One ToMe step in eager PyTorch: match, rank the edges, merge the r best A tokens into B with a
    size-weighted ``scatter_reduce``."""
    node_max, node_idx = tome_match(metric)
    edge = node_max.argsort(dim=-1, descending=True)[..., None]
    unm, src = edge[..., r:, :], edge[..., :r, :]
    dst = node_idx[..., None].gather(dim=-2, index=src)
    xs = x * size[..., None]
    a, b = xs[..., ::2, :], xs[..., 1::2, :]
    sa, sb = size[..., ::2, None], size[..., 1::2, None]
    c = x.shape[-1]
    unm_x = a.gather(dim=-2, index=unm.expand(-1, -1, c))
    src_x = a.gather(dim=-2, index=src.expand(-1, -1, c))
    b = b.scatter_reduce(-2, dst.expand(-1, -1, c), src_x, reduce="sum")
    sb = sb.scatter_reduce(-2, dst, sa.gather(dim=-2, index=src), reduce="sum")
    unm_s = sa.gather(dim=-2, index=unm)
    out = torch.cat([unm_x, b], dim=1)
    sizes = torch.cat([unm_s, sb], dim=1)
    return out / sizes, sizes[..., 0]


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def run(out_dir, quick: bool = False, device: torch.device | None = None) -> Table:
    device = device or default_device()
    gpu = device.type == "cuda"
    table = Table("highres", "TFLOP/s", device, measure_ceilings(device))
    tokens = QUICK_TOKENS if quick else (GPU_TOKENS if gpu else CPU_TOKENS)
    for dtype in (torch.bfloat16, torch.float32) if gpu else (torch.float32,):
        for n in tokens:
            metric = torch.randn(1, n, DIM, device=device, dtype=dtype)
            work = 2.0 * (n - n // 2) * (n // 2) * DIM
            case = f"N={n} D={DIM}"
            a, b = metric[:, ::2], metric[:, 1::2]
            impls = {FUSEDTX: lambda a=a, b=b: match_tokens(a, b), "ToMe eager (|A|x|B| matrix)":
                     lambda m=metric: tome_match(m)}
            if gpu and not quick:
                impls["torch.compile(ToMe)"] = lambda m=metric: _compiled(tome_match)(m)
            for impl, fn in impls.items():
                table.time(case, dtype, "match", impl, fn, work, memory=gpu)
            x = torch.randn(1, n, WIDTH, device=device, dtype=dtype)
            size = torch.ones(1, n, device=device, dtype=torch.float32)
            size_x = size.to(dtype)
            r = n // 4
            case = f"N={n} C={WIDTH} r={r}"
            impls = {FUSEDTX: lambda x=x, m=metric, s=size, r=r: fusedtx.merge_tokens(x, r, metric=m, sizes=s),
                     "ToMe eager (scatter_reduce)": lambda x=x, m=metric, s=size_x, r=r: tome_step(x, m, s, r)}
            for impl, fn in impls.items():
                table.time(case, dtype, "merge step", impl, fn, work, memory=gpu)
    table.write(Path(out_dir))
    return table


def test_highres(benchmark):
    """pytest-benchmark entry: the matching at 4096 tokens."""
    device = default_device()
    metric = torch.randn(1, 4096, DIM, device=device)
    benchmark(synchronized(lambda: match_tokens(metric[:, ::2], metric[:, 1::2]), device))


def main(argv=None) -> None:
    bench_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
