"""The Q-Former: a post-LN BERT whose first tokens are learned queries that cross-attend the image.

One stack of layers serves four kinds of pass (the spec's mask table); each is a method here:

    query_pass   [queries]           bidirectional self-attention, cross-attention to the image, query FFN.
                                     Keeps every layer's self-attention K/V: ITG and generation attend to them.
    text_pass    [text]              bidirectional with key padding, no cross-attention, text FFN.
    itm_pass     [queries | text]    fully bidirectional (padding masked); query rows cross-attend their image
                                     (picked per row from K/V projected once per step); query FFN on the query
                                     rows, text FFN on the text rows.
    itg_pass     [text]              attends to the cached query K/V plus causally to earlier text; text FFN.
    query_itg_pass [queries | text]  training's query and ITG passes as one (the same mathematics; see there).

Image K/V: `image_kv(image_embeds)` projects every cross-attention layer's K/V once per step, all layers in one
GEMM (the image is read and cast once, and its gradient is one GEMM accumulating over the layers in fp32, not one
per layer plus five fp32 sums); every pass that cross-attends reads them (optionally through a row -> image
index), so no image is projected twice.

Input projections are one GEMM each: self-attention's query, key and value read the same hidden states, and
cross-attention's key and value the same image, so each block multiplies by the concatenation of its nn.Linear
weights (`Attention.fused_projection`). The nn.Linear modules keep the parameters (state-dict keys, checkpoints and
the LAVIS / transformers layouts are unchanged); training concatenates (and casts to the autocast dtype) once per
step with `QFormer.projection_weights()` and hands the result to every pass, so one cast serves all passes as
autocast's weight cache did, and each pass's backward is one GEMM per block for the input gradient (summed over
q, k and v inside the GEMM in fp32) instead of three GEMMs, three casts and two adds.

Parameter names are our own and map one-to-one to LAVIS's `Qformer.bert.*` names (see checkpoint/lavis.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import QFormerConfig
from ..ops.attention import AttnDropout, qformer_attention
from ..ops.autocast import autocast_dtype
from ..ops.layer_norm import layer_norm

# Pass ids feed the dropout hash's `site` so different passes draw independent masks.
PASS_QUERY, PASS_TEXT, PASS_ITM, PASS_ITG, PASS_GENERATE = range(5)


@dataclass
class DropoutContext:
    """Per-call inputs of the hashed attention dropout (None in eval mode or with p = 0)."""

    seed_step: Tensor  # (2,) int64 [seed, step]
    row_ids: Tensor  # (B,) int64 global rows
    pass_id: int

    def at(self, p: float, layer: int, cross: bool, q_offset: int = 0) -> AttnDropout:
        site = self.pass_id * 1024 + 2 * layer + int(cross)
        return AttnDropout(p=p, seed_step=self.seed_step, site=site, row_ids=self.row_ids, q_offset=q_offset)


class Embeddings(nn.Module):
    """cat(queries, word + position) -> LayerNorm -> dropout. Queries get no position; text positions start at 0."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: Optional[Tensor] = None, queries: Optional[Tensor] = None) -> Tensor:
        parts = []
        if queries is not None:
            parts.append(queries)
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.norm(x))


Projection = tuple[Tensor, Tensor]  # (weight (out, in), bias (out,)) of a fused input projection


@dataclass
class ProjectionWeights:
    """Every block's fused input projection, built once per step (`QFormer.projection_weights`): `self_qkv[i]` of
    layer i's self-attention, `image_kv` the [key | value] of every cross-attention layer stacked (one GEMM in
    `QFormer.image_kv`)."""

    self_qkv: list[Projection]
    image_kv: Optional[Projection]  # [key | value] of every cross-attention layer, in layer order (None: none)


def _cast_for_autocast(weight: Tensor, bias: Tensor) -> Projection:
    """(weight, bias) in the autocast dtype when autocast is on for their device (F.linear then casts only its
    input), else unchanged."""
    dtype = autocast_dtype(weight.device.type)
    return (weight, bias) if dtype is None else (weight.to(dtype), bias.to(dtype))


class Attention(nn.Module):
    """Multi-head attention + output projection + dropout + residual + post-LN (BERT's attention block)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int, cross: bool = False):
        super().__init__()
        self.cross = cross  # cross-attention: q from the hidden states, k and v from the image
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.attn_dropout_p = cfg.attention_dropout

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)

    def fused_projection(self) -> Projection:
        """The input projections as one (weight, bias): [query | key | value] for self-attention, [key | value]
        for cross-attention. Under autocast it comes cast to the autocast dtype, so F.linear casts only the input;
        gradients reach the three (two) nn.Linear parameters through the concatenation."""
        linears = (self.key, self.value) if self.cross else (self.query, self.key, self.value)
        return _cast_for_autocast(torch.cat([l.weight for l in linears]), torch.cat([l.bias for l in linears]))

    def project(self, x: Tensor, weights: Optional[Projection] = None) -> tuple[Tensor, ...]:
        """(q, k, v) of x for self-attention, (k, v) of the image x for cross-attention, each (B, H, L, d): one
        GEMM. `weights`: this block's `fused_projection()` when the caller built it already (once per step)."""
        weight, bias = self.fused_projection() if weights is None else weights
        B, L, _ = x.shape
        parts = F.linear(x, weight, bias).view(B, L, -1, self.heads, self.head_dim).unbind(2)
        return tuple(t.transpose(1, 2) for t in parts)  # unbind's backward is one stack of the three gradients

    def forward(
        self,
        hidden: Tensor,
        kv: tuple[Tensor, Tensor],
        *,
        q: Optional[Tensor] = None,
        key_padding: Optional[Tensor] = None,
        causal_prefix: Optional[int] = None,
        row_offset: int = 0,
        kv_index: Optional[Tensor] = None,
        dropout: Optional[AttnDropout] = None,
    ) -> Tensor:
        if q is None:  # cross-attention (self-attention's q comes with its k and v from `project`)
            q = self._heads(self.query(hidden))
        if dropout is not None and (not self.training or self.attn_dropout_p == 0.0):
            dropout = None
        ctx = qformer_attention(  # backend: argument > BLIP2FAST_BACKEND > automatic (ops/dispatch.py)
            q, kv[0], kv[1], key_padding=key_padding, causal_prefix=causal_prefix, row_offset=row_offset,
            kv_index=kv_index, dropout=dropout,
        )
        B, _, L, _ = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(B, L, -1)
        # LayerNorm(dense + residual) in one op (backend: argument > BLIP2FAST_BACKEND > automatic); the
        # nn.LayerNorm holds the parameters, so state-dict keys are unchanged
        n = self.norm
        return layer_norm(self.dropout(self.dense(ctx)), n.weight, n.bias, n.eps, residual=hidden)


class FeedForward(nn.Module):
    """BERT's intermediate (dense + exact GELU) and output (dense + dropout + residual + post-LN)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        n = self.norm  # LayerNorm(dense + residual) fused, as in Attention.forward
        return layer_norm(self.dropout(self.down(F.gelu(self.up(x)))), n.weight, n.bias, n.eps, residual=x)


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int, image_width: int):
        super().__init__()
        self.index = index
        self.self_attn = Attention(cfg, cfg.hidden_size)
        self.cross_attn = Attention(cfg, image_width, cross=True) if cfg.has_cross_attention(index) else None
        self.ffn = FeedForward(cfg)  # text rows
        self.ffn_query = FeedForward(cfg)  # query rows (initialised as a copy of the text FFN)

    def forward(
        self,
        hidden: Tensor,
        num_queries: int,
        *,
        key_padding: Optional[Tensor] = None,
        causal_prefix: Optional[int] = None,
        row_offset: int = 0,
        past_kv: Optional[tuple[Tensor, Tensor]] = None,
        image_kv: Optional[tuple[Tensor, Tensor]] = None,
        image_index: Optional[Tensor] = None,
        drop: Optional[DropoutContext] = None,
        q_offset: int = 0,
        qkv_weights: Optional[Projection] = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns (new hidden, this layer's self-attention K/V of `hidden`, for the cache)."""
        q, k, v = self.self_attn.project(hidden, qkv_weights)
        kv = (k, v)
        full_kv = kv if past_kv is None else (torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2))
        p = self.self_attn.attn_dropout_p
        hidden = self.self_attn(
            hidden, full_kv, q=q, key_padding=key_padding, causal_prefix=causal_prefix, row_offset=row_offset,
            dropout=None if drop is None else drop.at(p, self.index, cross=False, q_offset=q_offset),
        )
        # split, not two slices: its backward is one cat of the two gradients, where each slice's backward
        # writes a zero-filled full-size gradient and autograd then adds the two
        queries, text = hidden.split([num_queries, hidden.shape[1] - num_queries], dim=1)
        outs = []
        if num_queries:
            if self.cross_attn is not None and image_kv is not None:
                queries = self.cross_attn(
                    queries, image_kv, kv_index=image_index,
                    dropout=None if drop is None else drop.at(p, self.index, cross=True),
                )
            outs.append(self.ffn_query(queries))
        if text.shape[1]:
            outs.append(self.ffn(text))
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), kv


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: tied weight, not a second registered submodule

    @property
    def weight(self) -> Tensor:
        return self.word_embeddings[0].weight

    def transform(self, hidden: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), self.weight, self.bias)


def _queries_visible(attention_mask: Tensor, num_queries: int) -> Tensor:
    """The key-padding mask of [queries | text] keys: every query key visible, then the text's own mask."""
    return torch.cat([attention_mask.new_ones(attention_mask.shape[0], num_queries), attention_mask], dim=1)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, image_width: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg, i, image_width) for i in range(cfg.num_layers))
        self.lm_head = LMHead(cfg, self.embeddings.word_embeddings)

    def projection_weights(self) -> ProjectionWeights:
        """Every block's fused input projection (see the module docstring): build once per step, pass to each
        pass and to `image_kv` as `weights=`. Passes called without it build their own."""
        return ProjectionWeights([l.self_attn.fused_projection() for l in self.layers], self._image_projection())

    def _image_projection(self) -> Optional[Projection]:
        """[key | value] of every cross-attention layer stacked in layer order, as one (weight, bias)."""
        linears = [m for l in self.layers if l.cross_attn is not None for m in (l.cross_attn.key, l.cross_attn.value)]
        if not linears:
            return None
        return _cast_for_autocast(torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears]))

    def image_kv(self, image_embeds: Tensor, weights: Optional[ProjectionWeights] = None
                 ) -> list[Optional[tuple[Tensor, Tensor]]]:
        """Each cross-attention layer's image K/V, (B_img, H, N, d) each (None for a layer without one): all
        layers in one GEMM, once per step, reused by every pass that cross-attends."""
        cross = [l.cross_attn for l in self.layers if l.cross_attn is not None]
        if not cross:
            return [None] * len(self.layers)
        weight, bias = self._image_projection() if weights is None else weights.image_kv
        B, N, _ = image_embeds.shape
        H, d = cross[0].heads, cross[0].head_dim
        parts = F.linear(image_embeds, weight, bias).view(B, N, 2 * len(cross), H, d).unbind(2)
        kv = iter(t.transpose(1, 2) for t in parts)  # (B, H, N, d) views; unbind's backward is one stack
        return [None if l.cross_attn is None else (next(kv), next(kv)) for l in self.layers]

    def _run(self, hidden: Tensor, num_queries: int, drop: Optional[DropoutContext], q_offset: int = 0,
             past: Optional[list] = None, image_kv: Optional[list] = None,
             weights: Optional[ProjectionWeights] = None, **kw) -> tuple[Tensor, list]:
        cache = []
        for i, layer in enumerate(self.layers):
            hidden, kv = layer(
                hidden, num_queries, past_kv=None if past is None else past[i],
                image_kv=None if image_kv is None else image_kv[i], drop=drop, q_offset=q_offset,
                qkv_weights=None if weights is None else weights.self_qkv[i], **kw,
            )
            cache.append(kv)
        return hidden, cache

    def query_pass(self, queries: Tensor, image_kv: list, drop: Optional[DropoutContext] = None,
                   weights: Optional[ProjectionWeights] = None) -> tuple[Tensor, list]:
        """queries (B, Q, D) -> (query states (B, Q, D), per-layer self-attention K/V of the queries)."""
        hidden = self.embeddings(queries=queries)
        return self._run(hidden, queries.shape[1], drop, image_kv=image_kv, weights=weights)

    def text_pass(self, input_ids: Tensor, attention_mask: Tensor, drop: Optional[DropoutContext] = None,
                  weights: Optional[ProjectionWeights] = None) -> Tensor:
        hidden = self.embeddings(input_ids=input_ids)
        return self._run(hidden, 0, drop, key_padding=attention_mask, weights=weights)[0]

    def itm_pass(self, queries: Tensor, input_ids: Tensor, attention_mask: Tensor, image_kv: list,
                 image_index: Optional[Tensor], drop: Optional[DropoutContext] = None,
                 weights: Optional[ProjectionWeights] = None) -> Tensor:
        """Rows are (image image_index[r], text r) pairs; returns (R, Q + T, D)."""
        Q = queries.shape[1]
        hidden = self.embeddings(input_ids=input_ids, queries=queries)
        padding = _queries_visible(attention_mask, Q)
        return self._run(hidden, Q, drop, image_kv=image_kv, key_padding=padding, image_index=image_index,
                         weights=weights)[0]

    def query_itg_pass(self, queries: Tensor, decoder_ids: Tensor, attention_mask: Tensor, image_kv: list,
                       drop: Optional[DropoutContext] = None, weights: Optional[ProjectionWeights] = None
                       ) -> tuple[Tensor, Tensor]:
        """The query pass and the ITG pass of training as one pass over [queries | decoder text] (B, Q + T):
        returns (query states (B, Q, D), ITG text states (B, T, D)).

        Same mathematics as `query_pass` then `itg_pass` on its cache: with keys [0, Q) always visible and key
        Q + j visible to text row t iff j <= t (row_offset -Q puts the query rows before every text key), a query
        row sees only the queries, as in the query pass, and a text row sees the queries' K/V of that layer and
        the earlier text, as the ITG pass does through the cache. One pass shares the self-attention projections,
        the attention call, the output projection and their gradients between both (the weights are read once and
        their gradient is one GEMM, not two plus a sum); only the FFNs stay split by position. Attention dropout
        uses `drop`'s site for both, so a query row's mask is the query pass's.
        """
        Q = queries.shape[1]
        hidden = self.embeddings(input_ids=decoder_ids, queries=queries)
        padding = _queries_visible(attention_mask, Q)
        out = self._run(hidden, Q, drop, image_kv=image_kv, key_padding=padding, causal_prefix=Q, row_offset=-Q,
                        weights=weights)[0]
        queries_out, text_out = out.split([Q, out.shape[1] - Q], dim=1)  # one cat in the backward (Layer.forward)
        return queries_out, text_out

    def itg_pass(self, decoder_ids: Tensor, attention_mask: Tensor, query_cache: list,
                 drop: Optional[DropoutContext] = None, weights: Optional[ProjectionWeights] = None) -> Tensor:
        """decoder_ids (B, T) ([DEC] first) attend to the cached query K/V and causally to earlier text."""
        Q = query_cache[0][0].shape[2]
        hidden = self.embeddings(input_ids=decoder_ids)
        padding = _queries_visible(attention_mask, Q)
        return self._run(hidden, 0, drop, q_offset=Q, past=query_cache, key_padding=padding, causal_prefix=Q,
                         weights=weights)[0]
