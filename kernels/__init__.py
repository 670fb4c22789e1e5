"""Triton kernels, installed as blip2fast.kernels.

The folder is top-level in the repository but is mapped to `blip2fast.kernels` by setup.py
(`package_dir={"blip2fast.kernels": "kernels"}`). PyPI has an unrelated package named `kernels` (Hugging Face's hub
kernels, which transformers >= 5.2x depends on and probes for). Python started in the repository root finds this
folder first under that name, so the code below makes `import kernels` behave as if this folder were not there:

- the PyPI package is installed elsewhere on sys.path: it is loaded in this module's place, so `import kernels`
  and transformers get the real thing;
- it is not installed: the module left under the name looks like an absent package to probes (no `__file__`,
  no `__version__`, transformers' test for a shadowing namespace folder) and any attribute access fails with
  an AttributeError that says what happened (`from kernels import X` becomes an ImportError).

Only the standard library may be imported before that decision: this file runs first in both cases.
"""
if __name__ != "blip2fast.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys
    import types as _types

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))

    def _same_dir(entry: str) -> bool:
        try:
            return _os.path.samefile(entry or _os.getcwd(), _here)
        except OSError:
            return False

    _elsewhere = [p for p in _sys.path if isinstance(p, str) and not _same_dir(p)]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is not None and _spec.loader is not None:
        # The real package: importlib returns whatever sys.modules holds under the name after this file ran.
        _real = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _real
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            _sys.modules.pop(__name__, None)
            raise
    else:
        class _AbsentPackage(_types.ModuleType):
            """Stands for 'not installed' under the name `kernels`, without raising inside import probes."""

            def __getattr__(self, attr):
                raise AttributeError(
                    f"module {self.__name__!r} has no attribute {attr!r}: the PyPI package `kernels` is not "
                    f"installed, and the folder {_os.path.join(_here, 'kernels')!r} is blip2fast's Triton kernels "
                    "(import them as `blip2fast.kernels`). `pip install kernels` if you want the PyPI package."
                )

        _absent = _AbsentPackage(__name__, "the PyPI package `kernels` is not installed")
        _absent.__spec__ = _machinery.ModuleSpec(__name__, None, is_package=True)
        _absent.__path__ = []  # a package with nothing inside: `import kernels.x` fails with ModuleNotFoundError
        _sys.modules[__name__] = _absent
