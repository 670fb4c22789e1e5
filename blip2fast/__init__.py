"""blip2fast: BLIP-2 pre-training (stage 1 and 2) with fused kernels and a lean training loop.

`import blip2fast` is cheap: it never imports transformers (only the HF interop and HF vision towers do).
"""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _hide_repo_kernels_folder() -> None:
    """Running from the repository root puts it on sys.path, where the top-level `kernels/` folder (installed as
    `blip2fast.kernels`) would pose as the PyPI package `kernels`; transformers probes for that package by
    importing it. Mark the name absent in that one case, so such probes find nothing (as on a clean install)."""
    if "kernels" in _sys.modules:
        return
    repo_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    try:
        spec = _ilu.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is not None and spec.origin and _os.path.dirname(_os.path.abspath(spec.origin)) == repo_kernels:
        _sys.modules["kernels"] = None  # type: ignore[assignment]


_hide_repo_kernels_folder()

from .config import Blip2Config, QFormerConfig, VisionConfig
from .models.blip2 import Blip2, Stage1Output

__all__ = ["Blip2", "Blip2Config", "QFormerConfig", "VisionConfig", "Stage1Output"]
__version__ = "0.1.0"
