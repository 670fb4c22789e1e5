"""Ranks and recall@K on hand-made score matrices: ties count against the query, NaN too, several captions per
image, and the two-tier order (reranked candidates first, then the rest by ITC)."""
from __future__ import annotations

import math

import pytest
import torch

from blip2fast.eval.retrieval import (i2t_ranks, metrics_from_ranks, rank_of_first_correct, ranks_with_candidates,
                                      recall_at, t2i_ranks, top_candidates)

NAN = float("nan")


def test_rank_counts_incorrect_items_ahead():
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.7],
                           [0.2, 0.8, 0.3, 0.1],
                           [0.4, 0.6, 0.5, 0.3]])
    correct = torch.eye(3, 4, dtype=torch.bool)
    ranks, has = rank_of_first_correct(scores, correct)
    assert ranks.tolist() == [0, 0, 1] and has.all()  # row 2: only 0.6 beats its 0.5
    assert recall_at(ranks, (1, 2)) == {1: pytest.approx(2 / 3), 2: 1.0}


def test_ties_count_against_the_query():
    scores = torch.tensor([[0.5, 0.5, 0.5],  # all tied: the correct item 0 has two incorrect items level with it
                           [0.1, 0.7, 0.7],  # correct item 1 tied with item 2
                           [0.3, 0.3, 0.9]])  # correct item 2 strictly first: ties elsewhere do not matter
    ranks, _ = rank_of_first_correct(scores, torch.eye(3, dtype=torch.bool))
    assert ranks.tolist() == [2, 1, 0]
    # a collapsed model (every score equal) gets R@1 = 0, never 1
    flat = torch.zeros(5, 5)
    r, _ = rank_of_first_correct(flat, torch.eye(5, dtype=torch.bool))
    assert recall_at(r, (1,))[1] == 0.0 and r.tolist() == [4] * 5


def test_nan_counts_against_the_query():
    scores = torch.tensor([[0.9, NAN, 0.1],  # an incorrect NaN is ahead of the correct 0.9
                           [0.5, NAN, 0.1],  # the correct item is NaN: everything incorrect is ahead
                           [0.2, 0.1, 0.8]])
    ranks, has = rank_of_first_correct(scores, torch.eye(3, dtype=torch.bool))
    assert ranks.tolist() == [1, 2, 0] and has.all()


def test_several_correct_items_the_best_one_counts():
    # image query with 3 captions (items 0, 2, 3): the best correct caption scores 0.8; only item 1 (0.9) beats it.
    # Correct items tied with each other never count against the query.
    scores = torch.tensor([[0.8, 0.9, 0.8, 0.1, 0.85]])
    correct = torch.tensor([[True, False, True, True, False]])
    ranks, _ = rank_of_first_correct(scores, correct)
    assert ranks.tolist() == [2]  # 0.9 and 0.85 ahead of 0.8


def test_multi_caption_protocol():
    """2 images, 5 captions (image 0 has captions 0, 1, 2; image 1 has 3, 4): image queries are correct when any
    of their captions ranks within K; caption queries have one correct image."""
    text_image = torch.tensor([0, 0, 0, 1, 1])
    sim = torch.tensor([[0.1, 0.7, 0.2, 0.9, 0.3],   # image 0: best own caption 0.7, one other (0.9) ahead -> 1
                        [0.6, 0.5, 0.4, 0.2, 0.8]])  # image 1: own caption 4 first -> 0
    r_i2t = i2t_ranks(text_image, 2, sim)
    assert r_i2t.tolist() == [1, 0]
    r_t2i = t2i_ranks(text_image, 2, sim.t())
    # caption 0: image 1 (0.6) > image 0 (0.1) -> 1; caption 1: 0.7 vs 0.5 -> 0; 2: 0.2 vs 0.4 -> 1;
    # caption 3 (image 1): 0.2 vs 0.9 -> 1; caption 4: 0.8 vs 0.3 -> 0
    assert r_t2i.tolist() == [1, 0, 1, 1, 0]
    m = metrics_from_ranks(r_i2t, r_t2i, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(0.5) and m["i2t_r2"] == 1.0
    assert m["t2i_r1"] == pytest.approx(0.4) and m["t2i_r2"] == 1.0
    assert m["r_mean"] == pytest.approx((0.75 + 0.7) / 2)


def test_two_tier_order_candidates_then_the_rest():
    full = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])  # ITC
    cand = torch.tensor([[0, 1]])  # top 2 by ITC, rescored
    cand_scores = torch.tensor([[1.0, 3.0]])  # the rerank puts item 1 first
    # correct item 1 is a candidate and now first
    assert ranks_with_candidates(cand, cand_scores, full, torch.tensor([[0, 1, 0, 0, 0]]).bool()).tolist() == [0]
    # correct item 0: behind candidate 1 after the rerank
    assert ranks_with_candidates(cand, cand_scores, full, torch.tensor([[1, 0, 0, 0, 0]]).bool()).tolist() == [1]
    # correct item 3 is no candidate: after both candidates and after item 2 (ITC 0.7 > 0.6)
    assert ranks_with_candidates(cand, cand_scores, full, torch.tensor([[0, 0, 0, 1, 0]]).bool()).tolist() == [3]
    # a non-candidate tied with the correct non-candidate counts against it
    tied = torch.tensor([[0.9, 0.8, 0.6, 0.6, 0.5]])
    assert ranks_with_candidates(cand, cand_scores, tied, torch.tensor([[0, 0, 0, 1, 0]]).bool()).tolist() == [3]
    # no correct item at all: rank M (a miss at every K)
    assert ranks_with_candidates(cand, cand_scores, full, torch.zeros(1, 5, dtype=torch.bool)).tolist() == [5]


def test_top_candidates_stable_on_ties_and_nan_last():
    scores = torch.tensor([[0.5, 0.9, 0.5, NAN, 0.5]])
    assert top_candidates(scores, 3).tolist() == [[1, 0, 2]]  # ties at the k-th place: lower index first
    assert top_candidates(scores, 10).tolist() == [[1, 0, 2, 4, 3]]  # k > M: all, NaN last


def test_recall_of_no_queries_is_nan():
    assert all(math.isnan(v) for v in recall_at(torch.empty(0, dtype=torch.long)).values())
