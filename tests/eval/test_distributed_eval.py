"""Two gloo processes under torchrun, each holding part of the data, give the same retrieval results as one
process holding all of it (features gathered, ITC rows and ITM pairs split across ranks and gathered); and one rank
alone with distributed=False makes no collective call."""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from blip2fast.eval.retrieval import (RetrievalFeatures, encode_images, encode_texts, evaluate_retrieval,
                                      retrieval_from_features)
from tests.eval.dist_common import K, data, model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_ranks_equal_one(tmp_path):
    out_path = str(tmp_path / "rank0.pt")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.eval.dist_retrieval_worker", out_path]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out_path, weights_only=False)

    m = model()
    pixels, ids, mask, text_image = data()
    f, e = encode_images(m, pixels)
    res = retrieval_from_features(m, RetrievalFeatures(f, e, encode_texts(m, ids, mask), ids, mask, text_image),
                                  k=K, itm_batch=4)
    assert got["metrics"] == res.metrics
    assert torch.equal(got["i2t_ranks"], res.i2t_ranks) and torch.equal(got["t2i_ranks"], res.t2i_ranks)
    torch.testing.assert_close(got["sim"], res.sim, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["i2t_scores"], res.i2t_scores, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["t2i_scores"], res.t2i_scores, rtol=1e-6, atol=1e-6)
    pairs = [{"pixel_values": pixels, "input_ids": ids[:5], "attention_mask": mask[:5]}]  # (image i, text i)
    assert got["loop"] == got["alone"] == evaluate_retrieval(m, pairs, k=K)
