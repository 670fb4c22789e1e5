"""Shared mechanics of checkpoint key renaming: longest-prefix lookup in a part table, both directions, and the
state-dict loop that sorts keys into renamed and unused. Each format (LAVIS, transformers, BERT) keeps its own
tables; this file only applies them."""
from __future__ import annotations

from typing import Callable, Iterable, Optional


def rename_part(parts: dict, suffix: str, reverse: bool = False) -> Optional[str]:
    """Map `suffix` through the longest matching prefix of `parts` ({theirs: ours}; `reverse`: ours -> theirs)."""
    pairs = [(ours, theirs) for theirs, ours in parts.items()] if reverse else list(parts.items())
    for src, dst in sorted(pairs, key=lambda kv: -len(kv[0])):
        if suffix.startswith(src):
            return dst + suffix[len(src):]
    return None


def rename_state_dict(sd: dict, key_fn: Callable[[str], Optional[str]],
                      redundant: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """(renamed state dict, source keys with no counterpart). Keys in `redundant` carry nothing of their own (tied
    copies, buffers) and are dropped silently."""
    redundant = set(redundant)
    renamed, unused = {}, []
    for k, v in sd.items():
        new = key_fn(k)
        if new is not None:
            renamed[new] = v
        elif k not in redundant:
            unused.append(k)
    return renamed, unused
