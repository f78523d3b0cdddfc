"""Compile the launch configs for several NVIDIA targets on a machine with no GPU and report their resources.

    python -m fusedtx.bench.resources [--arch 80,86,89,90a,100a,120] [family ...] [--out-dir bench/results]

For each target, the configs the launchers pick there (``configs(..., family=...)`` of each kernel file, the
family of the target's compute capability) are compiled with Triton's own compiler and read with its bundled
cuobjdump: registers per thread, stack and local memory (non-zero means spills), shared memory against the
target's per-block limit (``fusedtx.kernels.support.SHARED_MEMORY_PER_BLOCK``), and which tensor-core
instruction the SASS uses (HGMMA is Hopper's wgmma, UTC*MMA Blackwell's tcgen05, HMMA the mma.sync of every
architecture). No device is touched. A config that spills is listed again with the alternatives compiled for
it (the kernel's ``candidates``). The last lines are one summary per target:

    sm_89: 73 configs, 0 over the shared-memory limit, 0 spill

The committed tables (``bench/results/resources-sm_*.md``) come from
``python -m fusedtx.bench.resources --out-dir bench/results``; ``tests/test_resources.py`` recompiles the
largest configs of each table (and the largest with an attention mask) and checks that every table still lists
the configs the launchers pick.
"""

from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedtx.kernels.support import arch_family, shared_memory_per_block

# --arch name -> compute capability (Triton compiles 90 as sm_90a and 100 as sm_100a)
TARGETS = {"80": 80, "86": 86, "89": 89, "90a": 90, "100a": 100, "120": 120}
CARDS = {"80": "A100, A800, A30", "86": "A10, A40, RTX 30xx", "89": "L4, L40S, RTX 4090", "90a": "H100, H200",
         "100a": "B200, GB200", "120": "RTX 50xx, RTX PRO 6000 Blackwell"}


class Case(NamedTuple):
    label: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    alternatives: tuple = ()  # (label, constexprs, num_warps, num_stages) of the candidates for this case


def target_name(arch: str) -> str:
    return f"sm_{arch}"


def capability(arch: str) -> tuple[int, int]:
    cc = TARGETS[arch]
    return cc // 10, cc % 10


def family_of(arch: str) -> str:
    return arch_family(capability(arch))


def shared_limit(arch: str) -> int:
    return shared_memory_per_block(capability(arch))


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_for(arch: str, fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int,
                num_stages: int = 3) -> dict[str, object]:
    """Compile ``fn`` for target ``arch`` (a key of TARGETS); ``signature`` maps every argument to a Triton
    type (``"*bf16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``), ``constexprs`` gives the constexpr values."""
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    # A real launch tells the compiler which pointers are 16-byte aligned (torch's allocations are) and
    # which integers are multiples of 16 (strides of the usual shapes); without the same hints the build
    # would use narrow loads and more registers than the real one.
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in signature.items()
               if t.startswith("*") or (k.startswith("stride") and t == "i32")}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[arch], 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    mma = next((name for name, pattern in (("HGMMA", r"\bHGMMA"), ("tcgen05", r"\bUTC\w*MMA"), ("HMMA", r"\bHMMA"))
                if re.search(pattern, sass)), "none")
    shared = int(fields["SHARED"]) + compiled.metadata.shared
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared": shared,
        "mma": mma,
        "spills": int(fields["STACK"]) > 0 or int(fields["LOCAL"]) > 0,
        "over": shared > shared_limit(arch),
    }


def _config_label(config) -> str:
    bm, bn, warps, stages = config
    return f"[{bm}x{bn} w{warps} s{stages}]"


def _layer_norm_gelu_configs(family: str, shared: int):
    del family  # the same configs on every architecture
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
                yield Case(name, k._layer_norm_gelu_fwd_kernel, sig, consts, warps)
            bm, bn, single, warps = k._config(n, k.BWD_TILE)
            consts = dict(ACT=1, HAS_DS=False, HAS_W=True, HAS_B=True, BLOCK_M=bm, BLOCK_N=bn, SINGLE=single,
                          stride_dyn=1, stride_dsn=1, stride_xn=1)
            sig = {**bwd_sig, **{c: "constexpr" for c in consts}}
            yield Case(f"bwd {dtype} N={n} [{bm}x{bn} w{warps}]", k._layer_norm_gelu_bwd_kernel, sig, consts, warps)


def _sinusoidal_configs(family: str, shared: int):
    del family  # the same configs on every architecture
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
            yield Case(f"{what} {dtype} D={d}{' +ids' if has_pos else ''} [{bt}x{bk} w{warps}]", fn, sig, consts, warps)


_ATTENTION_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_gd", "stride_xd",
                           "stride_bn", "stride_mn")


def _precision_label(dtype: str, precision: str) -> str:
    """The dtype of a build's label, with the dot precision for float32 ("fp32 ieee": TF32 off)."""
    return f"{dtype} {precision}" if dtype == "fp32" else dtype


def _attention_case(kind: str, dtype: str, d: int, has_bias: bool, masked: bool, config,
                    precision: str = "tf32") -> tuple:
    """(label, kernel, signature, constexprs, num_warps, num_stages) of one attention kernel build
    (``precision``: of float32 dots, "tf32" or "ieee")."""
    from fusedtx.kernels import attention as k

    fn = {"fwd": k._attn_fwd_kernel, "dkdv": k._attn_bwd_dkdv_kernel, "dq": k._attn_bwd_dq_kernel,
          "dbias": k._attn_bwd_dbias_kernel}[kind]
    ptr = f"*{dtype}"
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({n: ptr for n in ("Q", "K", "V", "Bias", "Out", "DO", "DK", "DV", "DQ", "DBias") if n in sig})
    sig.update({n: "*fp32" for n in ("Lse", "Delta") if n in sig})
    sig.update(KPM="*u8", qk_scale="fp32", **({"sm_scale": "fp32"} if "sm_scale" in sig else {}))
    bm, bn, warps, stages = config
    consts = dict(HEAD_DIM=d, BLOCK_D=k.block_d(d), BLOCK_M=bm, BLOCK_N=bn, HAS_KPM=masked, CAUSAL=masked,
                  PRECISION=precision)
    consts.update({n: 1 for n in _ATTENTION_UNIT_STRIDES if n in sig})
    if kind == "dbias":
        consts["SUM_ROWS"] = False
    else:
        consts["HAS_BIAS"] = has_bias
    sig.update({c: "constexpr" for c in consts})
    flags = "".join([" +bias" if has_bias else "", " +padding causal" if masked else ""])
    label = f"{kind} {_precision_label(dtype, precision)} D={d}{flags} {_config_label(config)}"
    return label, fn, sig, consts, warps, stages


def attention_cases() -> list[tuple]:
    """(kernel, dtype, dot precision, head dim, bias, causal + key padding mask): every config with a bias, float32
    in both dot precisions (tf32, and ieee: PyTorch's default, TF32 off), and the heaviest variant (bias,
    padding mask, causal) of the bf16 ones."""
    cases = [(kind, dtype, precision, d, True, False)
             for dtype, precision in (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")) for d in (64, 80, 128, 256)
             for kind in ("fwd", "dkdv", "dq")]
    cases += [("dbias", "fp32", "ieee", d, True, False) for d in (64, 128, 256)]
    cases += [(kind, "bf16", "tf32", d, True, True) for d in (64, 128) for kind in ("fwd", "dkdv", "dq", "dbias")]
    cases += [("fwd", "bf16", "tf32", 64, False, False)]
    return cases


def _attention_configs(family: str, shared: int):
    import torch

    from fusedtx.kernels import attention as k

    for kind, dtype, precision, d, has_bias, masked in attention_cases():
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        config = k.configs(kind, d, torch_dtype, has_bias, family=family, precision=precision)
        label, fn, sig, consts, warps, stages = _attention_case(kind, dtype, d, has_bias, masked, config, precision)
        alternatives = tuple(_attention_case(kind, dtype, d, has_bias, masked, c, precision)
                             for c in k.candidates(kind, d, torch_dtype, has_bias, family=family, precision=precision)
                             if c != config)
        yield Case(label, fn, sig, consts, warps, stages, alternatives)


_WINDOW_UNIT_STRIDES = ("stride_c", "stride_oc", "stride_gc", "stride_xc", "stride_t1", "stride_f", "stride_m2")


def _window_case(kind: str, dtype: str, ws: int, d: int, config, cosine: bool = False,
                 precision: str = "tf32", has_mask: bool = False) -> tuple:
    """(label, kernel, signature, constexprs, num_warps, num_stages) of one window attention kernel build
    (``cosine``: Swin V2's, q and k normalized in the kernel; ``precision``: of float32 dots; ``has_mask``: with
    an attention mask, as Hugging Face's Swin and torchvision's partitioned windows pass)."""
    from fusedtx.kernels import window_attention as k

    fn = {"fwd": k._window_attn_fwd_kernel, "bwd": k._window_attn_bwd_kernel,
          "dq": k._window_attn_bwd_dq_kernel}[kind]
    sig = {n: "i32" for n in fn.arg_names}
    sig.update({n: f"*{dtype}" for n in ("QKV", "Out", "DO", "DQKV") if n in sig})
    sig.update({n: "*fp32" for n in ("Table", "Fill", "Mask", "Scale", "Lse", "DBias", "DFill", "DScale") if n in sig})
    sig.update({n: "fp32" for n in ("qk_scale", "sm_scale") if n in sig})
    tokens = ws * ws
    bm, bn, warps, stages = config
    consts = dict(WH=ws, WW=ws, HEAD_DIM=d, BLOCK_D=k.block_d(d), BLOCK_N=bn, SHIFTED=True,
                  TORCHVISION=False, HAS_FILL=True, HAS_MASK=has_mask, COSINE=cosine, PRECISION=precision)
    consts.update({n: 1 for n in _WINDOW_UNIT_STRIDES if n in sig})
    if kind == "bwd":
        consts.update(BLOCK_Q=bm, FUSE_DQ=bn >= tokens, TABLE_GRAD=True, FILL_GRAD=True, STAGES=stages)
    else:
        consts["BLOCK_M"] = bm
    sig.update({c: "constexpr" for c in consts})
    flags = "".join([" cosine" if cosine else "", " +mask" if has_mask else ""])
    label = f"{kind} {_precision_label(dtype, precision)} window {ws} D={d}{flags} {_config_label(config)}"
    return label, fn, sig, consts, warps, stages


def _window_attention_configs(family: str, shared: int):
    import torch

    from fusedtx.kernels import window_attention as k
    from fusedtx.kernels.support import window_fp32_backward_covers

    # Swin's windows 7 and 8 and the larger 12 and 16, head dims 32 (Swin) and 64, float32 in both dot
    # precisions (ieee: PyTorch's default, TF32 off); the dQ kernel wherever the backward's key blocks do not
    # cover the whole window. Swin V2's cosine variant (the same configs, a few more registers for the
    # normalization) at its windows 8, 12 and 16, head dim 32, in bfloat16 and in float32 with TF32 off. Then
    # both again at head dim 32 with an attention mask (" +mask": Hugging Face's Swin and Swin V2, torchvision's
    # partitioned windows), which take their own configs where they differ.
    dtypes = (("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee"))
    kinds = ("fwd", "bwd", "dq")
    plain = itertools.product(dtypes, kinds, (7, 8, 12, 16), (32, 64), (False,), (False,))
    v2 = itertools.product((dtypes[0], dtypes[2]), kinds, (8, 12, 16), (32,), (True,), (False,))
    masked = itertools.product(dtypes, kinds, (7, 8, 12, 16), (32,), (False,), (True,))
    masked_v2 = itertools.product((dtypes[0], dtypes[2]), kinds, (8, 12, 16), (32,), (True,), (True,))
    for (dtype, precision), kind, ws, d, cosine, has_mask in itertools.chain(plain, v2, masked, masked_v2):
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        tokens = ws * ws
        if kind != "fwd" and dtype == "fp32" and not window_fp32_backward_covers(tokens, d, shared):
            continue  # not covered on this target: the fast PyTorch path runs it
        pick = dict(family=family, precision=precision, has_mask=has_mask)
        if kind == "dq" and k.configs("bwd", tokens, d, torch_dtype, **pick)[1] >= tokens:
            continue  # the backward computes dQ itself
        config = k.configs(kind, tokens, d, torch_dtype, **pick)
        label, fn, sig, consts, warps, stages = _window_case(kind, dtype, ws, d, config, cosine, precision, has_mask)
        alternatives = tuple(_window_case(kind, dtype, ws, d, c, cosine, precision, has_mask)
                             for c in k.candidates(kind, tokens, d, torch_dtype, **pick) if c != config)
        yield Case(label, fn, sig, consts, warps, stages, alternatives)
    fn = k._table_grad_kernel
    for ws in (7, 16):
        consts = dict(WH=ws, WW=ws, BLOCK_Q=k.block_q(ws * ws), stride_t1=1)
        sig = {n: "i32" for n in fn.arg_names}
        sig.update(DBias="*fp32", DTable="*fp32", **{c: "constexpr" for c in consts})
        yield Case(f"table grad window {ws} [w4]", fn, sig, consts, 4)


def _highres_configs(family: str, shared: int):
    del family  # the same configs on every architecture
    from fusedtx.kernels import highres as k

    def case(label, fn, ptrs, consts, warps, stages=None, alternatives=()):
        sig = {n: "i32" for n in fn.arg_names}
        sig.update(ptrs)
        sig.update({c: "constexpr" for c in consts})
        config = "x".join(str(v) for n, v in consts.items() if n.startswith("BLOCK"))
        tail = f" s{stages}" if stages else ""
        return Case(f"{label} [{config} w{warps}{tail}]", fn, sig, consts, warps, stages or 3, tuple(alternatives))

    for dtype in ("bf16", "fp32"):
        for p in (8, 14, 16, 32):  # patch sizes
            for method, code in k.METHODS.items():
                block_p, warps = k.configs("scores", p)
                yield case(f"scores {dtype} {method} patch {p}", k._patch_scores_kernel,
                           dict(X=f"*{dtype}", OUT="*fp32", inv_pixels="fp32", inv_pairs="fp32"),
                           dict(P=p, BLOCK_P=block_p, METHOD=code, stride_w=1), warps)
        for c in (384, 768, 1280):  # ViT-S, -B, -H widths
            block_r, block_c, warps = k.configs("gather", c)
            ptrs = {n: f"*{dtype}" for n in ("TOK", "POS", "PRE", "OUT")}
            yield case(f"gather {dtype} C={c}", k._gather_kernel, {**ptrs, "IDX": "*i64"},
                       dict(HAS_POS=True, HAS_PRE=True, BLOCK_R=block_r, BLOCK_C=block_c, stride_tc=1, stride_pc=1,
                            stride_qc=1), warps)
            _, block_c, warps = k.configs("merge", c)
            ptrs = {n: f"*{dtype}" for n in ("XB", "XS", "OUT")}
            ptrs.update({n: "*fp32" for n in ("SB", "SS", "OUT_S")}, ORDER="*i32", OFFSETS="*i32")
            yield case(f"merge {dtype} C={c}", k._merge_kernel, ptrs,
                       dict(BLOCK_C=block_c, stride_xbc=1, stride_xsc=1), warps)
        # ToMe's metric: keys averaged over heads (64), and wider metrics; float32 in both dot precisions
        for d in (64, 128, 256):
            for precision in ("tf32", "ieee") if dtype == "fp32" else ("tf32",):
                label = f"match {dtype}{' ' + precision if dtype == 'fp32' else ''} D={d}"
                ptrs = dict(A=f"*{dtype}", B=f"*{dtype}", SCORE="*fp32", INDEX="*i64", eps="fp32")

                def match(bm, bn, bd, warps, stages, alternatives=(), label=label, ptrs=ptrs, precision=precision):
                    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=precision, stride_ad=1, stride_bd=1)
                    return case(label, k._match_kernel, ptrs, consts, warps, stages, alternatives)

                bm, bn, bd, warps, stages = k.configs("match", d)
                tries = [(bm, bn // 2, bd, warps, stages), (bm // 2, bn, bd, warps, stages), (bm, bn, bd, 8, stages),
                         (bm, bn, bd, warps, 1), (bm // 2, bn // 2, bd, warps, stages)]
                yield match(bm, bn, bd, warps, stages, [match(*t)[:6] for t in tries if min(t[:2]) >= 16])


# family -> generator of the cases the launchers pick for an architecture family and a shared-memory limit
CONFIGS = {
    "layer_norm_gelu": _layer_norm_gelu_configs,
    "attention": _attention_configs,
    "sinusoidal": _sinusoidal_configs,
    "window_attention": _window_attention_configs,
    "highres": _highres_configs,
}


def cases(arch: str, families) -> list[tuple[str, Case]]:
    """(kernel family, case) of every config the launchers pick on target ``arch``."""
    return [(family, case) for family in families for case in CONFIGS[family](family_of(arch), shared_limit(arch))]


def _row(family: str, label: str, r: dict) -> str:
    return (f"| {family} | {label} | {r['regs']} | {r['stack']} | {r['local']} | {r['shared']} | "
            f"{'OVER' if r['over'] else 'fits'} | {r['mma']} | {'SPILLS' if r['spills'] else 'none'} |")


_HEADER = ["| family | config | regs | stack B | local B | shared B | shared limit | MMA | spills |",
           "|---|---|---:|---:|---:|---:|---|---|---|"]


def report(arch: str, families, log=None) -> tuple[str, str]:
    """(markdown table, summary line) for target ``arch``."""
    rows, alt_rows = list(_HEADER), list(_HEADER)
    n = over = spills = 0
    for family, case in cases(arch, families):
        r = compile_for(arch, case.fn, case.signature, case.constexprs, case.num_warps, case.num_stages)
        n += 1
        over += r["over"]
        spills += r["spills"]
        rows.append(_row(family, case.label, r))
        if log:
            print(rows[-1], file=log, flush=True)
        if r["spills"] or r["over"]:
            alt_rows.append(_row(family, f"**{case.label}** (chosen)", r))
            for label, fn, sig, consts, warps, stages in case.alternatives:
                alt_rows.append(_row(family, f"alternative {label}", compile_for(arch, fn, sig, consts, warps,
                                                                                  stages)))
    limit = shared_limit(arch)
    title = (f"# {target_name(arch)} resource usage ({CARDS[arch]}; launch configs of the {family_of(arch)} "
             f"family; Triton {triton.__version__}, compiled on CPU)\n\n"
             f"Per-block shared-memory limit: {limit} B ({limit // 1024} KiB). Regenerate with "
             f"`python -m fusedtx.bench.resources --arch {arch} --out-dir bench/results`.\n\n")
    table = title + "\n".join(rows) + "\n"
    if len(alt_rows) > 2:
        table += ("\n## Configs that spill or do not fit, with the alternatives compiled for them\n\n"
                  + "\n".join(alt_rows) + "\n")
    summary = f"{target_name(arch)}: {n} configs, {over} over the shared-memory limit, {spills} spill"
    return table, summary


def table_path(out_dir: str | Path, arch: str) -> Path:
    return Path(out_dir) / f"resources-{target_name(arch)}.md"


def read_table(path: str | Path) -> dict[tuple[str, str], dict[str, object]]:
    """The main table of a committed ``resources-sm_*.md``: (family, config label) -> shared bytes, spills."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("## "):
            break  # the alternatives section repeats labels
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[5].isdigit():
            rows[(cells[0], cells[1])] = {"shared": int(cells[5]), "spills": cells[8] == "SPILLS"}
    return rows


def _estimate(case: Case) -> int:
    """A rough shared-memory size of a case, to sample the largest when no committed table says."""
    c = case.constexprs
    if "BLOCK_D" not in c:
        return 0  # not a tiled attention kernel: small
    width = c["BLOCK_D"]
    rows = c.get("BLOCK_M", c.get("BLOCK_Q", 1)) + c.get("BLOCK_N", 0)
    elsize = 4 if "*fp32" in (case.signature.get("Q"), case.signature.get("QKV"), case.signature.get("X")) else 2
    return rows * width * elsize * case.num_stages


def check_sample(arch: str, families, tables: str | Path, count: int) -> list[str]:
    """Compile the ``count`` configs of ``arch`` that use the most shared memory (per its committed table, or
    estimated when there is none), and the ``count`` largest of those with an attention mask (" +mask", their
    own configs), and return what is wrong: with a table, a config the launchers pick that it does not list (or
    the reverse); a config over the shared-memory limit; one that spills where the table says it does not."""
    path = table_path(tables, arch)
    committed = read_table(path) if path.exists() else None
    picked = {(family, case.label): case for family, case in cases(arch, families)}
    problems = []
    if committed is not None:
        problems += [f"{target_name(arch)}: {f} {label} is picked but not in the committed table"
                     for f, label in picked if (f, label) not in committed]
        problems += [f"{target_name(arch)}: {f} {label} is in the committed table but no longer picked"
                     for f, label in committed if f in families and (f, label) not in picked]
        ranked = sorted((k for k in picked if k in committed), key=lambda k: -committed[k]["shared"])
    else:
        ranked = sorted(picked, key=lambda k: -_estimate(picked[k]))
    largest = dict.fromkeys(ranked[:count] + [k for k in ranked if " +mask" in k[1]][:count])
    for family, label in largest:
        case = picked[(family, label)]
        r = compile_for(arch, case.fn, case.signature, case.constexprs, case.num_warps, case.num_stages)
        print(_row(family, case.label, r), flush=True)
        if r["over"]:
            problems.append(f"{target_name(arch)}: {family} {label} needs {r['shared']} B of shared memory, "
                            f"over the {shared_limit(arch)} B limit")
        if r["spills"] and committed is not None and not committed[(family, label)]["spills"]:
            problems.append(f"{target_name(arch)}: {family} {label} spills ({r['stack']} B stack)")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("families", nargs="*", help=f"any of {list(CONFIGS)} (default: all)")
    p.add_argument("--arch", default=",".join(TARGETS),
                   help=f"comma-separated targets, any of {','.join(TARGETS)} (default: all)")
    p.add_argument("--out-dir", default=None, help="also write each target's table to OUT_DIR/resources-sm_*.md")
    p.add_argument("--quiet", action="store_true", help="print only the summary lines")
    p.add_argument("--sample", type=int, default=0, metavar="K",
                   help="CI guard: check the committed tables in --tables against the configs the launchers pick "
                        "and recompile the K largest configs of each target (and its K largest with an attention "
                        "mask); exit 1 on a problem")
    p.add_argument("--tables", default="bench/results", help="folder of the committed tables (with --sample)")
    args = p.parse_args(argv)
    unknown = set(args.families) - set(CONFIGS)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {list(CONFIGS)}")
    archs = [a.strip().removeprefix("sm_") for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in TARGETS]
    if bad:
        p.error(f"unknown targets {bad}; choose from {','.join(TARGETS)}")
    families = args.families or list(CONFIGS)
    if args.sample:
        problems = [msg for arch in archs for msg in check_sample(arch, families, args.tables, args.sample)]
        print("\n".join(problems) or f"{', '.join(target_name(a) for a in archs)}: the {args.sample} largest "
              f"configs of each fit (and the committed tables, where there are any, list the configs the launchers "
              f"pick)")
        return 1 if problems else 0
    summaries = []
    for arch in archs:
        table, summary = report(arch, families, log=None if args.quiet else sys.stdout)
        summaries.append(summary)
        if args.out_dir:
            table_path(args.out_dir, arch).write_text(table)
    print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
