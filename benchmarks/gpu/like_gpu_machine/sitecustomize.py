"""Makes a CPU dry run of benchmarks/gpu/run.sh see Python as the GPU machine does (run.sh puts this folder on
PYTHONPATH in a dry run only; Python imports `sitecustomize` at startup, after the .pth files):

- the packages the GPU machine lacks that this project uses (webdataset, braceexpand, pycocoevalcap) cannot be
  imported, so a module on the script's path that imports one eagerly fails here first, not on the one GPU run.
  (Not flash-attn or xformers: transformers probes those with importlib.util.find_spec, which must see None, not an
  error, and they are absent here anyway.);
- BLIP2FAST_LIKE_NOT_INSTALLED=1 (set by run.sh after a failed build) removes the editable install's import finder,
  as on a machine where `pip install -e .` never completed: blip2fast then imports from the source tree, and
  `blip2fast.kernels` must resolve without the install's kernels/ mapping.
"""
import os
import sys

ABSENT_ON_GPU_MACHINE = ("webdataset", "braceexpand", "pycocoevalcap")


class _AbsentOnGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT_ON_GPU_MACHINE:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine does not have it: import it lazily, "
                                      "in the code path that needs it)", name=name)
        return None


sys.meta_path.insert(0, _AbsentOnGpuMachine())

if os.environ.get("BLIP2FAST_LIKE_NOT_INSTALLED") == "1":
    def _from_editable_install(obj) -> bool:
        module = getattr(obj, "__module__", None) or type(obj).__module__
        return str(module).startswith("__editable__")

    sys.meta_path[:] = [f for f in sys.meta_path if not _from_editable_install(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not _from_editable_install(h)]
    sys.path_importer_cache.clear()
