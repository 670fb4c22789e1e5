"""Repository-wide pytest setup.

TRITON_INTERPRET must be set before anything imports triton (set after, tl.max/tl.sum fail with "Cannot call
@triton.jit'd outside of the scope of a kernel"), so it is set here, at the very top, unless a GPU run asks for
compiled kernels with BLIP2FAST_GPU_TESTS=1 (benchmarks/gpu/run.sh does).
"""
import os

if os.environ.get("BLIP2FAST_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


NEEDS_GPU = "needs a CUDA GPU"
NEEDS_REAL_WEIGHTS = "needs the real-weights packages"


def _real_weights_lane() -> bool:
    """The real-weights lane (.ci/run sets BLIP2FAST_REAL_WEIGHTS=1): there a missing package fails its tests."""
    return os.environ.get("BLIP2FAST_REAL_WEIGHTS", "").strip().lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config, items):
    import torch

    real = [item for item in items if item.get_closest_marker("real_weights") is not None]
    if real:
        from tests.real_weights.build import PIP_COMMAND, missing_packages

        missing = missing_packages()
        if missing:
            # README line 2's suite does not install them; the README's real-weights command and CI's lane do
            skip_real = pytest.mark.skip(reason=f"{NEEDS_REAL_WEIGHTS} ({', '.join(missing)}): {PIP_COMMAND}")
            for item in real:
                item.add_marker(skip_real)
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason=NEEDS_GPU)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


def _strict_skips() -> bool:
    """In CI (CI=true, as CI runners set it) a test skipped for any reason but a missing GPU is a failure: missing
    data or a missing package must turn CI red, not quietly shrink what it tests. The one other allowed reason:
    the real-weights packages outside the real-weights lane, which runs those tests with them installed.
    BLIP2FAST_STRICT_SKIPS=0/1 overrides, e.g. on a GPU machine that lacks the CPU-only test extras."""
    flag = os.environ.get("BLIP2FAST_STRICT_SKIPS", os.environ.get("CI", ""))
    return flag.strip().lower() in ("1", "true", "yes", "on")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or not _strict_skips() or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if NEEDS_GPU in reason or item.get_closest_marker("cuda") is not None:
        return
    if NEEDS_REAL_WEIGHTS in reason and not _real_weights_lane():
        return  # run by their own lane (README: "Your own backbones"; .ci/run's real-weights lane)
    report.outcome = "failed"
    report.longrepr = (f"skipped for a reason other than a missing GPU, which CI does not allow: {reason}\n"
                       "(install what the test needs, or ship its data in the repository; "
                       "BLIP2FAST_STRICT_SKIPS=0 turns this check off)")
