"""Command line: ``lasnn <command>`` (same as ``python -m lasnn <command>``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from lasnn.runtime import keep_cpu_memory

_COMMAND_MODULES = ("lasnn.models.cli", "lasnn.distill.cli", "lasnn.convert.cli", "lasnn.demo", "lasnn.nir_io")


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import lasnn
    from lasnn import _ext, backends

    print(f"lasnn {lasnn.__version__}  torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})  "
          f"python {platform.python_version()}")
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}")
    print(f"extension lasnn._C: {'loaded' if _ext.HAS_C else _ext.C_ERROR}")
    if _ext.HAS_C:
        arch = f" (for TORCH_CUDA_ARCH_LIST={_ext.CUDA_ARCH_LIST})" if _ext.CUDA_ARCH_LIST else ""
        print(f"  CUDA kernels compiled in: {_ext.c_has_cuda_kernels()}{arch}")
        print(f"  CPU LIF kernels (fp32, bf16): {_ext.cpu_lif_isa()} build (LASNN_CPU_ISA caps it; fp16/fp64: base)")
    from lasnn.runtime import cpu_has_native_bf16

    bf16 = "native (AVX512-BF16/AMX): --cpu-amp speeds training up" if cpu_has_native_bf16() else \
        "emulated: --cpu-amp would be slower"
    print(f"CPU bf16: {bf16}")
    print(f"triton: {'importable' if _ext.HAS_TRITON else _ext.TRITON_ERROR}"
          f"{' (TRITON_INTERPRET=1: runs on CPU tensors)' if _ext.triton_interpret() else ''}")
    print("training memory (SNN.low_memory): True (default) keeps the spikes autograd saves as bits: per spiking "
          "layer the conv output, the batch-norm output and 1 bit per spike are saved; \"recompute\" also drops the "
          "batch-norm output (recomputed in the backward); \"recompute_all\" also the conv output and pooled spikes "
          "(recomputed from the bits and the input: about 1 bit per spike saved, one more conv forward in the "
          "backward); average pools save nothing; every level gives the plain path's gradients bit for bit, under "
          "autocast too")
    print()
    width = max(len(op) for op in backends.OPS)
    for op, b, status in backends.table():
        print(f"  {op:<{width}}  {b:<9}  {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lasnn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="which backends each op has here, and why the others are unavailable")
    s.set_defaults(func=_cmd_info)
    # Each pipeline adds its own commands: a module listed here defines register(subparsers), and
    # every command it adds sets ``func``. Listed modules that do not exist yet are skipped; one that
    # exists must import cleanly.
    for mod in _COMMAND_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod).register(sub)
    return p


def _runs_on_cpu(args: argparse.Namespace) -> bool:
    """Whether the command computes on the CPU (its --device, "auto" meaning CPU when no GPU is visible)."""
    if args.command in ("info", "models", "export-nir"):
        return False
    device = str(getattr(args, "device", "auto"))
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lasnn`` / ``python -m lasnn``."""
    args = build_parser().parse_args(argv)
    # Large CPU tensors page-faulted in afresh on every allocation cost more than the kernels
    # (lasnn/runtime.py); a lasnn command that trains or simulates on the CPU owns its process, so it keeps
    # freed memory unless told not to. GPU runs and the informational commands leave malloc alone.
    if os.environ.get("LASNN_KEEP_CPU_MEMORY", "1") != "0" and _runs_on_cpu(args) and keep_cpu_memory():
        if not getattr(args, "quiet", False):
            print("lasnn: CPU run: glibc keeps freed memory in this process (LASNN_KEEP_CPU_MEMORY=0: off)",
                  file=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
