"""BLIP-2: frozen image encoder + `ln_vision` + Q-Former + stage-1 heads, and the stage-1 losses.

Stage 1 (`stage1_loss`), per step:
    image_embeds = ln_vision(vit(images))                             (B, N, Dv), ViT frozen, no graph kept
    image_kv     = K/V of every cross-attention layer, projected once  reused by the query pass and all ITM rows
    query pass   -> image_feats (B, Q, E) + the query self-attention K/V cache (for ITG)
    text pass    -> text_feat (B, E)
    ITC          features gathered from all ranks; max over queries; label smoothing 0.1
    ITM          one negative image per text and one negative text per image, drawn on device by a counter-based
                 Gumbel-max (ops.itm_sampling); 3B pairs [pos | (text, neg image) | (neg text, image)]
    ITG          [DEC] + text attends to the cached queries and causally to itself; LM head; label smoothing
                 0.1; averaged over the *global* token count
Everything is batched and on device: no host synchronisation, no Python loop over samples.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist_utils
from ..config import Blip2Config
from ..ops.itc_loss import itc_loss
from ..ops.itm_sampling import itm_sample_negative_pair
from ..ops.linear_ce import linear_cross_entropy
from ..ops.losses import mean_over_global_count, token_ce_sum_ref, upcast
from .qformer import PASS_ITM, PASS_QUERY, PASS_TEXT, DropoutContext, ProjectionWeights, QFormer
from .vision import build_vision_tower, check_pixel_values, freeze_

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Stage2Output:
    loss: Tensor  # mean token cross-entropy (global token count across ranks)
    # only where labels are predicted: (B, T-1, V) decoder-only, (B, T_dec, V) encoder-decoder; None when the output
    # layer was fused with the loss (the default where models.llm.output_head allows it; return_logits=True for them)
    logits: Optional[Tensor]
    num_tokens: Tensor  # this rank's non-ignored label tokens (int64 scalar)


@dataclass
class Stage1Output:
    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_itg: Tensor
    neg_image_for_text: Optional[Tensor] = None  # (B,) global image index drawn (or given) per text
    neg_text_for_image: Optional[Tensor] = None  # (B,) global text index per image
    itm_fallback_rows: Optional[Tensor] = None  # rows with no finite candidate, drawn uniformly (int64 scalar)
    # with return_details=True:
    image_feats: Optional[Tensor] = None
    text_feat: Optional[Tensor] = None
    sim_i2t: Optional[Tensor] = None
    sim_t2i: Optional[Tensor] = None
    itm_logits: Optional[Tensor] = None
    itg_logits: Optional[Tensor] = None


def _init_bert_(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Blip2(nn.Module):
    def __init__(self, config: Optional[Blip2Config] = None):
        super().__init__()
        config = config or Blip2Config()
        self.config = config
        q = config.qformer
        self.visual_encoder = freeze_(build_vision_tower(config.vision), _DTYPES[config.vision.dtype])
        width = self.visual_encoder.out_width
        self.ln_vision = nn.LayerNorm(width, eps=config.ln_vision_eps)
        self.qformer = QFormer(q, image_width=width)
        _init_bert_(self.qformer)
        with torch.no_grad():  # the query FFN starts as a copy of the text FFN (LAVIS)
            for layer in self.qformer.layers:
                layer.ffn_query.load_state_dict(layer.ffn.state_dict())
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.hidden_size) * 0.02)
        self.vision_proj = nn.Linear(q.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(q.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp_init))
        if config.llm is not None:  # stage 2: soft prompt -> frozen LLM
            from .llm import build_llm, input_width

            self.language_model = freeze_(build_llm(config.llm, _DTYPES[config.llm.dtype]),
                                          _DTYPES[config.llm.dtype])
            self.language_projection = nn.Linear(q.hidden_size, input_width(self.language_model))
        # [seed, step] of the counter-based draws (ITM negatives, attention dropout). A device tensor, so
        # CUDA-graph replays see new values; the training loop advances it (`set_seed_step`).
        self.register_buffer("seed_step", torch.tensor([0, 0], dtype=torch.int64), persistent=False)

    # ------------------------------------------------------------------ housekeeping
    def train(self, mode: bool = True) -> "Blip2":
        super().train(mode)
        self.visual_encoder.eval()  # frozen means eval mode, always
        if self.config.llm is not None:
            self.language_model.eval()
        return self

    def set_seed_step(self, seed: int, step: int) -> None:
        """In place, so captured CUDA graphs and compiled steps read the new values."""
        with torch.no_grad():
            self.seed_step.copy_(torch.tensor([seed, step], dtype=torch.int64))

    def temperature(self) -> Tensor:
        clamp = self.config.temp_clamp
        return self.temp if clamp is None else self.temp.clamp(clamp[0], clamp[1])

    @classmethod
    def from_pretrained(cls, path: str, config: Optional[Blip2Config] = None, strict: bool = False,
                        vision_dtype: Optional[str] = None, llm_dtype: Optional[str] = None) -> "Blip2":
        """Load a local model, whatever wrote it:

        - a native folder (`save_native`: any towers, tokenizer included), or a blip2fast run folder (its
          native folder <run>/model, else its latest checkpoint), or a checkpoint folder (step_*);
        - a transformers folder saved from `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`;
        - a LAVIS `.pth` file (`{"model": state_dict}`).
        Sizes come from `config`, else from the source (native JSON, the run's recorded config, config.json, or the
        LAVIS tensor shapes). For transformers / LAVIS sources, keys not used and parameters left fresh are
        reported by name (a warning, or an error with strict=True); native folders and checkpoints are exact.
        `vision_dtype` / `llm_dtype` override the storage dtypes (default: the source's, float16 for the
        transformers / LAVIS towers)."""
        from ..checkpoint.native import load_native, model_source

        kind, where = model_source(path)
        if kind == "native":
            return load_native(cls, where, config=config, vision_dtype=vision_dtype, llm_dtype=llm_dtype)
        if kind == "checkpoint":
            from ..training.model import model_from_checkpoint

            if config is not None:
                raise ValueError(f"{path!r} is a blip2fast checkpoint: its config is the run's; pass no config")
            return model_from_checkpoint(where, vision_dtype=vision_dtype, llm_dtype=llm_dtype)
        if kind == "hf":
            from ..checkpoint.hf import load_hf

            return load_hf(cls, where, config=config, strict=strict, vision_dtype=vision_dtype or "float16",
                           llm_dtype=llm_dtype or "float16")
        from ..checkpoint.lavis import load_lavis

        return load_lavis(cls, where, config=config, strict=strict, vision_dtype=vision_dtype or "float16")

    def save_pretrained(self, path: str, kind: Optional[str] = None, tokenizer=None) -> None:
        """Write the model to `path`. kind="native" (blip2fast's folder: any towers, the LLM named by path, the
        Q-Former `tokenizer` if given; see checkpoint/native.py), or a transformers folder: "generation"
        (`Blip2ForConditionalGeneration`, the default with an LLM) or "retrieval" (`Blip2ForImageTextRetrieval`,
        the default without), which transformers loads with no missing or unexpected keys but which holds an EVA
        tower only."""
        if kind == "native":
            from ..checkpoint.native import save_native

            save_native(self, path, tokenizer=tokenizer)
            return
        from ..checkpoint.hf import save_hf

        save_hf(self, path, kind=kind)

    # ------------------------------------------------------------------ shared pieces
    def _dropout(self, row_ids: Tensor, pass_id: int) -> Optional[DropoutContext]:
        if not self.training or self.config.qformer.attention_dropout == 0.0:
            return None
        return DropoutContext(seed_step=self.seed_step, row_ids=row_ids, pass_id=pass_id)

    def _check_text(self, input_ids: Tensor, attention_mask: Tensor, batch: Optional[int] = None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer (B, T); got {input_ids.dtype} {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        limit = self.config.qformer.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds the Q-Former's {limit} positions; "
                             f"tokenise to max_text_len={self.config.max_text_len}")
        if batch is not None and input_ids.shape[0] != batch:
            raise ValueError(f"{input_ids.shape[0]} texts for {batch} images: stage-1 pairs image b with text b")

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """(B, N, Dv): the frozen ViT's output (no autograd graph) after the trainable `ln_vision`."""
        check_pixel_values(pixel_values, self.config.vision.image_size)
        tower_dtype = next(self.visual_encoder.parameters()).dtype
        with torch.no_grad():
            feats = self.visual_encoder(pixel_values.to(tower_dtype))
        return self.ln_vision(feats.to(self.ln_vision.weight.dtype))

    def _queries(self, batch: int) -> Tensor:
        return self.query_tokens.expand(batch, -1, -1)

    def _query_pass(self, image_embeds: Tensor, image_kv: list, row_ids: Tensor) -> tuple[Tensor, list]:
        return self.qformer.query_pass(self._queries(image_embeds.shape[0]), image_kv,
                                       self._dropout(row_ids, PASS_QUERY))

    # ------------------------------------------------------------------ public inference API
    def query_output(self, pixel_values: Tensor) -> Tensor:
        """(B, Q, D) Q-Former query states."""
        embeds = self.image_embeds(pixel_values)
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        return self._query_pass(embeds, self.qformer.image_kv(embeds), rows)[0]

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, Q, E) L2-normalised ITC image features."""
        return F.normalize(self.vision_proj(self.query_output(pixel_values)), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, E) L2-normalised ITC text features (the [CLS] state of the text pass)."""
        self._check_text(input_ids, attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        out = self.qformer.text_pass(input_ids, attention_mask, self._dropout(rows, PASS_TEXT))
        return F.normalize(self.text_proj(out[:, 0]), dim=-1)

    def itc_scores(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B_img, B_txt) cosine similarity, max over queries, no temperature (the retrieval score)."""
        image_feats = self.image_features(pixel_values)
        text_feat = self.text_features(input_ids, attention_mask)
        return torch.einsum("iqe,te->itq", image_feats, text_feat).amax(dim=-1)

    def itm_logits(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 2) ITM logits for the pairs (image b, text b)."""
        check_pixel_values(pixel_values, self.config.vision.image_size)
        self._check_text(input_ids, attention_mask, batch=pixel_values.shape[0])
        embeds = self.image_embeds(pixel_values)
        return self._itm_head(self.qformer.itm_pass(self._queries(embeds.shape[0]), input_ids, attention_mask,
                                                    self.qformer.image_kv(embeds), None))

    def _itm_head(self, itm_states: Tensor) -> Tensor:
        return self.itm_head(itm_states[:, : self.config.qformer.num_query_tokens]).mean(dim=1)

    # ------------------------------------------------------------------ stage 1
    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                negatives: Optional[tuple[Tensor, Tensor]] = None) -> Stage1Output:
        """The stage-1 training step's forward (so DDP and torch.compile wrap the model as usual)."""
        return self.stage1_loss(pixel_values, input_ids, attention_mask, negatives=negatives)

    def stage1_loss(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        negatives: Optional[tuple[Tensor, Tensor]] = None,
        return_details: bool = False,
    ) -> Stage1Output:
        """ITC + ITM + ITG (unit weights). `input_ids` are Q-Former ids with [CLS] first, padded to a fixed length.

        negatives: (neg_image_for_text, neg_text_for_image), (B,) int64 *global* indices, replaces the draw.
        Distributed: call on every rank with its own shard (equal shard sizes); averaging gradients over ranks
        (DDP) gives exactly the single-process gradient of the whole batch.
        """
        cfg, q = self.config, self.config.qformer
        check_pixel_values(pixel_values, cfg.vision.image_size)
        B = pixel_values.shape[0]
        self._check_text(input_ids, attention_mask, batch=B)
        rank, world = dist_utils.world()
        dev = pixel_values.device
        local = torch.arange(B, device=dev)
        rows = rank * B + local  # this rank's global rows: the ITC targets and the hash coordinates
        B_all = B * world

        image_embeds = self.image_embeds(pixel_values)
        # every block's fused input projection, concatenated (and cast) once for all passes of this step
        weights = self.qformer.projection_weights()
        image_kv = self.qformer.image_kv(image_embeds, weights)
        # the query pass and the ITG pass run as one pass over [queries | [DEC] text] (QFormer.query_itg_pass)
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = q.dec_token_id
        query_out, itg_states = self.qformer.query_itg_pass(self._queries(B), decoder_ids, attention_mask, image_kv,
                                                            self._dropout(rows, PASS_QUERY), weights)
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)
        text_out = self.qformer.text_pass(input_ids, attention_mask, self._dropout(rows, PASS_TEXT), weights)
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)

        # ---- ITC
        gather = dist_utils.all_gather_with_grad if cfg.itc_gather_with_grad else dist_utils.all_gather_no_grad
        image_all, text_all = gather(image_feats), gather(text_feat)
        # fused op (backend: BLIP2FAST_BACKEND > automatic); sim_i2t / sim_t2i come back float32 and detached
        loss_itc, sim_i2t, sim_t2i = itc_loss(image_feats, text_feat, image_all, text_all, self.temperature(), rows,
                                              cfg.itc_label_smoothing)

        # ---- ITM
        fallback = None
        if negatives is not None:
            neg_image, neg_text = self._check_negatives(negatives, B, B_all, dev)
        elif B_all >= 2:
            with torch.no_grad():
                neg_image, neg_text, fallback = itm_sample_negative_pair(sim_t2i.detach(), sim_i2t.detach(), rows,
                                                                         rows, self.seed_step)
        else:
            neg_image = neg_text = None
        if neg_image is None:
            warnings.warn("ITM needs a global batch of at least 2 (a negative must exist); loss_itm is 0 for this "
                          "step", stacklevel=2)
            loss_itm = image_feats.new_zeros(())
            itm_logits = None
        else:
            itm_logits = self._itm_rows(image_embeds, image_kv, input_ids, attention_mask, neg_image, neg_text,
                                        rank, world, weights)
            labels = torch.cat([torch.ones(B, dtype=torch.long, device=dev),
                                torch.zeros(2 * B, dtype=torch.long, device=dev)])
            loss_itm = F.cross_entropy(upcast(itm_logits), labels)

        # ---- ITG (its Q-Former states came with the query pass)
        labels = decoder_ids.masked_fill(decoder_ids == q.pad_token_id, -100)
        # LM head fused with the loss (ops.linear_ce): position t predicts label t + 1, and the (B (T-1), vocab)
        # logits never exist in full; they are computed for return_details only
        head = self.qformer.lm_head
        itg_hidden = head.transform(itg_states[:, :-1]).reshape(-1, itg_states.shape[-1])
        loss_sum, count = linear_cross_entropy(itg_hidden, head.weight, head.bias, labels[:, 1:].reshape(-1),
                                               cfg.itg_label_smoothing)
        itg_logits = head(itg_states) if return_details else None
        global_count = dist_utils.all_reduce_sum(count) if world > 1 else None
        loss_itg = mean_over_global_count(loss_sum, count, global_count, world)

        out = Stage1Output(loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc, loss_itm=loss_itm,
                           loss_itg=loss_itg, neg_image_for_text=neg_image, neg_text_for_image=neg_text,
                           itm_fallback_rows=fallback)
        if return_details:
            out.image_feats, out.text_feat, out.sim_i2t, out.sim_t2i = image_feats, text_feat, sim_i2t, sim_t2i
            out.itm_logits, out.itg_logits = itm_logits, itg_logits
        return out

    def _check_negatives(self, negatives, B: int, B_all: int, dev: torch.device) -> tuple[Tensor, Tensor]:
        if not isinstance(negatives, (tuple, list)) or len(negatives) != 2:
            raise ValueError("negatives must be a pair (neg_image_for_text, neg_text_for_image)")
        out = []
        for name, t in zip(("neg_image_for_text", "neg_text_for_image"), negatives):
            t = torch.as_tensor(t, device=dev)
            if t.shape != (B,) or t.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"{name} must be an integer tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
            out.append(t.long())
        return out[0], out[1]

    def _itm_rows(self, image_embeds: Tensor, image_kv: list, input_ids: Tensor, attention_mask: Tensor,
                  neg_image: Tensor, neg_text: Tensor, rank: int, world: int,
                  weights: Optional[ProjectionWeights] = None) -> Tensor:
        """ITM logits (3B, 2) for pairs [(text b, image b) | (text b, neg image) | (neg text, image b)]."""
        B = input_ids.shape[0]
        dev = input_ids.device
        local = torch.arange(B, device=dev)
        if world == 1:
            kv, neg_slot = image_kv, neg_image
            neg_ids, neg_mask = input_ids.index_select(0, neg_text), attention_mask.index_select(0, neg_text)
        else:
            # The negatives may live on other ranks: fetch only the B chosen image embeddings (with gradient,
            # ln_vision is trainable; distributed.gather_rows_with_grad keeps O(B) rows in memory, not
            # world x B) and project just those; the local images' K/V are reused.
            neg_embeds = dist_utils.gather_rows_with_grad(image_embeds, neg_image)
            neg_kv = self.qformer.image_kv(neg_embeds, weights)
            kv = [None if a is None else (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
                  for a, b in zip(image_kv, neg_kv)]
            neg_slot = B + local
            # ids and mask travel together: one exchange instead of two
            text = dist_utils.gather_rows(torch.stack([input_ids, attention_mask.to(input_ids.dtype)], 1), neg_text)
            neg_ids, neg_mask = text[:, 0], text[:, 1].to(attention_mask.dtype)
        image_index = torch.cat([local, neg_slot, local])
        text_ids = torch.cat([input_ids, input_ids, neg_ids])
        text_mask = torch.cat([attention_mask, attention_mask, neg_mask])
        B_all = B * world
        itm_rows = torch.cat([local, local + B_all, local + 2 * B_all]) + rank * B
        states = self.qformer.itm_pass(self._queries(3 * B), text_ids, text_mask, kv, image_index,
                                       self._dropout(itm_rows, PASS_ITM), weights)
        return self._itm_head(states)

    # ------------------------------------------------------------------ stage 2
    def _require_llm(self) -> nn.Module:
        if self.config.llm is None:
            raise RuntimeError("this model has no LLM: stage 2 needs Blip2Config(llm=LLMConfig(path=... or "
                               "hf_config=...))")
        return self.language_model

    def soft_prompt(self, pixel_values: Tensor) -> Tensor:
        """(B, Q, D_llm): the projected query states, in the LLM's dtype, prepended to the LLM's input embeddings."""
        llm = self._require_llm()
        embeds = self.image_embeds(pixel_values)
        rank, _ = dist_utils.world()
        rows = rank * embeds.shape[0] + torch.arange(embeds.shape[0], device=embeds.device)
        query = self._query_pass(embeds, self.qformer.image_kv(embeds), rows)[0]
        return self.language_projection(query).to(llm.get_input_embeddings().weight.dtype)

    def _llm_inputs(self, prompt: Tensor, input_ids: Optional[Tensor], attention_mask: Optional[Tensor]):
        """[soft prompt | text] embeddings and their attention mask."""
        llm = self.language_model
        ones = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
        if input_ids is None:
            return prompt, ones
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = llm.get_input_embeddings()(input_ids)
        return torch.cat([prompt, text], dim=1), torch.cat([ones, attention_mask.to(ones.dtype)], dim=1)

    def stage2_loss(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor, return_logits: bool = False) -> Stage2Output:
        """Language-modelling loss through the frozen LLM, conditioned on the soft prompt.

        Decoder-only: `input_ids` are the text after the prompt (BOS first), `labels` the same positions with -100
        where no loss is wanted; position t predicts labels[t + 1]. Encoder-decoder: `input_ids` feed the encoder
        after the queries (the caption prefix, may be all padding), `labels` are the decoder targets. The LM head
        runs only on the positions that predict labels, never on the query positions.

        The output layer is fused with the loss (ops.linear_cross_entropy: the (tokens, vocabulary) logits never
        exist) wherever models.llm.output_head can express it; Stage2Output.logits is then None. return_logits=True
        (or an architecture the fused path cannot express, e.g. final logit soft-capping) runs the LLM's own head
        and returns the logits."""
        from .llm import is_encoder_decoder, output_head, takes_logits_to_keep, trunk_hidden_states

        llm = self._require_llm()
        check_pixel_values(pixel_values, self.config.vision.image_size)
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[0] != pixel_values.shape[0] or labels.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"batch sizes differ: {pixel_values.shape[0]} images, {input_ids.shape[0]} texts, "
                             f"{labels.shape[0]} label rows")
        prompt = self.soft_prompt(pixel_values)
        embeds, mask = self._llm_inputs(prompt, input_ids, attention_mask)
        head = None if return_logits else output_head(llm)  # None: the LLM's own head makes the logits
        logits = hidden = None
        if is_encoder_decoder(llm):
            decoder_ids = llm.prepare_decoder_input_ids_from_labels(labels=labels)
            if head is not None:
                hidden = trunk_hidden_states(llm, embeds, mask, decoder_ids)  # (B, T_dec, D)
            else:
                logits = llm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                             use_cache=False).logits
            targets = labels
        else:
            if labels.shape != input_ids.shape:
                raise ValueError(f"decoder-only labels must align with input_ids: {tuple(labels.shape)} vs "
                                 f"{tuple(input_ids.shape)}")
            Q, T = prompt.shape[1], input_ids.shape[1]
            predicting = torch.arange(Q, Q + T - 1, device=embeds.device)  # text positions 0..T-2
            if head is not None:
                hidden = trunk_hidden_states(llm, embeds, mask)[:, Q:Q + T - 1]  # (B, T-1, D)
            elif takes_logits_to_keep(llm):
                logits = llm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=predicting,
                             use_cache=False).logits
            else:  # an architecture without logits_to_keep computes every position's logits; keep ours
                logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, Q:Q + T - 1]
            targets = labels[:, 1:]
        if hidden is not None:
            if head.scale is not None:
                hidden = hidden * head.scale
            loss_sum, count = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                                   targets.reshape(-1))
        else:
            loss_sum, count = token_ce_sum_ref(logits, targets, 0.0)
        _, world = dist_utils.world()
        global_count = dist_utils.all_reduce_sum(count) if world > 1 else None
        return Stage2Output(loss=mean_over_global_count(loss_sum, count, global_count, world), logits=logits,
                            num_tokens=count)

    @torch.no_grad()
    def generate(self, pixel_values: Tensor, input_ids: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, **generate_kwargs) -> Tensor:
        """LLM token ids generated after [soft prompt | input_ids] (LLM ids, no image placeholders).

        Decoder-only: returns the new tokens only; without `input_ids` the text starts with the LLM's BOS.
        Batched prompts of different lengths must be left-padded. Encoder-decoder: `input_ids` (optional) feed the
        encoder after the queries; returns the decoder's tokens (starting with its start token), as transformers."""
        from .llm import is_encoder_decoder

        llm = self._require_llm()
        prompt = self.soft_prompt(pixel_values)
        if input_ids is None and not is_encoder_decoder(llm):
            bos = llm.config.bos_token_id
            if bos is None:
                raise ValueError("this LLM has no bos_token_id: pass input_ids to start the text")
            input_ids = torch.full((prompt.shape[0], 1), bos, dtype=torch.long, device=prompt.device)
        embeds, mask = self._llm_inputs(prompt, input_ids, attention_mask)
        image_token = self.config.llm.image_token_index
        if image_token is not None and "suppress_tokens" not in generate_kwargs:
            generate_kwargs["suppress_tokens"] = [image_token]  # the placeholder is never text
        return llm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
