"""Repository-wide pytest setup.

TRITON_INTERPRET must be set before anything imports triton (set after, tl.max/tl.sum fail with "Cannot call
@triton.jit'd outside of the scope of a kernel"), so it is set here, at the very top, unless a GPU run asks for
compiled kernels with BLIP2FAST_GPU_TESTS=1 (benchmarks/gpu/run.sh does).
"""
import os

if os.environ.get("BLIP2FAST_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)
