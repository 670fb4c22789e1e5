"""Triton kernels, installed as blip2fast.kernels.

The folder is top-level in the repository but is mapped to `blip2fast.kernels` by setup.py
(`package_dir={"blip2fast.kernels": "kernels"}`): a top-level module named `kernels` would collide with the PyPI
package of that name. Import it as `blip2fast.kernels`, never as `kernels` (running from the repository root puts
the root on sys.path, which would otherwise make `import kernels` silently work).
"""
if __name__ != "blip2fast.kernels":
    raise ImportError(
        f"the Triton kernels folder was imported as top-level {__name__!r}; import it as `blip2fast.kernels` "
        "(install the package with `pip install -e . --no-build-isolation`). A top-level `kernels` module would "
        "collide with the PyPI package `kernels`."
    )
