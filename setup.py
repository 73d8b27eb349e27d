"""Build script for lasnn: the ``lasnn._C`` extension (C++ CPU kernels, CUDA kernels when possible).

Environment variables:
  LASNN_FORCE_CUDA=1   build the CUDA kernels even if the detection below says no (fails without nvcc).
  LASNN_SKIP_CUDA=1    never build the CUDA kernels (quick local CPU-only builds).
  LASNN_SKIP_EXT=1     build no extension at all (pure Python install; reference/Triton backends only).
  MAX_JOBS             parallel compile jobs for ninja (torch's convention).

The CUDA kernels are built whenever nvcc is found and the installed torch is a CUDA build, even
with no GPU visible: build machines usually have none, so ``torch.cuda.is_available()`` is the wrong test.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> str | None:
    # torch guesses /usr/local when nvcc is on PATH there; our machines keep the toolkit in /usr/local/cuda.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _write_build_info(arch_list: str | None) -> None:
    # What the CUDA kernels are compiled for, so that lasnn.backends can refuse a GPU they do not cover
    # with a reason instead of failing at launch. None: no CUDA kernels, or torch picks the visible GPUs'
    # architectures itself (then nothing is checked). Rewritten by every build, so never stale.
    text = (
        '"""Written by setup.py at build time; not in git."""\n\n'
        f"CUDA_ARCH_LIST: str | None = {arch_list!r}\n"
    )
    with open(os.path.join(ROOT, "lasnn", "_build_info.py"), "w") as f:
        f.write(text)


def _extensions():
    if _flag("LASNN_SKIP_EXT"):
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    want_cuda = _flag("LASNN_FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None)
    if _flag("LASNN_SKIP_CUDA"):
        want_cuda = False

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -ffp-contract=off: no fused multiply-add in the C++ kernels on any target (gcc contracts by default
    # where FMA exists, e.g. aarch64 or -march=native), so every CPU path rounds like the reference.
    # -fno-trapping-math: lets gcc if-convert and vectorise float compares (`h >= v_th ? 1 : 0`); the
    # kernels never read FP exception flags, and values are unchanged (see csrc/cpu/lif.cpp).
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-fno-trapping-math"]
    libs_args = {"extra_link_args": ["-fopenmp"]}
    if want_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch and not torch.cuda.is_available():
            # No GPU to ask: compile for Hopper (our GPU machines) plus PTX for forward compatibility.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        ext = CUDAExtension(
            "lasnn._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            py_limited_api=True,
            **libs_args,
        )
    else:
        ext = CppExtension(
            "lasnn._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            py_limited_api=True,
            **libs_args,
        )
    _write_build_info(os.environ.get("TORCH_CUDA_ARCH_LIST") if want_cuda else None)
    print(f"lasnn: building lasnn._C with CUDA kernels: {want_cuda} (CUDA_HOME={cuda_home})", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
