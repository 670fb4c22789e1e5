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


def _has_cuda_headers(home: str) -> bool:
    return os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _set_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit that has its headers, before torch's cpp_extension reads it.

    torch derives CUDA_HOME from `which nvcc` as nvcc's grandparent folder. Where nvcc is a wrapper script (here
    /usr/local/bin/nvcc runs /usr/local/cuda-13.0/bin/nvcc) that gives /usr/local, which has no cuda_runtime.h, and
    the build fails deep inside ninja. A CUDA_HOME the user set is kept as it is."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    if nvcc and _has_cuda_headers(candidates[0]):
        return  # torch's own guess is right
    for home in candidates:
        if _has_cuda_headers(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("BLIP2FAST_BUILD_EXT", "1").strip() == "0":
        print("blip2fast: BLIP2FAST_BUILD_EXT=0, not building blip2fast._C (PyTorch fallbacks only)")
        return [], {}
    _set_cuda_home()
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
    if force_cuda and not _has_cuda_headers(CUDA_HOME):
        _fail(f"FORCE_CUDA=1 but the CUDA toolkit at {CUDA_HOME} has no include/cuda_runtime.h: set CUDA_HOME to the "
              "toolkit's folder (the one holding bin/nvcc and include/).")
    use_cuda = torch_cuda is not None and CUDA_HOME is not None and _has_cuda_headers(CUDA_HOME)

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
        why = ("torch is a CPU build" if torch_cuda is None else
               "no CUDA toolkit with headers found (set CUDA_HOME)" if CUDA_HOME else "no CUDA toolkit found (set CUDA_HOME)")
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
    # Each range is tested at both ends by CI (.ci/run): the newest that pip resolves today (the README's commands)
    # and the oldest allowed (uv's lowest-direct resolution, Python 3.12, the GPU machine's torch/triton/transformers).
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=2.0",
        "transformers>=5.17,<6",
        "safetensors>=0.4.3",
        "braceexpand>=0.1.7",  # shard patterns such as shards/{00000..00099}.tar
        "pillow>=10.1",
        "tensorboard>=2.18",  # training curves (event files in every run folder)
        "matplotlib>=3.9",  # python -m blip2fast.plot: the curves as a PNG
    ],
    extras_require={
        # webdataset: tests read our shards back with it (blip2fast's own reader does not need it);
        # pycocoevalcap: COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr; METEOR runs on Java)
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "webdataset>=0.2.100", "pycocoevalcap>=1.2"],
        "eval": ["pycocoevalcap>=1.2"],
    },
    zip_safe=False,
)
