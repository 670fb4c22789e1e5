"""The LAVIS formulation of BLIP-2's training steps, written here from /work/shared/docs/blip2-spec.md (not copied
from LAVIS), run on a blip2fast model's own parameters: the same nn.Module weights, its own forward. The losses
therefore equal blip2fast's (the benchmarks assert it before timing), and the time difference is the formulation.

This is a benchmark-support module (the bench_*.py files import it); pytest does not collect it.

What LAVIS does that blip2fast does not (each kept here on purpose):
  - eager attention everywhere: q k^T, + a materialised additive mask ((1 - mask) x -10000, (B, 1, Lq, Lk) or
    (B, 1, 1, Lk)), softmax, dropout, @ v; the frozen EVA ViT too (LAVIS's EVA computes q k^T explicitly);
  - image K/V recomputed in every pass that cross-attends: the query pass projects the B images, the ITM pass the
    3B images of its rows, each gathered per row first ((3B, N, Dv) image embeddings materialised);
  - ITM negatives: a per-sample Python loop of `torch.multinomial(weights[b], 1).item()` (2B host syncs), over
    softmax weights with the positive pair set to -10000. For equal work *and* equal losses the benchmark passes
    blip2fast's drawn negatives in: the loop still runs (and is timed), its draws are discarded, and the negative
    rows are gathered one sample at a time from the given indices, as LAVIS gathers its draws;
  - ITC with the (B, B_all, Q) similarity tensors materialised by broadcast matmuls, then max over queries;
  - ITG: the LM head on every text position (B, T, V logits materialised), then F.cross_entropy of the shifted
    logits (label smoothing 0.1);
  - stage 2: the LLM's logits over every position, the query positions included (LAVIS and transformers both
    do this), then the shifted cross-entropy with -100 on the query positions.

Single process only (the benchmarks run one device): the all-gathers are identities, detached as LAVIS's are.
Model layout: an EVA tower ("eva"); a CLIP or HF tower runs its own forward (its attention is then SDPA).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_VALUE = -10000.0  # BERT's / LAVIS's additive mask


def upcast(x: Tensor) -> Tensor:
    """Half-precision logits are reduced in float32 (what autocast's cross_entropy does); fp32 / fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def extended_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L) additive: 0 where visible, -10000 where masked (BERT's get_extended_attention_mask)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def causal_prefix_mask(mask: Tensor, prefix: int, dtype: torch.dtype) -> Tensor:
    """ITG's decoder mask: (B, Q + T) padding mask -> (B, 1, T, Q + T) additive; every text row sees the Q prefix
    keys and the text keys up to itself (LAVIS's is_decoder=True, has_query=True branch)."""
    B, L = mask.shape
    T = L - prefix
    pos = torch.arange(T, device=mask.device)
    causal = (pos[None, :] <= pos[:, None]).to(mask.dtype)  # (T, T)
    causal = torch.cat([torch.ones(T, prefix, dtype=mask.dtype, device=mask.device), causal], dim=1)
    full = causal[None, None] * mask[:, None, None, :]  # (B, 1, T, Q + T)
    return (1.0 - full.to(dtype)) * MASK_VALUE


class LavisFormulation:
    """LAVIS's stage-1 / stage-2 computations over `model`'s parameters (a blip2fast `Blip2`)."""

    def __init__(self, model):
        self.m = model
        self.cfg = model.config
        self.q = model.config.qformer

    @property
    def training(self) -> bool:
        return self.m.training

    def _drop(self, x: Tensor, p: float) -> Tensor:
        return F.dropout(x, p, training=self.training) if p > 0 else x

    # ------------------------------------------------------------------ frozen tower
    def _eva_attention(self, attn, x: Tensor) -> Tensor:
        B, N, C = x.shape
        H = attn.heads
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        qkv = F.linear(x, attn.qkv.weight, bias).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q * (C // H) ** -0.5) @ k.transpose(-2, -1)  # (B, H, N, N) materialised
        out = scores.softmax(dim=-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(B, N, C))

    def vit(self, pixel_values: Tensor) -> Tensor:
        tower = self.m.visual_encoder
        if self.cfg.vision.kind != "eva":
            return tower(pixel_values)
        x = tower.patch_embed(pixel_values)
        x = torch.cat([tower.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + tower.pos_embed
        for blk in tower.blocks:
            x = x + self._eva_attention(blk.attn, blk.norm1(x))
            x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        return x

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """ln_vision(vit(images)) in LAVIS's way: the tower runs with autograd on (its weights are frozen, so no
        graph is kept), LayerNorm in fp32, the result back in the tower's dtype (LAVIS's fp16 LayerNorm wrapper)."""
        tower_dtype = next(self.m.visual_encoder.parameters()).dtype
        feats = self.vit(pixel_values.to(tower_dtype))
        ln = self.m.ln_vision
        return ln(feats.to(ln.weight.dtype)).to(tower_dtype)

    # ------------------------------------------------------------------ BERT Q-Former, LAVIS's way
    def _attention(self, block, hidden: Tensor, kv_source: Tensor, add_mask: Optional[Tensor],
                   past: Optional[tuple] = None) -> tuple[Tensor, tuple]:
        """BertSelfAttention + BertSelfOutput: eager, additive mask; K/V projected from `kv_source` here."""
        B, L, D = hidden.shape
        H, d = self.q.num_heads, self.q.head_dim

        def heads(x):
            return x.view(x.shape[0], x.shape[1], H, d).transpose(1, 2)

        k, v = heads(block.key(kv_source)), heads(block.value(kv_source))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        q = heads(block.query(hidden))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if add_mask is not None:
            scores = scores + add_mask
        probs = self._drop(scores.softmax(dim=-1), self.q.attention_dropout)
        ctx = (probs @ v).transpose(1, 2).reshape(B, L, D)
        out = block.norm(self._drop(block.dense(ctx), self.q.hidden_dropout) + hidden)
        return out, (k, v)

    def _ffn(self, ffn, x: Tensor) -> Tensor:
        return ffn.norm(self._drop(ffn.down(F.gelu(ffn.up(x))), self.q.hidden_dropout) + x)

    def _embed(self, input_ids: Optional[Tensor] = None, query_embeds: Optional[Tensor] = None) -> Tensor:
        emb = self.m.qformer.embeddings
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(emb.word_embeddings(input_ids) + emb.position_embeddings(pos)[None])
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self._drop(emb.norm(x), self.q.hidden_dropout)

    def bert(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
             query_embeds: Optional[Tensor] = None, encoder_hidden_states: Optional[Tensor] = None,
             past_key_values: Optional[list] = None, decoder: bool = False) -> tuple[Tensor, list]:
        """LAVIS's Qformer.bert (BertModel) forward: returns (last hidden state, per-layer self-attention K/V).
        Masks are materialised; cross-attention layers project the image K/V from `encoder_hidden_states`."""
        x = self._embed(input_ids, query_embeds)
        B, L, _ = x.shape
        Qn = 0 if query_embeds is None else query_embeds.shape[1]
        prefix = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(B, prefix + L, dtype=torch.long, device=x.device)
        dtype = x.dtype
        self_mask = (causal_prefix_mask(attention_mask, prefix, dtype) if decoder
                     else extended_mask(attention_mask, dtype))
        cross_mask = None
        if encoder_hidden_states is not None:  # LAVIS passes image_atts = ones: a mask of zeros, still added
            image_atts = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.long, device=x.device)
            cross_mask = extended_mask(image_atts, dtype)
        cache = []
        for i, layer in enumerate(self.m.qformer.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, kv = self._attention(layer.self_attn, x, x, self_mask, past)
            cache.append(kv)
            if Qn > 0:
                queries = x[:, :Qn]
                if layer.cross_attn is not None and encoder_hidden_states is not None:
                    queries, _ = self._attention(layer.cross_attn, queries, encoder_hidden_states, cross_mask)
                out = self._ffn(layer.ffn_query, queries)
                if L > Qn:
                    out = torch.cat([out, self._ffn(layer.ffn, x[:, Qn:])], dim=1)
                x = out
            else:
                x = self._ffn(layer.ffn, x)
        return x, cache

    # ------------------------------------------------------------------ pieces
    def query_pass(self, image_embeds: Tensor) -> tuple[Tensor, list]:
        queries = self.m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.bert(query_embeds=queries, encoder_hidden_states=image_embeds)

    def text_feat(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        text_out, _ = self.bert(input_ids, attention_mask)
        return F.normalize(self.m.text_proj(text_out[:, 0]), dim=-1)

    def itm_logits_from_embeds(self, image_embeds_rows: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM over rows (image embeddings already gathered per row, (R, N, Dv))."""
        R = input_ids.shape[0]
        Qn = self.q.num_query_tokens
        queries = self.m.query_tokens.expand(R, -1, -1)
        mask = torch.cat([torch.ones(R, Qn, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        out, _ = self.bert(input_ids, mask, query_embeds=queries, encoder_hidden_states=image_embeds_rows)
        return self.m.itm_head(out[:, :Qn]).mean(dim=1)

    @staticmethod
    def _similarities(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor):
        """(B, B_all, Q) both ways, materialised by broadcast matmuls (LAVIS's sim_q2t / sim_t2q)."""
        sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_all.unsqueeze(-1)).squeeze(-1)  # (B, B_all, Q)
        sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_all.permute(0, 2, 1)).squeeze(2)
        return sim_q2t, sim_t2q

    # inference (retrieval scoring), LAVIS's compute_sim_matrix / compute_itm formulation
    def itc_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_feats = F.normalize(self.m.vision_proj(self.query_pass(self.image_embeds(pixel_values))[0]), dim=-1)
        text_feat = self.text_feat(input_ids, attention_mask)
        sim_q2t, _ = self._similarities(image_feats, text_feat, image_feats, text_feat)
        return sim_q2t.max(dim=-1).values  # (B_img, B_txt)

    def itm_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.itm_logits_from_embeds(self.image_embeds(pixel_values), input_ids, attention_mask)

    # ------------------------------------------------------------------ stage 1
    def stage1_loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    negatives: tuple[Tensor, Tensor]) -> dict:
        """ITC + ITM + ITG, LAVIS's way. `negatives` = (neg_image_for_text, neg_text_for_image): the rows to use
        (blip2fast's draws), so the losses are comparable; LAVIS's own multinomial loop still runs."""
        m, q = self.m, self.q
        B = input_ids.shape[0]
        dev = input_ids.device
        image_embeds = self.image_embeds(pixel_values)
        query_out, query_cache = self.query_pass(image_embeds)
        image_feats = F.normalize(m.vision_proj(query_out), dim=-1)
        text_feat = self.text_feat(input_ids, attention_mask)

        # ---- ITC (one process: the gathers are the local tensors, detached as LAVIS's concat_all_gather)
        image_all, text_all = image_feats.detach(), text_feat.detach()
        temp = m.temperature()  # the model's temperature rule (LAVIS never clamps; 0.07 is inside the clamp)
        sim_q2t, sim_t2q = self._similarities(image_feats, text_feat, image_all, text_all)
        sim_i2t = sim_q2t.max(dim=-1).values / temp
        sim_t2i = sim_t2q.max(dim=-1).values / temp
        targets = torch.arange(B, device=dev)
        smooth = self.cfg.itc_label_smoothing
        loss_itc = (F.cross_entropy(upcast(sim_i2t), targets, label_smoothing=smooth)
                    + F.cross_entropy(upcast(sim_t2i), targets, label_smoothing=smooth)) / 2

        # ---- ITM: LAVIS's per-sample multinomial loop (2B host syncs), draws discarded (see the module doc)
        with torch.no_grad():
            w_t2i = upcast(sim_t2i).clone()
            w_i2t = upcast(sim_i2t).clone()
            w_t2i.fill_diagonal_(MASK_VALUE)
            w_i2t.fill_diagonal_(MASK_VALUE)
            w_t2i, w_i2t = F.softmax(w_t2i, dim=1), F.softmax(w_i2t, dim=1)
        for b in range(B):
            torch.multinomial(w_t2i[b], 1).item()
        for b in range(B):
            torch.multinomial(w_i2t[b], 1).item()
        neg_image, neg_text = (n.tolist() for n in negatives)
        image_embeds_neg = torch.stack([image_embeds[i] for i in neg_image], dim=0)
        text_ids_neg = torch.stack([input_ids[i] for i in neg_text], dim=0)
        text_atts_neg = torch.stack([attention_mask[i] for i in neg_text], dim=0)
        ids_all = torch.cat([input_ids, input_ids, text_ids_neg])
        atts_all = torch.cat([attention_mask, attention_mask, text_atts_neg])
        embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds])  # (3B, N, Dv) materialised
        itm_logits = self.itm_logits_from_embeds(embeds_all, ids_all, atts_all)
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long, device=dev),
                                torch.zeros(2 * B, dtype=torch.long, device=dev)])
        loss_itm = F.cross_entropy(upcast(itm_logits), itm_labels)

        # ---- ITG: the text attends to the query pass's cached K/V; LM head on every position
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = q.dec_token_id
        labels = decoder_ids.masked_fill(decoder_ids == q.pad_token_id, -100)
        mask = torch.cat([torch.ones(B, q.num_query_tokens, dtype=attention_mask.dtype, device=dev),
                          attention_mask], dim=1)
        itg_states, _ = self.bert(decoder_ids, mask, past_key_values=query_cache, decoder=True)
        logits = m.qformer.lm_head(itg_states)  # (B, T, V)
        shifted = logits[:, :-1, :].contiguous()
        loss_itg = F.cross_entropy(upcast(shifted.view(-1, shifted.shape[-1])), labels[:, 1:].contiguous().view(-1),
                                   label_smoothing=self.cfg.itg_label_smoothing)
        return {"loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_itg": loss_itg}

    # ------------------------------------------------------------------ stage 2 (decoder-only LLM, LAVIS's blip2_opt)
    def stage2_loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        """LM loss with the LLM's logits over every position ([queries | text]), -100 on the query positions,
        shifted cross-entropy (mean over the label tokens). `labels` as for Blip2.stage2_loss."""
        m = self.m
        llm = m.language_model
        if getattr(llm.config, "is_encoder_decoder", False):
            raise NotImplementedError("the LAVIS-formulation stage 2 here is the decoder-only (OPT) one")
        image_embeds = self.image_embeds(pixel_values)
        query_out, _ = self.query_pass(image_embeds)
        emb = llm.get_input_embeddings()
        inputs_llm = m.language_projection(query_out).to(emb.weight.dtype)
        B, Qn = inputs_llm.shape[:2]
        embeds = torch.cat([inputs_llm, emb(input_ids)], dim=1)
        mask = torch.cat([torch.ones(B, Qn, dtype=attention_mask.dtype, device=input_ids.device), attention_mask], 1)
        targets = torch.cat([torch.full((B, Qn), -100, dtype=labels.dtype, device=labels.device), labels], dim=1)
        logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # (B, Q + T, V)
        shifted = upcast(logits[:, :-1, :])  # transformers' causal-LM loss upcasts the logits
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100)
