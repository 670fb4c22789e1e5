"""Local-only loading of transformers objects: every transformers `from_pretrained` in blip2fast goes through here.

Two things are decided once, for every call site:
- `local_files_only=True`: blip2fast takes local folders, never hub names (no network on most compute nodes);
- `use_kernels=False` for models: transformers >= 5.2x "kernelizes" models loaded with from_pretrained by default,
  fetching kernels from the Hugging Face hub through the PyPI package `kernels`. blip2fast's kernels are its own
  (blip2fast.ops), and a hub fetch would fail or hang offline, so it is switched off explicitly here.
"""
from __future__ import annotations

from typing import Any


def load_pretrained(cls: Any, path: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, ...)` from a local folder; models load with hub kernels off."""
    kwargs["local_files_only"] = True
    if _is_model_class(cls):
        kwargs["use_kernels"] = False
    return cls.from_pretrained(path, **kwargs)


def _is_model_class(cls: Any) -> bool:
    """True for transformers model classes and Auto model classes (not configs, tokenizers or processors)."""
    from transformers import PreTrainedModel

    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        return True
    # AutoModel* classes are not PreTrainedModel subclasses; they map configs to model classes.
    return hasattr(cls, "_model_mapping")
