"""``fusedtx tune``: time the launch-config candidates of every kernel a model runs, on the user's own card.

It builds the model with random weights (a timm name, or ``hf_vit``), swaps in fusedtx, and runs one
forward (and, with ``--backward``, one backward) with ``FUSEDTX_TUNE=1``: each kernel launch that has no
tuned config yet times its short candidate list (pre-filtered per architecture by the resource check) at
the shapes the model really runs, keeps the fastest, and writes it to a JSON file keyed by the card's name,
compute capability, Triton version, kernel and shape bucket (the user cache dir, or ``$FUSEDTX_CONFIG_DIR``).
Later launches read that file before the built-in tables. ``--shapes`` tunes explicit attention shapes
instead of a model. On a CPU it runs Triton's interpreter (tiny shapes; the timings mean nothing there, the
command is only exercised).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    """``"B,H,N,D;B,H,N,D"`` -> attention shapes."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        dims = tuple(int(x) for x in part.split(","))
        if len(dims) != 4 or min(dims) < 1:
            raise SystemExit(f"--shapes: each shape is B,H,N,D with positive ints, got {part!r}")
        shapes.append(dims)
    return shapes


def _run_model(args, device, dtype) -> None:
    from fusedtx.profile import build_model
    from fusedtx.surgery import swap

    torch.manual_seed(0)
    model, kwargs = build_model(args.model, args.img_size)
    model = model.to(device=device, dtype=dtype).eval()
    swap(model)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype,
                         requires_grad=args.backward)
    with torch.set_grad_enabled(args.backward):
        out = model(images, **kwargs)
        out = out if isinstance(out, torch.Tensor) else out[0]
        if args.backward:
            out.float().sum().backward()


def _run_shapes(shapes, device, dtype, backward: bool) -> None:
    import fusedtx

    for b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        out = fusedtx.attention(q, k, v)
        if backward:
            out.float().sum().backward()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusedtx tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name, or hf_vit")
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True,
                   help="tune the backward kernels too (default: yes)")
    p.add_argument("--shapes", default=None, help="explicit attention shapes B,H,N,D[;B,H,N,D...] instead of --model")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("fusedtx tune: Triton was imported before the interpreter could be switched on")
        os.environ["TRITON_INTERPRET"] = "1"
    dtype = getattr(torch, args.dtype)
    if not cuda and dtype == torch.bfloat16:
        dtype = torch.float32  # the interpreter's bf16 arithmetic is wrong
    device = torch.device("cuda" if cuda else "cpu")

    import fusedtx
    from fusedtx.kernels import tuning

    identity = tuning.device_identity(device)
    folder = tuning.config_dir()
    if folder is None:
        raise SystemExit(f"fusedtx tune: set {tuning.CONFIG_DIR_ENV} (or install platformdirs)")
    path = folder / tuning.file_name(identity)
    before = tuning.read_file(path, identity)
    previous = os.environ.get(tuning.TUNE_ENV)
    os.environ[tuning.TUNE_ENV] = "1"
    try:
        with fusedtx.use_backend("triton"):
            if args.shapes:
                _run_shapes(_parse_shapes(args.shapes), device, dtype, args.backward)
            else:
                _run_model(args, device, dtype)
    finally:
        if previous is None:
            os.environ.pop(tuning.TUNE_ENV)
        else:
            os.environ[tuning.TUNE_ENV] = previous
    after = tuning.read_file(path, identity)
    new = {k: v for k, v in after.items() if before.get(k) != v}
    print(f"fusedtx tune on {identity['device']} (sm_{identity['capability'][0]}{identity['capability'][1]}, "
          f"Triton {identity['triton']}): {len(new)} kernel configs tuned, {len(after)} in {path}")
    print("| kernel and shape bucket | config (BLOCK_M, BLOCK_N, warps, stages) |")
    print("|---|---|")
    for key, config in sorted(new.items()):
        print(f"| {key} | {tuple(config)} |")
    if not new and not after:
        print(json.dumps({"note": "no Triton kernel ran: nothing to tune"}))
    return 0
