"""The ``fusedtx`` command: ``fusedtx info``, ``fusedtx profile [...]`` and ``fusedtx bench [family ...|all]``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

from fusedtx import _backend
from fusedtx.kernels.support import FAMILIES


def families() -> list[str]:
    """The kernel families (``fusedtx.kernels.support.FAMILIES``; listed without importing Triton)."""
    return list(FAMILIES)


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def info() -> str:
    """Versions, devices, and the backend each family would take on each device, with the reason."""
    import fusedtx

    lines = [
        f"fusedtx  {fusedtx.__version__}",
        f"python   {platform.python_version()} ({sys.platform})",
        f"torch    {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        f"triton   {_version('triton')}",
        f"backend  requested {_backend.requested()!r} (FUSEDTX_BACKEND / fusedtx.use_backend); "
        f"TRITON_INTERPRET={'1' if _backend.interpreter_enabled() else '0'}",
    ]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda", torch.cuda.current_device()))
        props = torch.cuda.get_device_properties(devices[0])
        lines.append(f"device   {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("device   no CUDA device: CPU only")
    lines.append("")
    lines.append("op family         device  backend    why")
    explained = {device: _backend.explain(device) for device in devices}  # the same for every family
    for family in families():
        for device in devices:
            backend, why = explained[device]
            lines.append(f"{family:<17} {device.type:<7} {backend:<10} {why}")
    lines.append("")
    lines.append("Per call, a case a kernel does not cover (e.g. float64) takes the reference with a one-time "
                 "warning.")
    return "\n".join(lines)


# Benches beside the families': ``cpu`` times every op and two models against the stock way on a CPU.
EXTRA_BENCHES = ("cpu",)


def bench(names: list[str], out: str | None, quick: bool) -> None:
    """Run the bench modules of the named families (``all``: every family), or the ``cpu`` bench."""
    from fusedtx.bench.harness import default_out_dir

    wanted = families() if names in ([], ["all"]) else names
    unknown = set(wanted) - set(families()) - set(EXTRA_BENCHES)
    if unknown:
        raise SystemExit(f"unknown benches {sorted(unknown)}; choose from {families() + list(EXTRA_BENCHES)} "
                         "or 'all'")
    out_dir = out or default_out_dir()
    for family in wanted:
        module = importlib.import_module(f"fusedtx.bench.bench_{family}")
        table = module.run(out_dir, quick=quick)
        print(f"{family}: {len(table.rows)} rows -> {out_dir}/{table.name}.md")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile"]:  # its own parser takes the rest of the line
        from fusedtx import profile

        raise SystemExit(profile.main(argv[1:]))
    if argv[:1] in (["check"], ["tune"]):  # they switch Triton's interpreter on (CPU) before Triton is imported
        command = importlib.import_module(f"fusedtx.{argv[0]}")
        raise SystemExit(command.main(argv[1:]))
    parser = argparse.ArgumentParser(prog="fusedtx", description="fused Triton kernels for (vision) transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend each op takes and why")
    sub.add_parser("profile", add_help=False, help="stock vs fused model at 4096 patches (fusedtx profile --help)")
    sub.add_parser("check", add_help=False, help="self-test of the kernels on this device (fusedtx check --help)")
    sub.add_parser("tune", add_help=False, help="time launch configs on this GPU for a model (fusedtx tune --help)")
    p_bench = sub.add_parser("bench", help="run the benchmarks against fusedtx's peers")
    names = ", ".join(families() + list(EXTRA_BENCHES))
    p_bench.add_argument("families", nargs="*", help=f"'all' (default: the families) or some of: {names}")
    p_bench.add_argument("--out", default=None, help="output folder (default: $OUT or ./fusedtx-bench)")
    p_bench.add_argument("--quick", action="store_true", help="a few shapes per family")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "bench":
        bench(args.families, args.out, args.quick)


if __name__ == "__main__":
    main()
