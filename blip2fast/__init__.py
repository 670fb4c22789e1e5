"""blip2fast: BLIP-2 pre-training (stage 1 and 2) with fused kernels and a lean training loop.

`import blip2fast` is cheap: it never imports transformers (only the HF interop and HF vision towers do).
"""
import os as _os
import sys as _sys


def _map_source_tree_kernels() -> None:
    """Make `blip2fast.kernels` importable when blip2fast runs from a source tree that was never installed.

    The install maps the repository's top-level `kernels/` folder to `blip2fast.kernels` (setup.py package_dir).
    Without an install (a failed build on a GPU machine, a plain checkout on PYTHONPATH) that mapping is missing and
    every Triton op would fail to import; a finder for exactly that one name maps it to the folder instead. It never
    shadows an installed mapping, and it never registers a top-level `kernels` (see kernels/__init__.py)."""
    import importlib.abc
    import importlib.util

    name = __name__ + ".kernels"
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init) or importlib.util.find_spec(name) is not None:
        return

    class _SourceTreeKernels(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])

    _sys.meta_path.append(_SourceTreeKernels())


_map_source_tree_kernels()

from .config import Blip2Config, QFormerConfig, VisionConfig
from .models.blip2 import Blip2, Stage1Output

__all__ = ["Blip2", "Blip2Config", "QFormerConfig", "VisionConfig", "Stage1Output"]
__version__ = "0.1.0"
