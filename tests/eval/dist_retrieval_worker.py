"""Run under torchrun (2 gloo ranks): each rank encodes its own uneven share of the images and captions, then the
retrieval protocol gathers, splits the ITC rows and the ITM pairs across ranks, and gathers again. Rank 0 saves
what it got; the test compares with one process."""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from blip2fast.eval.retrieval import (RetrievalFeatures, encode_images, encode_texts, evaluate_retrieval,
                                      retrieval_from_features)
from tests.eval.dist_common import IMAGE_SPLIT, K, N_IMG, data, model


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    m = model()
    pixels, ids, mask, text_image = data()
    lo, hi = IMAGE_SPLIT[rank]
    mine = (text_image >= lo) & (text_image < hi)  # this rank's images and their captions
    f, e = encode_images(m, pixels[lo:hi])
    feats = RetrievalFeatures(f, e, encode_texts(m, ids[mine], mask[mine]), ids[mine], mask[mine],
                              text_image[mine] - lo)
    res = retrieval_from_features(m, feats, k=K, itm_batch=3)
    # the training-loop entry point: 1:1 pairs (image i, text i), each rank its own batches (uneven: 2 and 1)
    pairs = torch.arange(pixels.shape[0])[lo:hi]
    batches = [{"pixel_values": pixels[p], "input_ids": ids[p], "attention_mask": mask[p]} for p in pairs.split(2)]
    loop = evaluate_retrieval(m, batches, k=K, itm_batch=5)
    # distributed=False: rank 0 alone evaluates all pairs with no collective call (rank 1 waits at the barrier)
    alone = None
    if rank == 0:
        everything = {"pixel_values": pixels, "input_ids": ids[:N_IMG], "attention_mask": mask[:N_IMG]}
        alone = evaluate_retrieval(m, [everything], k=K, distributed=False)
    dist.barrier()
    if rank == 0:
        torch.save({"metrics": res.metrics, "i2t_ranks": res.i2t_ranks, "t2i_ranks": res.t2i_ranks, "sim": res.sim,
                    "i2t_scores": res.i2t_scores, "t2i_scores": res.t2i_scores, "loop": loop, "alone": alone},
                   out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
