"""Compile the chosen kernel configs for sm_90a (H100) on a machine with no GPU and report resources.

    python -m fusedtx.bench.sm90_resources [family ...] [--out FILE.md]

For each config: registers per thread, stack and local memory (non-zero means spills), shared
memory, and whether the SASS uses Hopper's wgmma tensor-core instructions (HGMMA). Uses Triton's own
compiler and its bundled cuobjdump; no device is touched. Each family lists its launch configs in
``CONFIGS`` below (the ones its launcher picks for the shapes that matter).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sm90(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int,
                 num_stages: int = 3) -> dict[str, object]:
    """Compile ``fn`` for sm_90a; ``signature`` maps every argument to a Triton type (``"*bf16"``,
    ``"i32"``, ``"fp32"``, ``"constexpr"``), ``constexprs`` gives the constexpr values."""
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    # A real launch tells the compiler which pointers are 16-byte aligned (torch's allocations are) and
    # which integers are multiples of 16 (strides of the usual shapes); without the same hints the build
    # would use narrow loads and more registers than the real one.
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in signature.items()
               if t.startswith("*") or (k.startswith("stride") and t == "i32")}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared": int(fields["SHARED"]) + compiled.metadata.shared,
        "hgmma": "HGMMA" in sass,
        "spills": int(fields["STACK"]) > 0 or int(fields["LOCAL"]) > 0,
    }


def _layer_norm_gelu_configs():
    from fusedtx.kernels import layer_norm_gelu as k

    fwd_sig = {n: "i32" for n in k._layer_norm_gelu_fwd_kernel.arg_names}
    bwd_sig = {n: "i32" for n in k._layer_norm_gelu_bwd_kernel.arg_names}
    for dtype in ("bf16", "fp32"):
        ptr = f"*{dtype}"
        fwd_sig.update(X=ptr, R=ptr, W=ptr, B=ptr, Y=ptr, S=ptr, Mean="*fp32", Rstd="*fp32", eps="fp32")
        bwd_sig.update(DY=ptr, DS=ptr, X=ptr, W=ptr, B=ptr, Mean="*fp32", Rstd="*fp32", DX=ptr,
                       DW="*fp32", DB="*fp32")
        for n in (96, 768, 1280, 4096, 8192, 16384, 65536):
            for residual in (False, True):
                bm, bn, single, warps = k._config(n, k.fwd_tile(2 if dtype == "bf16" else 4))
                consts = dict(ACT=1, HAS_RES=residual, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_N=bn,
                              SINGLE=single, stride_xn=1, stride_rn=1)
                sig = {**fwd_sig, **{c: "constexpr" for c in consts}}
                name = f"fwd {dtype} N={n}{' +residual' if residual else ''} [{bm}x{bn} w{warps}]"
                yield name, k._layer_norm_gelu_fwd_kernel, sig, consts, warps
            bm, bn, single, warps = k._config(n, k.BWD_TILE)
            consts = dict(ACT=1, HAS_DS=False, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_N=bn, SINGLE=single,
                          stride_dyn=1, stride_dsn=1, stride_xn=1)
            sig = {**bwd_sig, **{c: "constexpr" for c in consts}}
            yield f"bwd {dtype} N={n} [{bm}x{bn} w{warps}]", k._layer_norm_gelu_bwd_kernel, sig, consts, warps


def _attention_configs():
    import torch

    from fusedtx.kernels import attention as k

    kernels = {"fwd": k._attn_fwd_kernel, "dkdv": k._attn_bwd_dkdv_kernel, "dq": k._attn_bwd_dq_kernel,
               "dbias": k._attn_bwd_dbias_kernel}
    unit_strides = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_gd", "stride_xd", "stride_bn",
                    "stride_mn")
    # (kernel, dtype, head dim, bias, causal + key padding mask): every config with a bias, and the
    # heaviest variant (bias, padding mask, causal) of the bf16 ones.
    cases = [(kind, dtype, d, True, False) for dtype in ("bf16", "fp32") for d in (64, 80, 128, 256)
             for kind in ("fwd", "dkdv", "dq")]
    cases += [(kind, "bf16", d, True, True) for d in (64, 128) for kind in ("fwd", "dkdv", "dq", "dbias")]
    cases += [("fwd", "bf16", 64, False, False)]
    for kind, dtype, d, has_bias, masked in cases:
        fn = kernels[kind]
        ptr = f"*{dtype}"
        sig = {n: "i32" for n in fn.arg_names}
        sig.update({n: ptr for n in ("Q", "K", "V", "Bias", "Out", "DO", "DK", "DV", "DQ", "DBias")
                    if n in sig})
        sig.update({n: "*fp32" for n in ("Lse", "Delta") if n in sig})
        sig.update(KPM="*u8", qk_scale="fp32", **({"sm_scale": "fp32"} if "sm_scale" in sig else {}))
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        bm, bn, warps = k.configs(kind, d, torch_dtype, has_bias)
        consts = dict(HEAD_DIM=d, BLOCK_D=k.block_d(d), BLOCK_M=bm, BLOCK_N=bn, HAS_KPM=masked, CAUSAL=masked)
        consts.update({n: 1 for n in unit_strides if n in sig})
        if kind == "dbias":
            consts["SUM_ROWS"] = False
        else:
            consts["HAS_BIAS"] = has_bias
        sig.update({c: "constexpr" for c in consts})
        flags = "".join([" +bias" if has_bias else "", " +padding causal" if masked else ""])
        yield f"{kind} {dtype} D={d}{flags} [{bm}x{bn} w{warps}]", fn, sig, consts, warps


def _sinusoidal_configs():
    import math

    import torch

    from fusedtx.kernels import sinusoidal as k

    fn = k._sinusoidal_kernel
    cuda = torch.device("cuda")  # _config only reads the device type
    # (layouts table, layout, dim, fused add, position ids): the 1D and 2D layouts at ViT / LLM widths.
    cases = [(k.LAYOUTS_1D, "interleaved", d, add, add) for d in (768, 4096) for add in (False, True)]
    cases += [(k.LAYOUTS_1D, "concat", 1024, add, False) for add in (False, True)]
    cases += [(k.LAYOUTS_2D, layout, d, add, False) for layout in ("mae", "timm") for d in (768, 1024)
              for add in (False, True)]
    for dtype in ("bf16", "fp32"):
        for layouts, layout, d, add, has_pos in cases:
            slots = 1 if layouts is k.LAYOUTS_1D else 2
            nf = d // (2 * slots)
            code, first_is_col = layouts[layout]
            bt, bk, warps = k._config(4096, nf, cuda)
            sig = {n: "i32" for n in fn.arg_names}
            sig.update(X=f"*{dtype}", Y=f"*{dtype}", POS="*i64", offset="i64", inv_grid_w="fp32")
            consts = dict(NF=nf, SLOTS=slots, FREQ_LOG2=-math.log2(10000.0) / nf, LAYOUT=code,
                          FIRST_IS_COL=first_is_col, HAS_X=add, HAS_POS=has_pos, BLOCK_T=bt, BLOCK_K=bk, stride_xd=1)
            sig.update({c: "constexpr" for c in consts})
            what = ("add " if add else "generate ") + ("2D " if slots == 2 else "1D ") + layout
            yield f"{what} {dtype} D={d}{' +ids' if has_pos else ''} [{bt}x{bk} w{warps}]", fn, sig, consts, warps


def _window_attention_configs():
    from fusedtx.kernels import window_attention as k
    from fusedtx.kernels.support import window_fp32_backward_covers

    unit = ("stride_c", "stride_oc", "stride_gc", "stride_xc", "stride_t1", "stride_f", "stride_m2")
    # (kind, window, head dim): Swin's windows 7 and 8 (one tile: backward with dQ fused) and 12 and 16
    # (multi-block: backward plus the dQ kernel), head dims 32 (Swin) and 64.
    cases = [(kind, ws, d) for ws in (7, 8, 12, 16) for d in (32, 64) for kind in ("fwd", "bwd")]
    cases += [("dq", ws, d) for ws in (12, 16) for d in (32, 64)]
    for dtype in ("bf16", "fp32"):
        for kind, ws, d in cases:
            if kind == "bwd" and dtype == "fp32" and not window_fp32_backward_covers(ws * ws, d):
                continue  # not covered: the reference runs it
            fn = {"fwd": k._window_attn_fwd_kernel, "bwd": k._window_attn_bwd_kernel,
                  "dq": k._window_attn_bwd_dq_kernel}[kind]
            sig = {n: "i32" for n in fn.arg_names}
            sig.update({n: f"*{dtype}" for n in ("QKV", "Out", "DO", "DQKV") if n in sig})
            sig.update({n: "*fp32" for n in ("Table", "Fill", "Mask", "Lse", "DBias", "DFill") if n in sig})
            sig.update({n: "fp32" for n in ("qk_scale", "sm_scale") if n in sig})
            tokens = ws * ws
            bm, bn, warps = k.configs(kind, tokens)
            consts = dict(WH=ws, WW=ws, HEAD_DIM=d, BLOCK_D=k.block_d(d), BLOCK_N=bn, SHIFTED=True,
                          TORCHVISION=False, HAS_FILL=True, HAS_MASK=False)
            consts.update({n: 1 for n in unit if n in sig})
            if kind == "bwd":
                consts.update(BLOCK_Q=bm, FUSE_DQ=bn >= tokens, TABLE_GRAD=True, FILL_GRAD=True,
                              STAGES=k.BWD_STAGES)
            else:
                consts["BLOCK_M"] = bm
            sig.update({c: "constexpr" for c in consts})
            yield f"{kind} {dtype} window {ws} D={d} [{bm}x{bn} w{warps}]", fn, sig, consts, warps
    fn = k._table_grad_kernel
    for ws in (7, 16):
        consts = dict(WH=ws, WW=ws, BLOCK_Q=k.block_q(ws * ws), stride_t1=1)
        sig = {n: "i32" for n in fn.arg_names}
        sig.update(DBias="*fp32", DTable="*fp32", **{c: "constexpr" for c in consts})
        yield f"table grad window {ws} [w4]", fn, sig, consts, 4


# family -> generator of (label, kernel, signature, constexprs, num_warps)
CONFIGS = {
    "layer_norm_gelu": _layer_norm_gelu_configs,
    "attention": _attention_configs,
    "sinusoidal": _sinusoidal_configs,
    "window_attention": _window_attention_configs,
}


def report(families) -> str:
    lines = ["| family | config | regs | stack B | local B | shared B | HGMMA | spills |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for family in families:
        for label, fn, sig, consts, warps in CONFIGS[family]():
            r = compile_sm90(fn, sig, consts, warps)
            lines.append(f"| {family} | {label} | {r['regs']} | {r['stack']} | {r['local']} | {r['shared']} | "
                         f"{'yes' if r['hgmma'] else 'no'} | {'SPILLS' if r['spills'] else 'none'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", help=f"any of {list(CONFIGS)} (default: all)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    unknown = set(args.families) - set(CONFIGS)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {list(CONFIGS)}")
    table = report(args.families or list(CONFIGS))
    print(table)
    if args.out:
        Path(args.out).write_text(f"# sm_90a resource usage (Triton {triton.__version__}, compiled on CPU)\n\n"
                                  + table)


if __name__ == "__main__":
    main()
