"""Evaluation with the paper's protocol (spec section 5): zero-shot retrieval (ITC top-k reranked by ITM), captioning
(LLM or stage-1 Q-Former decoder; COCO metrics through pycocoevalcap) and zero-shot VQA (VQAv2 accuracy).

`evaluate_retrieval(model, batches, k=128)` is what a training loop calls on a held-out shard. The command line is
`python -m blip2fast.eval {retrieval,caption,vqa} ...` (cli.py). Submodules import transformers / pycocoevalcap
only where used, so `import blip2fast.eval` stays cheap.
"""
from .retrieval import (RetrievalFeatures, RetrievalResult, encode_images, encode_pairs, encode_texts,
                        evaluate_retrieval, itc_similarity, itm_pair_logits, rank_of_first_correct,
                        ranks_with_candidates, recall_at, retrieval_from_features)

__all__ = ["RetrievalFeatures", "RetrievalResult", "encode_images", "encode_pairs", "encode_texts",
           "evaluate_retrieval", "itc_similarity", "itm_pair_logits", "rank_of_first_correct",
           "ranks_with_candidates", "recall_at", "retrieval_from_features"]
