"""Reference implementations of the stage-1 losses (pure PyTorch; fused kernels replace them later).

ITC: max-over-queries similarities both ways against the gathered batch, two label-smoothed cross-entropies.
ITG: shifted, label-smoothed token cross-entropy summed locally and divided by a *global* token count, so that
N ranks averaging their gradients compute exactly what one process computes on the whole batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half-precision logits are reduced in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def itc_similarities(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor,
                     temp: Tensor) -> tuple[Tensor, Tensor]:
    """sim_i2t (B, B_all) = max_q <image_feats[b, q], text_all[j]> / temp;
    sim_t2i (B, B_all) = max_q <text_feat[b], image_all[j, q]> / temp.
    image_feats (B, Q, E), text_feat (B, E), image_all (B_all, Q, E), text_all (B_all, E), all L2-normalised."""
    sim_i2t = torch.einsum("bqe,je->bjq", image_feats, text_all).amax(dim=-1) / temp
    sim_t2i = torch.einsum("be,jqe->bjq", text_feat, image_all).amax(dim=-1) / temp
    return sim_i2t, sim_t2i


def itc_loss_ref(sim_i2t: Tensor, sim_t2i: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
    return 0.5 * (F.cross_entropy(upcast(sim_i2t), targets, label_smoothing=label_smoothing)
                  + F.cross_entropy(upcast(sim_t2i), targets, label_smoothing=label_smoothing))


def token_ce_sum_ref(logits: Tensor, targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """logits (..., V) against targets (...) with -100 ignored: (sum over the other tokens, their count)."""
    flat, target = upcast(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1)
    loss_sum = F.cross_entropy(flat, target, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    return loss_sum, (target != -100).sum()


def lm_loss_sum_ref(logits: Tensor, labels: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """Shifted LM loss: logits (B, T, V) predict labels[:, 1:]. Returns (sum over non-ignored tokens, their count)."""
    return token_ce_sum_ref(logits[:, :-1], labels[:, 1:], label_smoothing)


def mean_over_global_count(loss_sum: Tensor, local_count: Tensor, global_count: Optional[Tensor],
                           world_size: int) -> Tensor:
    """loss_sum / global_count, scaled by world_size so that the rank-average of this value (what DDP's gradient
    averaging computes) equals the single-process mean. An empty count gives 0, never NaN."""
    count = local_count if global_count is None else global_count
    return loss_sum * world_size / count.clamp(min=1).to(loss_sum.dtype)
