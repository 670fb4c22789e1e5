"""Zero-shot image <-> text retrieval with BLIP-2's protocol (spec section 5).

    1. features   image: ln_vision(ViT) -> query pass -> normalize(vision_proj)  (N_img, Q, E), plus the
                  ln_vision output kept for ITM; text: the text pass's [CLS] -> normalize(text_proj) (N_txt, E)
    2. ITC        sim[i, t] = max_q <image_feats[i, q], text_feat[t]>  (cosine, no temperature), all pairs
    3. candidates the top k (default 128) of each image's row (i2t) and of each text's column (t2i)
    4. rerank     each candidate pair gets  ITM class-1 logit (mean over queries) + sim[i, t]
    5. recall     R@1/5/10 for image -> text (i2t, "text retrieval") and text -> image (t2i, "image retrieval"),
                  each direction's mean and the mean of all six (r_mean)

Several captions per image (COCO: 5, Flickr30K: 5): `text_image[t]` is the image of caption t. A text query has
one correct image; an image query is correct at K when any of its captions ranks within the first K.

Ranking, ties and NaN (documented rule): the final order of a query's items is the k candidates by their reranked
score, then every other item by its ITC score. The rank of a query is the number of *incorrect* items placed
ahead of its best correct item, where an incorrect item that scores exactly as high as that correct item counts
as ahead (a tie counts against the query) and so does any NaN score; a correct item whose score is NaN is worth
nothing. So a collapsed model that scores everything alike gets R@K = 0, never 1. Candidate selection itself is a
stable sort of ITC scores: among items tied at the k-th place, lower indices become candidates.

Batching and ranks: features are computed in batches (by whoever holds the data: with torch.distributed, each
rank encodes its own part), then gathered so every rank holds all features. The ITC matrix is computed in row
blocks split across ranks and gathered; the candidate pairs of both directions are merged and deduplicated, sorted
by image, split across ranks and scored by the Q-Former's ITM pass in batches of `itm_batch` pairs (each batch
projects its distinct images' cross-attention K/V once and indexes them per row), then gathered. Every rank ends
with the same metrics. With k >= N the rerank is exactly brute-force ITM + cosine over all pairs (tested).

`evaluate_retrieval(model, batches)` is the entry point for the training loop (1:1 image-caption pairs from a
held-out shard); `retrieval_from_features` / `encode_*` are the pieces for multi-caption datasets (the CLI).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import world
from .common import Amp, autocast, eval_mode, gather_cat, model_device, split_range, unwrap

RECALL_KS = (1, 5, 10)
DEFAULT_K = 128  # the paper's / LAVIS's candidates per query
_SIM_BLOCK = 1 << 24  # elements of the (rows, Q, N_txt) product computed at once (64 MiB in fp32)


# ------------------------------------------------------------------------------------------------ features
@dataclass
class RetrievalFeatures:
    """What retrieval needs about N_img images and N_txt texts (the local part on each rank, or all of it)."""

    image_feats: Tensor  # (N_img, Q, E) L2-normalised ITC image features
    image_embeds: Tensor  # (N_img, N_tok, Dv) ln_vision(ViT) output: ITM's cross-attention input
    text_feat: Tensor  # (N_txt, E) L2-normalised ITC text features
    text_ids: Tensor  # (N_txt, T) Q-Former ids, [CLS] first
    text_mask: Tensor  # (N_txt, T)
    text_image: Tensor  # (N_txt,) int64: index (into this object's images) of each text's image

    def __post_init__(self):
        n_img, n_txt = self.image_feats.shape[0], self.text_feat.shape[0]
        if self.image_embeds.shape[0] != n_img:
            raise ValueError(f"{self.image_embeds.shape[0]} image embeds for {n_img} image features")
        if self.text_ids.shape[0] != n_txt or self.text_mask.shape != self.text_ids.shape:
            raise ValueError(f"text ids {tuple(self.text_ids.shape)} / mask {tuple(self.text_mask.shape)} for "
                             f"{n_txt} text features")
        if self.text_image.shape != (n_txt,):
            raise ValueError(f"text_image must be ({n_txt},), got {tuple(self.text_image.shape)}")
        if n_txt and (int(self.text_image.min()) < 0 or int(self.text_image.max()) >= n_img):
            raise ValueError(f"text_image holds indices outside [0, {n_img}): every text must name one of the "
                             f"{n_img} images")

    @property
    def num_images(self) -> int:
        return self.image_feats.shape[0]

    @property
    def num_texts(self) -> int:
        return self.text_feat.shape[0]

    def gathered(self) -> "RetrievalFeatures":
        """Every rank's part, concatenated in rank order (text_image shifted to global image indices)."""
        _, n = world()
        if n == 1:
            return self
        counts = gather_cat(torch.tensor([self.num_images], dtype=torch.int64, device=self.text_image.device))
        offset = int(counts[: _rank()].sum())
        return RetrievalFeatures(
            image_feats=gather_cat(self.image_feats), image_embeds=gather_cat(self.image_embeds),
            text_feat=gather_cat(self.text_feat), text_ids=gather_cat(self.text_ids),
            text_mask=gather_cat(self.text_mask), text_image=gather_cat(self.text_image + offset),
        )


def _rank() -> int:
    return world()[0]


@torch.no_grad()
def encode_images(model: nn.Module, pixel_values: Tensor, amp: Amp = None) -> tuple[Tensor, Tensor]:
    """(ITC image features (B, Q, E), ln_vision output (B, N_tok, Dv)): the ViT runs once for both."""
    model = unwrap(model)
    dev = model_device(model)
    with autocast(dev, amp):
        embeds = model.image_embeds(pixel_values.to(dev))
        queries = model.query_tokens.expand(embeds.shape[0], -1, -1)
        query_out, _ = model.qformer.query_pass(queries, model.qformer.image_kv(embeds))
        feats = F.normalize(model.vision_proj(query_out), dim=-1)
    return feats, embeds


@torch.no_grad()
def encode_texts(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, amp: Amp = None) -> Tensor:
    """(B, E) ITC text features."""
    model = unwrap(model)
    dev = model_device(model)
    with autocast(dev, amp):
        return model.text_features(input_ids.to(dev), attention_mask.to(dev))


# ------------------------------------------------------------------------------------------------ scores
@torch.no_grad()
def itc_similarity(image_feats: Tensor, text_feat: Tensor, rows: Optional[tuple[int, int]] = None) -> Tensor:
    """sim[i, t] = max_q <image_feats[i, q], text_feat[t]> in float32, for image rows [rows[0], rows[1])
    (all rows by default): (rows, N_txt). Computed in row blocks that bound the (rows, Q, N_txt) product."""
    start, end = rows if rows is not None else (0, image_feats.shape[0])
    Q, n_txt = image_feats.shape[1], text_feat.shape[0]
    step = max(1, _SIM_BLOCK // max(1, Q * n_txt))
    out = torch.empty((end - start, n_txt), dtype=torch.float32, device=text_feat.device)
    text = text_feat.float()
    for s in range(start, end, step):
        e = min(end, s + step)
        block = torch.einsum("iqe,te->iqt", image_feats[s:e].to(text.device).float(), text)
        out[s - start:e - start] = block.amax(dim=1)
    return out


def itc_similarity_all_ranks(image_feats: Tensor, text_feat: Tensor, distributed: bool = True) -> Tensor:
    """The full (N_img, N_txt) ITC matrix, each rank computing a contiguous block of image rows (gathered)."""
    if not distributed or world()[1] == 1:
        return itc_similarity(image_feats, text_feat)
    return gather_cat(itc_similarity(image_feats, text_feat, split_range(image_feats.shape[0])))


@torch.no_grad()
def itm_pair_logits(model: nn.Module, feats: RetrievalFeatures, image_index: Tensor, text_index: Tensor,
                    itm_batch: int = 256, amp: Amp = None) -> Tensor:
    """(P, 2) float32 ITM logits of the pairs (image image_index[p], text text_index[p]).

    Batched: each batch of `itm_batch` pairs projects the cross-attention K/V of its distinct images once and the
    Q-Former's ITM pass picks them per row (`image_index`); sort the pairs by image to keep batches' images few."""
    model = unwrap(model)
    dev = model_device(model)
    P = image_index.shape[0]
    out = torch.empty((P, 2), dtype=torch.float32, device=dev)
    image_index, text_index = image_index.to(dev), text_index.to(dev)
    with autocast(dev, amp):
        weights = model.qformer.projection_weights()  # once for every batch of pairs (in the autocast dtype)
    for s in range(0, P, itm_batch):
        e = min(P, s + itm_batch)
        images, rows = torch.unique(image_index[s:e], return_inverse=True)
        txt = text_index[s:e]
        with autocast(dev, amp):
            kv = model.qformer.image_kv(feats.image_embeds[images.to(feats.image_embeds.device)].to(dev), weights)
            queries = model.query_tokens.expand(e - s, -1, -1)
            states = model.qformer.itm_pass(queries, feats.text_ids[txt.to(feats.text_ids.device)].to(dev),
                                            feats.text_mask[txt.to(feats.text_mask.device)].to(dev), kv, rows,
                                            weights=weights)
            out[s:e] = model._itm_head(states).float()
    return out


# ------------------------------------------------------------------------------------------------ ranks
def rank_of_first_correct(scores: Tensor, correct: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per row: (the number of incorrect items ranked ahead of the best correct item, whether a correct item
    exists), over the items where `valid` (default: all). Ties with the best correct score and NaN scores count as
    ahead; a NaN correct score is worth -inf. scores, correct, valid: (R, M) -> ((R,) int64, (R,) bool)."""
    if scores.shape != correct.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and correct {tuple(correct.shape)} differ in shape")
    correct = correct.bool()
    keep = correct if valid is None else correct & valid
    clean = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    best = clean.masked_fill(~keep, float("-inf")).amax(dim=1, keepdim=True) if scores.shape[1] else \
        clean.new_full((scores.shape[0], 1), float("-inf"))
    ahead = ~correct & ~(scores.float() < best)  # NaN < best is False: NaN counts as ahead
    if valid is not None:
        ahead &= valid
    return ahead.sum(dim=1), keep.any(dim=1)


def ranks_with_candidates(cand_index: Tensor, cand_scores: Tensor, full_scores: Tensor,
                          correct: Tensor) -> Tensor:
    """Ranks (R,) under the two-tier order: the k candidates (cand_index (R, k)) by cand_scores, then the other
    items by full_scores (R, M). correct: (R, M) bool. A row without any correct item gets rank M (a miss)."""
    k, M = cand_index.shape[1], full_scores.shape[1]
    r_cand, in_cand = rank_of_first_correct(cand_scores, correct.gather(1, cand_index))
    is_cand = torch.zeros_like(correct, dtype=torch.bool).scatter_(1, cand_index, True)
    r_rest, in_rest = rank_of_first_correct(full_scores, correct, valid=~is_cand)
    rank = torch.where(in_cand, r_cand, k + r_rest)
    return torch.where(in_cand | in_rest, rank, torch.full_like(rank, M))


def recall_at(ranks: Tensor, ks: Sequence[int] = RECALL_KS) -> dict:
    """{k: fraction of queries whose rank < k} (rank 0 = the best correct item is first)."""
    if ranks.numel() == 0:
        return {k: float("nan") for k in ks}
    return {k: (ranks < k).float().mean().item() for k in ks}


def _rows(n: int, m: int) -> int:
    """Rows per block so that a (rows, m) working set stays around 2^24 elements."""
    return max(1, (1 << 24) // max(1, m))


def i2t_ranks(text_image: Tensor, n_img: int, sim: Tensor, cand: Optional[Tensor] = None,
              cand_scores: Optional[Tensor] = None) -> Tensor:
    """(N_img,) image-query ranks: correct = the image's captions. Plain ITC order when cand is None."""
    out = torch.empty(n_img, dtype=torch.int64, device=sim.device)
    step = _rows(n_img, sim.shape[1])
    for s in range(0, n_img, step):
        e = min(n_img, s + step)
        correct = text_image.to(sim.device)[None, :] == torch.arange(s, e, device=sim.device)[:, None]
        if cand is None:
            r, has = rank_of_first_correct(sim[s:e], correct)
            out[s:e] = torch.where(has, r, torch.full_like(r, sim.shape[1]))
        else:
            out[s:e] = ranks_with_candidates(cand[s:e], cand_scores[s:e], sim[s:e], correct)
    return out


def t2i_ranks(text_image: Tensor, n_img: int, sim_t: Tensor, cand: Optional[Tensor] = None,
              cand_scores: Optional[Tensor] = None) -> Tensor:
    """(N_txt,) text-query ranks over images (sim_t: (N_txt, N_img)): correct = the text's image."""
    n_txt = sim_t.shape[0]
    out = torch.empty(n_txt, dtype=torch.int64, device=sim_t.device)
    step = _rows(n_txt, n_img)
    images = torch.arange(n_img, device=sim_t.device)
    for s in range(0, n_txt, step):
        e = min(n_txt, s + step)
        correct = images[None, :] == text_image[s:e].to(sim_t.device)[:, None]
        if cand is None:
            r, has = rank_of_first_correct(sim_t[s:e], correct)
            out[s:e] = torch.where(has, r, torch.full_like(r, n_img))
        else:
            out[s:e] = ranks_with_candidates(cand[s:e], cand_scores[s:e], sim_t[s:e], correct)
    return out


def top_candidates(scores: Tensor, k: int) -> Tensor:
    """(R, k) indices of each row's k best scores: a stable descending sort (ties: lower index first; NaN last)."""
    k = min(k, scores.shape[1])
    out = torch.empty((scores.shape[0], k), dtype=torch.int64, device=scores.device)
    step = _rows(scores.shape[0], scores.shape[1])
    for s in range(0, scores.shape[0], step):
        block = torch.nan_to_num(scores[s:s + step], nan=float("-inf"))
        out[s:s + step] = torch.sort(block, dim=1, descending=True, stable=True).indices[:, :k]
    return out


def metrics_from_ranks(i2t: Tensor, t2i: Tensor, ks: Sequence[int] = RECALL_KS, prefix: str = "") -> dict:
    """{prefix}i2t_r{k}, {prefix}t2i_r{k}, the per-direction means and r_mean (fractions in [0, 1])."""
    out = {}
    r_i2t, r_t2i = recall_at(i2t, ks), recall_at(t2i, ks)
    for k in ks:
        out[f"{prefix}i2t_r{k}"] = r_i2t[k]
    for k in ks:
        out[f"{prefix}t2i_r{k}"] = r_t2i[k]
    out[f"{prefix}i2t_r_mean"] = sum(r_i2t.values()) / len(ks)
    out[f"{prefix}t2i_r_mean"] = sum(r_t2i.values()) / len(ks)
    out[f"{prefix}r_mean"] = (out[f"{prefix}i2t_r_mean"] + out[f"{prefix}t2i_r_mean"]) / 2
    return out


# ------------------------------------------------------------------------------------------------ protocol
@dataclass
class RetrievalResult:
    metrics: dict  # see retrieval_from_features
    sim: Tensor  # (N_img, N_txt) ITC cosine
    i2t_index: Tensor  # (N_img, k_t) candidate texts per image
    i2t_scores: Tensor  # (N_img, k_t) ITM class-1 logit + cosine
    t2i_index: Tensor  # (N_txt, k_i) candidate images per text
    t2i_scores: Tensor  # (N_txt, k_i)
    i2t_ranks: Tensor  # (N_img,) rank of each image query (0 = a correct caption first)
    t2i_ranks: Tensor  # (N_txt,)
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def retrieval_from_features(model: nn.Module, feats: RetrievalFeatures, k: int = DEFAULT_K, itm_batch: int = 256,
                            amp: Amp = None, ks: Sequence[int] = RECALL_KS,
                            distributed: bool = True) -> RetrievalResult:
    """The protocol of the module docstring on this rank's part of the data, `feats`.

    distributed=True (with an initialised process group): every rank must call this; the parts are gathered and
    the work split. distributed=False: `feats` is the whole set and this process does everything alone, with no
    collective call (e.g. an evaluation that only rank 0 runs).

    metrics: n_images, n_texts, k, i2t_r{1,5,10}, t2i_r{1,5,10}, i2t_r_mean, t2i_r_mean, r_mean (reranked), the
    same with an `itc_` prefix for the ITC ranking alone, and chance_i2t_r1 / chance_t2i_r1 (a random ranking's
    expected R@1). Recalls are fractions in [0, 1]."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 (candidates per query)")
    if itm_batch < 1:
        raise ValueError(f"itm_batch={itm_batch} must be >= 1")
    model = unwrap(model)
    dev = model_device(model)
    distributed = distributed and world()[1] > 1
    if distributed:
        feats = feats.gathered()
    n_img, n_txt = feats.num_images, feats.num_texts
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs images and texts; got {n_img} images and {n_txt} texts")
    text_image = feats.text_image.to(dev)
    with eval_mode(model):
        sim = itc_similarity_all_ranks(feats.image_feats, feats.text_feat.to(dev), distributed)  # (N_img, N_txt)
        i2t_idx = top_candidates(sim, k)  # (N_img, k_t)
        t2i_idx = top_candidates(sim.t(), k)  # (N_txt, k_i)
        # every candidate pair of both directions, once, as image * N_txt + text (sorted: grouped by image)
        i2t_pairs = torch.arange(n_img, device=dev)[:, None] * n_txt + i2t_idx
        t2i_pairs = t2i_idx * n_txt + torch.arange(n_txt, device=dev)[:, None]
        pairs = torch.unique(torch.cat([i2t_pairs.flatten(), t2i_pairs.flatten()]))
        start, end = split_range(pairs.shape[0]) if distributed else (0, pairs.shape[0])
        mine = pairs[start:end]
        logits = itm_pair_logits(model, feats, mine // n_txt, mine % n_txt, itm_batch, amp)
        if distributed:
            logits = gather_cat(logits)
        itm1 = logits[:, 1]
        i2t_scores = itm1[torch.searchsorted(pairs, i2t_pairs)] + sim.gather(1, i2t_idx)
        t2i_scores = itm1[torch.searchsorted(pairs, t2i_pairs)] + sim.t().gather(1, t2i_idx)
    r_i2t = i2t_ranks(text_image, n_img, sim, i2t_idx, i2t_scores)
    r_t2i = t2i_ranks(text_image, n_img, sim.t(), t2i_idx, t2i_scores)
    itc_i2t = i2t_ranks(text_image, n_img, sim)
    itc_t2i = t2i_ranks(text_image, n_img, sim.t())
    captions_per_image = torch.bincount(text_image, minlength=n_img).float()
    metrics = {"n_images": n_img, "n_texts": n_txt, "k": k, "itm_pairs": int(pairs.shape[0])}
    metrics.update(metrics_from_ranks(r_i2t, r_t2i, ks))
    metrics.update(metrics_from_ranks(itc_i2t, itc_t2i, ks, prefix="itc_"))
    metrics["chance_i2t_r1"] = (captions_per_image / n_txt).mean().item()
    metrics["chance_t2i_r1"] = 1.0 / n_img
    return RetrievalResult(metrics, sim, i2t_idx, i2t_scores, t2i_idx, t2i_scores, r_i2t, r_t2i,
                           extra={"itm_logits": logits, "pairs": pairs})


# ------------------------------------------------------------------------------------------------ entry points
def _batch_fields(batch) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(batch, dict):
        missing = [f for f in ("pixel_values", "input_ids", "attention_mask") if f not in batch]
        if missing:
            raise ValueError(f"a retrieval batch needs pixel_values, input_ids and attention_mask; missing {missing} "
                             f"(keys: {sorted(batch)})")
        return batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    try:
        return batch.pixel_values, batch.input_ids, batch.attention_mask
    except AttributeError:
        raise TypeError(f"a retrieval batch must be a dict or an object with pixel_values, input_ids and "
                        f"attention_mask; got {type(batch).__name__}") from None


@torch.no_grad()
def encode_pairs(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None, amp: Amp = None,
                 embeds_device: Optional[torch.device] = None) -> RetrievalFeatures:
    """Features of 1:1 image-caption batches (caption b belongs to image b), this rank's batches only."""
    model = unwrap(model)
    dev = model_device(model)
    parts: dict = {"f": [], "e": [], "t": [], "i": [], "m": []}
    with eval_mode(model):
        for batch in itertools.islice(batches, max_batches):
            pixel_values, ids, mask = _batch_fields(batch)
            if pixel_values.shape[0] != ids.shape[0]:
                raise ValueError(f"a batch has {pixel_values.shape[0]} images and {ids.shape[0]} captions; 1:1 "
                                 "pairs are expected")
            f, e = encode_images(model, pixel_values, amp)
            parts["f"].append(f)
            parts["e"].append(e if embeds_device is None else e.to(embeds_device))
            parts["t"].append(encode_texts(model, ids, mask, amp))
            parts["i"].append(ids.to(dev))
            parts["m"].append(mask.to(dev))
    if not parts["f"]:
        raise ValueError("no batches: the loader yielded nothing to evaluate")
    n = sum(x.shape[0] for x in parts["f"])
    return RetrievalFeatures(torch.cat(parts["f"]), torch.cat(parts["e"]), torch.cat(parts["t"]),
                             torch.cat(parts["i"]), torch.cat(parts["m"]), torch.arange(n, device=dev))


def evaluate_retrieval(model: nn.Module, loader_or_batches: Iterable, k: int = DEFAULT_K,
                       max_batches: Optional[int] = None, itm_batch: int = 256, amp: Amp = "auto",
                       embeds_device: Optional[torch.device] = None, distributed: bool = True) -> dict:
    """Retrieval metrics of 1:1 image-caption pairs: for the training loop's periodic evaluation on a held-out
    shard or any iterable of batches. With an initialised process group and distributed=True (the default) every
    rank must call it with its own batches (they are gathered: the metrics are over all ranks' pairs);
    distributed=False evaluates this process's batches alone without any collective (a rank-0-only evaluation).

    Batches are dicts with pixel_values, input_ids, attention_mask (a `ShardLoader`'s) or objects with those
    attributes (`data.synthetic.Batch`). Caption b belongs to image b. `max_batches` bounds the batches read per
    rank; a resampled (infinite) ShardLoader needs it. The model's train/eval mode is restored afterwards. amp:
    "auto" = bfloat16 autocast on CUDA, none on the CPU. Returns the metrics of `retrieval_from_features`.
    """
    cfg = getattr(loader_or_batches, "cfg", None)
    if max_batches is None and getattr(cfg, "resampled", False):
        raise ValueError("this ShardLoader is resampled (infinite): pass max_batches, or build the held-out loader "
                         "with WebDataConfig(resampled=False, train=False)")
    feats = encode_pairs(model, loader_or_batches, max_batches, amp, embeds_device)
    return retrieval_from_features(model, feats, k=k, itm_batch=itm_batch, amp=amp, distributed=distributed).metrics
