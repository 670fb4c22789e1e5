"""Inference pieces transformers also has: the Q-Former forward, ITC scoring and ITM scoring. blip2fast vs the LAVIS
formulation vs transformers' Blip2ForImageTextRetrieval (our weights exported with save_hf, loaded by transformers,
as tests/interop do).

    python -m pytest benchmarks/bench_qformer_hf.py                               # CPU: tiny model, batch 8
    BLIP2FAST_GPU_TESTS=1 python -m pytest benchmarks/bench_qformer_hf.py \\
        --benchmark-json=out/bench_qformer_hf.json                               # GPU: ViT-g + BERT-base, 128

    bench "qformer_fwd": the Q-Former's query pass over given image embeddings (B, 257, 1408): ours
                         (`qformer.query_pass` on K/V from `qformer.image_kv`), LAVIS's BertModel with
                         query_embeds and encoder_hidden_states, transformers' `Blip2QFormerModel`
          "itc_scores":  images x texts cosine scores, max over queries (tower, query pass, text pass): ours
                         `Blip2.itc_scores`, transformers' retrieval model with use_image_text_matching_head=False
          "itm_scores":  the ITM head's logits for B (image, text) pairs: ours `Blip2.itm_logits`, transformers'
                         retrieval model with use_image_text_matching_head=True
transformers is left out with BLIP2FAST_BENCH_HF_EXPORT=0 (the GPU check: the export moves the weights through the
CPU). Eval mode, no gradients, bf16 autocast on a GPU (fp32 on a CPU). Before timing, each impl's outputs agree with
ours (asserted). FLOPs for TFLOP/s: blip2fast.flops (qformer_query_forward_flops, itc_scoring_flops,
itm_scoring_flops), the same for every impl.
"""
from __future__ import annotations

import math
import tempfile

import pytest
import torch

import e2e_support as E
from blip2fast import flops
from lavis_baseline import LavisFormulation

IMPLS = ("blip2fast", "lavis") + (("transformers",) if E.HF_EXPORT else ())  # E.HF_EXPORT: no export wanted
BENCHES = ("qformer_fwd", "itc_scores", "itm_scores")


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    pytest.importorskip("transformers")
    cfg = E.stage1_config()
    S = E.SCORING
    model = E.build_model(cfg).eval()
    lavis = LavisFormulation(model)
    theirs = None
    if "transformers" in IMPLS:
        with tempfile.TemporaryDirectory(dir=str(tmp_path_factory.getbasetemp())) as folder:
            theirs = E.transformers_peer(model, "retrieval", folder).eval()
    q = cfg.qformer
    B = S.batch
    px = E.images(B, cfg.vision.image_size)
    ids, mask = E.qformer_text(B, S.text_len, q.vocab_size, q.cls_token_id)
    with torch.no_grad(), E.autocast():
        embeds = model.image_embeds(px)  # the Q-Former benchmark's input, computed once

    def wrap(fn):
        def run():
            with torch.no_grad(), E.autocast():
                return fn()
        return run

    fns = {
        "qformer_fwd": {
            "blip2fast": wrap(lambda: model.qformer.query_pass(model.query_tokens.expand(B, -1, -1),
                                                               model.qformer.image_kv(embeds))[0]),
            "lavis": wrap(lambda: lavis.query_pass(embeds)[0]),
            "transformers": wrap(lambda: theirs.qformer(
                query_embeds=theirs.query_tokens.expand(B, -1, -1), encoder_hidden_states=embeds,
                encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            ).last_hidden_state),
        },
        "itc_scores": {
            "blip2fast": wrap(lambda: model.itc_scores(px, ids, mask)),
            "lavis": wrap(lambda: lavis.itc_scores(px, ids, mask)),
            "transformers": wrap(lambda: theirs(pixel_values=px, input_ids=ids, attention_mask=mask,
                                                use_image_text_matching_head=False).logits_per_image),
        },
        "itm_scores": {
            "blip2fast": wrap(lambda: model.itm_logits(px, ids, mask)),
            "lavis": wrap(lambda: lavis.itm_logits(px, ids, mask)),
            "transformers": wrap(lambda: theirs(pixel_values=px, input_ids=ids, attention_mask=mask,
                                                use_image_text_matching_head=True).logits_per_image),
        },
    }
    fns = {bench: {impl: fn for impl, fn in impls.items() if impl in IMPLS} for bench, impls in fns.items()}
    checks = {}
    for bench, impls in fns.items():
        want = impls["blip2fast"]()
        checks[bench] = {f"rel_err_{impl}": E.assert_equal(f"{bench} ({impl} vs blip2fast)", impls[impl]().float(),
                                                           want.float())
                         for impl in IMPLS if impl != "blip2fast"}
    bench_flops = {
        "qformer_fwd": flops.qformer_query_forward_flops(cfg, B),
        "itc_scores": flops.itc_scoring_flops(cfg, B, B, S.text_len, model),
        "itm_scores": flops.itm_scoring_flops(cfg, B, S.text_len, model),
    }
    measured = {bench: E.measure(impls, S) for bench, impls in fns.items()}
    config = {"vision": f"EVA {cfg.vision.width}x{cfg.vision.depth}, {cfg.vision.seq_len} tokens",
              "qformer": f"{q.hidden_size}x{q.num_layers}, {q.num_query_tokens} queries", "text_len": S.text_len}
    return {"fns": fns, "measured": measured, "flops": bench_flops, "config": config, "checks": checks,
            "batch": B, "reps": S.reps}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bench", BENCHES)
def test_qformer_hf(benchmark, suite, bench, impl):
    info = E.report(benchmark, bench, impl, suite["fns"][bench][impl], suite["measured"][bench],
                    suite["flops"][bench], suite["batch"], suite["config"], suite["checks"][bench], suite["reps"])
    assert math.isfinite(info["median_ms"]) and info["samples_per_s"] > 0
