"""Compile the chosen kernel configs for sm_90a (H100) on a machine with no GPU and report resources.

    python -m bench.sm90_resources [family ...] [--out FILE.md]

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
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
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
                bm, bn, single, warps = k._config(n, k.FWD_TILE)
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


# family -> generator of (label, kernel, signature, constexprs, num_warps)
CONFIGS = {
    "layer_norm_gelu": _layer_norm_gelu_configs,
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
