"""Which dtype autocast computes matmuls in on a device type, if any: asked by the Q-Former's weight casts and the
torch attention with dropout. (ops/linear_ce.py, ops/layer_norm.py, models/fp8.py and models/vision.py still ask
torch themselves, for cpu / cuda only; moving them here changes what the cost model's trace runs, see
benchmarks/cost_model/trace.py's linear_cross_entropy stand-in.)

`torch.is_autocast_enabled(device_type)` raises for device types autocast does not know (meta tensors outside the
cost model's trace); those count as autocast off. Any device type is asked, not only "cpu" / "cuda": the cost model
traces meta tensors standing in for CUDA ones under its own autocast stand-in, and a check limited to cpu / cuda
would make the trace run code a GPU does not.
"""
from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for `device_type`, else None."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device_type)
