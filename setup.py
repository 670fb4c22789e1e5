"""Build for blip2fast: the Python package plus the C++/CUDA extension `blip2fast._C` (from csrc/).

    pip install torch            # first: the extension is built against the torch you run with
    pip install -e . --no-build-isolation

Environment switches:
    BLIP2FAST_BUILD_EXT=0   skip the extension; every op then runs its PyTorch fallback
    FORCE_CUDA=1            require the CUDA build (an error with a CPU-only torch or without nvcc)
    TORCH_CUDA_ARCH_LIST    CUDA architectures, torch's syntax ("9.0", "8.0;9.0+PTX"); default: sm_90 code plus
                            compute_80 PTX
    MAX_JOBS                parallel compile jobs; default: the cores, capped at one job per 3 GB of memory

The CUDA part is built when the installed torch is a CUDA build and nvcc is found (CUDA_HOME or PATH), even on a
machine without a GPU; otherwise only the C++ (CPU) implementations are built.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

NO_TORCH_MESSAGE = """
blip2fast: setup.py cannot import torch ({error}).

The extension blip2fast._C must be compiled against the torch you will run it with, so torch has to be installed
first and visible to the build. pip's default build isolation hides it (a fresh environment without torch). Run:

    pip install torch            # or the torch build you want (CUDA / CPU)
    pip install -e . --no-build-isolation

or skip the extension (pure-PyTorch fallbacks everywhere) with BLIP2FAST_BUILD_EXT=0.
"""


def _fail(message: str) -> None:
    sys.stderr.write(f"\nerror: {message.strip()}\n\n")
    raise SystemExit(1)


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> int:
    """Cores, capped so that each job has ~3 GB (a torch-header compile peaks around 1-2 GB)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return max(1, min(cores, 4))
    return max(1, min(cores, int(mem_gb // 3)))


def _cuda_arch_flags() -> list[str]:
    """Our default targets unless TORCH_CUDA_ARCH_LIST is set (then torch turns that list into -gencode flags)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=compute_80"]


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("BLIP2FAST_BUILD_EXT", "1").strip() == "0":
        print("blip2fast: BLIP2FAST_BUILD_EXT=0, not building blip2fast._C (PyTorch fallbacks only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # build isolation, or torch not installed
        _fail(NO_TORCH_MESSAGE.format(error=f"{type(e).__name__}: {e}"))

    force_cuda = _env_on("FORCE_CUDA")
    torch_cuda = torch.version.cuda
    if force_cuda and torch_cuda is None:
        _fail(
            f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build (torch.version.cuda is "
            "None): a CUDA extension cannot be linked against it. Install a CUDA build of torch, or unset "
            "FORCE_CUDA to build the C++ CPU extension only."
        )
    if force_cuda and CUDA_HOME is None:
        _fail(
            f"FORCE_CUDA=1 but no CUDA toolkit was found for torch {torch.__version__} (CUDA {torch_cuda}): set "
            "CUDA_HOME to the toolkit (e.g. /usr/local/cuda) or put nvcc on PATH."
        )
    use_cuda = torch_cuda is not None and CUDA_HOME is not None

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    sources = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "itc_loss_cpu.cpp"),
               os.path.join(CSRC, "dropout_mask_cpu.cpp")]
    cxx_flags = ["-O3"]  # never -ffast-math: the sampler's gumbel noise must be IEEE exact
    if use_cuda:
        sources += [os.path.join(CSRC, "ops_cuda.cpp")] + sorted(glob.glob(os.path.join(CSRC, "*.cu")))
        nvcc_flags = ["-O3", "-lineinfo"] + _cuda_arch_flags()
        ext = CUDAExtension(
            "blip2fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": cxx_flags + ["-DBLIP2FAST_WITH_CUDA"], "nvcc": nvcc_flags},
        )
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "sm_90 + compute_80 PTX"
        kind = f"CUDA {torch_cuda} (nvcc from {CUDA_HOME}; arch {arch})"
    else:
        ext = CppExtension(
            "blip2fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
        )
        why = "torch is a CPU build" if torch_cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        kind = f"C++ CPU only ({why})"
    jobs = os.environ["MAX_JOBS"]
    print(f"blip2fast: building blip2fast._C against torch {torch.__version__}: {kind}; MAX_JOBS={jobs}")
    return [ext], {"build_ext": BuildExtension}


# Listed explicitly: auto-discovery cannot express the kernels/ -> blip2fast.kernels mapping, and a top-level
# `kernels` module would collide with the PyPI package of that name.
PACKAGES = [
    "blip2fast",
    "blip2fast.checkpoint",
    "blip2fast.data",
    "blip2fast.eval",
    "blip2fast.kernels",
    "blip2fast.models",
    "blip2fast.ops",
    "blip2fast.training",
]
_unlisted = sorted(set(find_packages(where=ROOT, include=["blip2fast", "blip2fast.*"])) - set(PACKAGES))
if _unlisted:  # a new sub-package would be missing from wheels (editable installs hide that)
    _fail(f"setup.py: packages {_unlisted} have an __init__.py but are not in PACKAGES; add them there")

ext_modules, cmdclass = extension_modules()

setup(
    name="blip2fast",
    version="0.1.0",
    description="A fast BLIP-2 pre-training implementation",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"blip2fast.kernels": "kernels"},
    # the automatic GPU backend order measured by the GPU check (benchmarks/report.py measured), when committed
    package_data={"blip2fast.ops": ["measured_backends.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy",
        "transformers>=5.0,<6",
        "safetensors",
        "webdataset",
        "braceexpand",
        "pillow",
    ],
    # eval: COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr; needs Java) for `python -m blip2fast.eval caption`
    extras_require={"test": ["pytest", "pytest-benchmark"], "eval": ["pycocoevalcap"]},
    zip_safe=False,
)
