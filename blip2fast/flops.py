"""The FLOP model: what one training step of the *minimal formulation* of BLIP-2 costs, per stage, counted
analytically from the sizes.

What counts: the matrix products (Linear layers, convolutions, the attention products QK^T and PV, the ITC
similarity products), 2 FLOPs per multiply-add, dense (padded keys and masked scores count; nothing is skipped).
Left out: elementwise work, softmax, LayerNorm, GELU, dropout, embedding lookups, losses, and any recomputation
a kernel chooses (a fused linear + cross-entropy backward that recomputes the logits). That is exactly what
`torch.utils.flop_counter.FlopCounterMode` counts when the attention runs as matmuls (SDPA under
`sdpa_kernel(SDPBackend.MATH)`) and every op uses its PyTorch backend (`BLIP2FAST_BACKEND=torch`: the counter
sees 0 FLOPs inside custom ops); tests/test_flops.py holds the two within 2% (in practice to the FLOP). One
caveat when reading a counter: the PyTorch linear + cross-entropy computes its input and weight gradients inside
its forward (no recomputation), so a counter splits forward and backward differently; totals agree, and a
forward run with no gradient wanted counts the forward alone.

The minimal formulation (what blip2fast runs; a LAVIS-style step does more work for the same losses, and its
extra work is *not* counted, so its TFLOP/s measure useful work):

  frozen tower     forward only: patch convolution + per block 2 x (params of its Linears) x tokens + attention
                   (4 x tokens^2 x width); no backward (no parameter and no input needs a gradient)
  image K/V        each cross-attention layer projects every image's N tokens to K and V *once* per step; the
                   query pass and all 3B ITM rows read them
  Q-Former passes  stage 1: query pass (Q queries, self-attention among queries, cross-attention to N image
                   tokens, query FFN), text pass (T tokens, text FFN), ITM pass (3B rows of [Q queries | T text],
                   fully bidirectional, query rows cross-attend their image), ITG pass (T text tokens attending to
                   the Q cached query K/V + T text keys, text FFN); per layer and row 8 n H^2 (Q, K, V, O) +
                   4 n ctx H (scores, PV) + 4 n H F (FFN); cross layers add 4 Q H^2 + 4 Q N H
  heads            vision_proj on B x Q, text_proj on B [CLS] states, itm_head on 3B x Q, the LM head (dense
                   H x H + decoder H x V) on the B x (T - 1) ITG positions that predict a token (fused with the
                   loss: the logits are never materialised), ITC similarities 2 x 2 B B_all Q E (both directions)
  LLM (stage 2)    decoder-only: its Linears on the Q + T positions of [soft prompt | text], attention
                   4 x (Q+T)^2 x (heads x head_dim) per layer, the LM head on the T - 1 positions that predict a
                   label only. T5 / FlanT5: encoder on Q + T_enc positions, decoder on T_dec, cross-attention
                   K/V on the encoder positions.

Backward convention (what autograd actually computes, and what the counter counts):
  - a trainable Linear whose input needs a gradient: 2 x forward (input gradient + weight gradient);
  - a frozen Linear that gradients flow *through* (the stage-2 LLM): 1 x forward (input gradient only, no
    weight gradient), so the frozen LLM costs 2 x forward in all;
  - an attention product of two activations (QK^T, PV): 2 x forward, trainable or frozen;
  - ITC similarities: 1 x forward (LAVIS's convention gathers the other side without gradient, the local shard
    too); 2 x with `itc_gather_with_grad=True`;
  - T5 decoder layer 0 is special: its input (the embedded decoder ids) needs no gradient, so its
    self-attention has no backward and its cross-attention query projection no input gradient.
So the trainable Q-Former costs 3 x forward in all, the frozen tower 1 x, the frozen LLM ~2 x.

Every function returns FLOPs for the whole step of one rank (local batch B; B_all = B x world for the ITC
similarities); `step_flops_per_sample` divides by B.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from .config import Blip2Config, QFormerConfig, VisionConfig

__all__ = ["Flops", "StepFlops", "vision_forward_flops", "stage1_qformer_flops", "stage2_qformer_flops",
           "llm_step_flops", "stage1_step_flops", "stage2_step_flops", "qformer_query_forward_flops",
           "itc_scoring_flops", "itm_scoring_flops", "vision_flops", "qformer_flops", "llm_flops",
           "step_flops_per_sample"]


@dataclass(frozen=True)
class Flops:
    """Forward and backward FLOPs of one piece of the step."""

    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.forward + other.forward, self.backward + other.backward)


def _fb(forward: float, backward_factor: float) -> Flops:
    return Flops(float(forward), float(forward) * backward_factor)


TRAINABLE = 2.0  # backward / forward of a trainable Linear (input and weight gradients)
FROZEN_THROUGH = 1.0  # a frozen Linear that gradients pass through (input gradient only)
ACTIVATIONS = 2.0  # a product of two activations (QK^T, PV): both gradients


@dataclass
class StepFlops:
    """A step's FLOPs by piece (names in the module docstring), with totals."""

    parts: dict = field(default_factory=dict)  # name -> Flops
    batch: int = 1

    @property
    def forward(self) -> float:
        return sum(p.forward for p in self.parts.values())

    @property
    def backward(self) -> float:
        return sum(p.backward for p in self.parts.values())

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def per_sample(self) -> float:
        return self.total / self.batch

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "total": self.total, "batch": self.batch,
                "parts": {k: {"forward": v.forward, "backward": v.backward} for k, v in self.parts.items()}}


# ------------------------------------------------------------------------------------------------ frozen tower
def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _tower_tokens_width(model: Optional[nn.Module], v: VisionConfig) -> tuple[int, int]:
    """(tokens N, width Dv) the tower outputs (an HF tower reports its own)."""
    tower = getattr(model, "visual_encoder", None)
    n = getattr(tower, "seq_len", None) or v.seq_len
    w = getattr(tower, "out_width", None) or v.width
    return int(n), int(w)


def vision_forward_flops(v: VisionConfig, model: Optional[nn.Module] = None) -> float:
    """Forward FLOPs of the frozen tower for one image. EVA and CLIP layouts exactly (patch convolution, per block
    qkv 3w^2 + proj w^2 + MLP 2 w m per token, attention 4 N^2 w); an HF tower ("hf", needs `model`) approximately:
    patch convolution + 2 x its Linear weights x tokens (scaled to the blocks it runs) + attention from its config
    (within a few % of the counter for a CLIP tower; its head / pooler Linears are counted though unused)."""
    if v.kind == "hf":
        if model is None:
            raise ValueError("vision.kind='hf': pass the model, the tower's sizes come from its modules")
        tower = model.visual_encoder
        n, _ = _tower_tokens_width(model, v)
        hf_cfg = getattr(getattr(tower, "model", tower), "config", None)
        layers = getattr(hf_cfg, "num_hidden_layers", 0) or 0
        run = getattr(tower, "blocks_run", layers) or layers  # blocks the tower runs (hidden_states[k] stops early)
        width = getattr(hf_cfg, "hidden_size", 0) or 0
        share = run / layers if layers else 1.0  # most Linear weights live in the blocks
        patch = getattr(hf_cfg, "patch_size", 0) or 0
        patch = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
        conv = 2.0 * getattr(tower, "num_patches", n) * getattr(hf_cfg, "num_channels", 3) * patch * width
        return conv + 2.0 * _linear_weights(tower) * n * share + run * 4.0 * n * n * width
    n, w = v.seq_len, v.width
    patch = 2.0 * v.num_patches * 3 * v.patch_size ** 2 * w
    per_block = 2.0 * n * (4 * w * w + 2 * w * v.mlp_hidden) + 4.0 * n * n * w
    return patch + v.depth * per_block


# ------------------------------------------------------------------------------------------------ Q-Former
def _layers_forward(q: QFormerConfig, rows: int, n: int, ctx: int) -> float:
    """`rows` sequences of n tokens through every layer's self-attention (over ctx keys, K/V projected for the n
    new tokens) and FFN (query or text FFN: the same size)."""
    H, F_ = q.hidden_size, q.intermediate_size
    return rows * q.num_layers * (8.0 * n * H * H + 4.0 * n * ctx * H + 4.0 * n * H * F_)


def _cross_layers(q: QFormerConfig) -> int:
    return sum(q.has_cross_attention(i) for i in range(q.num_layers))


def _cross_forward(q: QFormerConfig, rows: int, image_tokens: int) -> float:
    """Query rows' cross-attention: Q and O projections and the products over N image keys (K/V not included)."""
    H, Q = q.hidden_size, q.num_query_tokens
    return rows * _cross_layers(q) * (4.0 * Q * H * H + 4.0 * Q * image_tokens * H)


def _image_kv_forward(q: QFormerConfig, images: int, image_tokens: int, image_width: int) -> float:
    return images * _cross_layers(q) * 2 * 2.0 * image_tokens * image_width * q.hidden_size


def qformer_query_forward_flops(cfg: Blip2Config, batch: int, image_tokens: Optional[int] = None,
                                image_width: Optional[int] = None) -> float:
    """Forward FLOPs of the Q-Former's query pass for `batch` images, image K/V projection included."""
    q = cfg.qformer
    N = image_tokens or cfg.vision.seq_len
    Dv = image_width or cfg.vision.width
    Q = q.num_query_tokens
    return _image_kv_forward(q, batch, N, Dv) + _layers_forward(q, batch, Q, Q) + _cross_forward(q, batch, N)


def stage1_qformer_flops(cfg: Blip2Config, batch: int, text_len: int, image_tokens: Optional[int] = None,
                         image_width: Optional[int] = None, world: int = 1) -> dict:
    """The stage-1 Q-Former step (all trainable) by piece: name -> Flops for the local batch."""
    q = cfg.qformer
    B, T, Q, H, E = batch, text_len, q.num_query_tokens, q.hidden_size, cfg.embed_dim
    N = image_tokens or cfg.vision.seq_len
    Dv = image_width or cfg.vision.width
    B_all = B * world
    itc_backward = 2.0 if cfg.itc_gather_with_grad else 1.0
    return {
        "image_kv": _fb(_image_kv_forward(q, B, N, Dv), TRAINABLE),  # ln_vision is trainable: input grads too
        "query_pass": _fb(_layers_forward(q, B, Q, Q) + _cross_forward(q, B, N), TRAINABLE),
        "text_pass": _fb(_layers_forward(q, B, T, T), TRAINABLE),
        "itm_pass": _fb(_layers_forward(q, 3 * B, Q + T, Q + T) + _cross_forward(q, 3 * B, N), TRAINABLE),
        "itg_pass": _fb(_layers_forward(q, B, T, Q + T), TRAINABLE),
        # position t predicts token t + 1: the head (dense H x H, decoder H x V) runs on the T - 1 predicting
        # positions only (ops.linear_cross_entropy; the logits never exist in full)
        "lm_head": _fb(2.0 * B * (T - 1) * (H * H + H * q.vocab_size), TRAINABLE),
        "proj_heads": _fb(2.0 * B * Q * H * E + 2.0 * B * H * E + 2.0 * 3 * B * Q * H * 2, TRAINABLE),
        "itc_sims": _fb(2 * 2.0 * B * B_all * Q * E, itc_backward),
    }


def stage2_qformer_flops(cfg: Blip2Config, batch: int, llm_width: int, image_tokens: Optional[int] = None,
                         image_width: Optional[int] = None) -> dict:
    """Stage 2's trainable part: image K/V, the query pass and the projection to the LLM's width."""
    q = cfg.qformer
    N = image_tokens or cfg.vision.seq_len
    Dv = image_width or cfg.vision.width
    B, Q = batch, q.num_query_tokens
    return {
        "image_kv": _fb(_image_kv_forward(q, B, N, Dv), TRAINABLE),
        "query_pass": _fb(_layers_forward(q, B, Q, Q) + _cross_forward(q, B, N), TRAINABLE),
        "projection": _fb(2.0 * B * Q * q.hidden_size * llm_width, TRAINABLE),
    }


# ------------------------------------------------------------------------------------------------ LLM
def _attn_inner(hf_cfg) -> int:
    """heads x head_dim of the LLM's attention (what QK^T and PV contract over, per query head)."""
    heads = getattr(hf_cfg, "num_attention_heads", None) or getattr(hf_cfg, "num_heads")
    head_dim = getattr(hf_cfg, "head_dim", None) or getattr(hf_cfg, "d_kv", None)
    if head_dim is None:
        head_dim = hf_cfg.hidden_size // heads
    return int(heads * head_dim)


def llm_step_flops(llm: nn.Module, batch: int, num_query: int, text_len: int,
                   decoder_len: Optional[int] = None) -> dict:
    """The frozen LLM of stage 2, gradients flowing through it to the soft prompt: name -> Flops.

    Decoder-only: [Q soft-prompt | T text] positions; LM head on the T - 1 predicting positions.
    Encoder-decoder (T5): the encoder on Q + text_len positions, the decoder on `decoder_len` (label) positions."""
    cfg = llm.config
    head = llm.get_output_embeddings()
    head_w = head.weight.numel() if head is not None else 0
    A = _attn_inner(cfg)
    B = batch
    if not getattr(cfg, "is_encoder_decoder", False):
        n = num_query + text_len
        body = _linear_weights(llm) - head_w
        layers = cfg.num_hidden_layers
        return {
            "llm_linears": _fb(2.0 * B * n * body, FROZEN_THROUGH),
            "llm_attention": _fb(layers * 4.0 * B * n * n * A, ACTIVATIONS),
            "llm_head": _fb(2.0 * B * (text_len - 1) * head_w, FROZEN_THROUGH),
        }
    # T5 family: each stack's Linears on its own positions; the decoder's cross-attention K/V read the encoder's
    if decoder_len is None:
        raise ValueError("an encoder-decoder LLM needs decoder_len (the label length)")
    n_e, n_d, d = num_query + text_len, decoder_len, cfg.d_model
    enc = _linear_weights(llm.get_encoder())
    dec = _linear_weights(llm.get_decoder())
    cross_kv = sum(m.weight.numel() for name, m in llm.get_decoder().named_modules()
                   if isinstance(m, nn.Linear) and name.endswith(("EncDecAttention.k", "EncDecAttention.v")))
    L_e, L_d = cfg.num_layers, cfg.num_decoder_layers
    # Decoder layer 0 reads the embedded decoder ids, which need no gradient: its self-attention (q, k, v, o:
    # 4 d A weights, and its products) has no backward, its cross-attention q (d A) no input gradient, and its
    # cross QK^T only the K gradient.
    self0, cross_q0 = 4 * d * A, d * A
    cross_products = L_d * 4.0 * B * n_d * n_e * A
    return {
        "llm_encoder_linears": _fb(2.0 * B * n_e * enc, FROZEN_THROUGH),
        "llm_encoder_attention": _fb(L_e * 4.0 * B * n_e * n_e * A, ACTIVATIONS),
        "llm_decoder_layer0_no_grad": _fb(2.0 * B * n_d * (self0 + cross_q0) + 4.0 * B * n_d * n_d * A, 0.0),
        "llm_decoder_linears": _fb(2.0 * B * n_d * (dec - cross_kv - self0 - cross_q0), FROZEN_THROUGH),
        "llm_cross_kv": _fb(2.0 * B * n_e * cross_kv, FROZEN_THROUGH),
        "llm_decoder_self_attention": _fb((L_d - 1) * 4.0 * B * n_d * n_d * A, ACTIVATIONS),
        "llm_cross_attention": Flops(cross_products, ACTIVATIONS * cross_products - 2.0 * B * n_d * n_e * A),
        "llm_head": _fb(2.0 * B * n_d * head_w, FROZEN_THROUGH),
    }


def _llm_width(model: nn.Module) -> int:
    return model.language_model.get_input_embeddings().embedding_dim


# ------------------------------------------------------------------------------------------------ steps
def stage1_step_flops(cfg: Blip2Config, batch: int, text_len: Optional[int] = None, model: Optional[nn.Module] = None,
                      world: int = 1) -> StepFlops:
    """One stage-1 training step (ITC + ITM + ITG, forward + backward) on one rank."""
    T = text_len or cfg.max_text_len
    N, Dv = _tower_tokens_width(model, cfg.vision)
    parts = {"vision": Flops(batch * vision_forward_flops(cfg.vision, model), 0.0)}
    parts.update(stage1_qformer_flops(cfg, batch, T, N, Dv, world))
    return StepFlops(parts, batch)


def stage2_step_flops(model: nn.Module, batch: int, text_len: Optional[int] = None,
                      decoder_len: Optional[int] = None) -> StepFlops:
    """One stage-2 training step (LM loss through the frozen LLM, forward + backward) on one rank. `text_len`:
    decoder-only, the text after the soft prompt; T5, the encoder's text (prefix) and `decoder_len` the labels."""
    cfg = model.config
    if cfg.llm is None:
        raise ValueError("stage2_step_flops needs a stage-2 model (config.llm set)")
    T = text_len or cfg.llm.max_text_len
    N, Dv = _tower_tokens_width(model, cfg.vision)
    parts = {"vision": Flops(batch * vision_forward_flops(cfg.vision, model), 0.0)}
    parts.update(stage2_qformer_flops(cfg, batch, _llm_width(model), N, Dv))
    parts.update(llm_step_flops(model.language_model, batch, cfg.qformer.num_query_tokens, T,
                                decoder_len if decoder_len is not None else T))
    return StepFlops(parts, batch)


def itc_scoring_flops(cfg: Blip2Config, images: int, texts: int, text_len: int,
                      model: Optional[nn.Module] = None) -> float:
    """Forward FLOPs of `Blip2.itc_scores` (tower, query pass, image and text projections, text pass, the
    images x texts x Q similarity product)."""
    N, Dv = _tower_tokens_width(model, cfg.vision)
    q, E, H = cfg.qformer, cfg.embed_dim, cfg.qformer.hidden_size
    return (images * vision_forward_flops(cfg.vision, model) + qformer_query_forward_flops(cfg, images, N, Dv)
            + 2.0 * images * q.num_query_tokens * H * E + _layers_forward(q, texts, text_len, text_len)
            + 2.0 * texts * H * E + 2.0 * images * texts * q.num_query_tokens * E)


def itm_scoring_flops(cfg: Blip2Config, pairs: int, text_len: int, model: Optional[nn.Module] = None) -> float:
    """Forward FLOPs of `Blip2.itm_logits` for `pairs` (image, text) pairs: tower, image K/V, the ITM pass, the head."""
    N, Dv = _tower_tokens_width(model, cfg.vision)
    q = cfg.qformer
    Q = q.num_query_tokens
    return (pairs * vision_forward_flops(cfg.vision, model) + _image_kv_forward(q, pairs, N, Dv)
            + _layers_forward(q, pairs, Q + text_len, Q + text_len) + _cross_forward(q, pairs, N)
            + 2.0 * pairs * Q * q.hidden_size * 2)


# ------------------------------------------------------------------------------------------------ the trainer's API
def vision_flops(model: nn.Module, cfg: Blip2Config) -> float:
    """Forward FLOPs of the frozen tower for one image."""
    return vision_forward_flops(cfg.vision, model)


def qformer_flops(cfg: Blip2Config, image_tokens: int, image_width: int, text_len: int, stage: int) -> float:
    """Forward FLOPs of the Q-Former for one image-text pair (stage 1: every pass and head with a batch of one;
    stage 2: image K/V and the query pass, without the projection)."""
    if stage == 2:
        return qformer_query_forward_flops(cfg, 1, image_tokens, image_width)
    return sum(p.forward for p in stage1_qformer_flops(cfg, 1, text_len, image_tokens, image_width).values())


def llm_flops(model: nn.Module, text_len: int, num_query: int) -> float:
    """Forward FLOPs of the frozen LLM for one sample (T5: text_len on both the encoder and the decoder side)."""
    return sum(p.forward for p in llm_step_flops(model.language_model, 1, num_query, text_len, text_len).values())


def step_flops_per_sample(model: nn.Module, cfg: Blip2Config, stage: int, text_len: int, batch: int = 1,
                          world: int = 1) -> float:
    """Training FLOPs (forward + backward) per image-text pair. `batch` (per rank) and `world` only move the ITC
    similarity term (B x B_all), which is tiny next to the rest."""
    if stage == 2:
        return stage2_step_flops(model, batch, text_len).per_sample
    return stage1_step_flops(cfg, batch, text_len, model, world).per_sample
