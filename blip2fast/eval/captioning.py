"""Image captioning: with the frozen LLM (stage 2) or the stage-1 Q-Former decoder, and the COCO caption metrics.

LLM (the paper's zero-shot / NoCaps protocol): the soft prompt, then the text prompt "a photo of"; beam search
with 5 beams. The spec fixes the prompt and the beams only; the lengths are LAVIS's caption-evaluation settings
(at least 8 and at most 30 new tokens), all overridable. Decoder-only LLMs (OPT) stop at "\\n" (the end of every
stage-2 training caption) or their EOS; encoder-decoders (FlanT5) take the prompt in the encoder after the
queries and stop at their EOS. The caption is the generated continuation (the prompt is not repeated).

Q-Former decoder (stage 1): the spec's generation mask: the queries see themselves and cross-attend the image
(the query pass, whose self-attention K/V are kept), the text ([DEC], optional prompt, then the generated tokens)
sees every query and causally the earlier text, through `qformer.itg_pass` and the LM head. Decoding re-runs
`itg_pass` on the whole growing sequence at every step (simple and exact; the text is at most ~30 tokens).
[SEP] ends a caption. Greedy (num_beams=1) or beam search; the beam search below is our own, with transformers'
semantics: 2 x beams candidates per step, a finished hypothesis (ending in EOS) is kept only when it ranks among
the first `num_beams` candidates, hypotheses are compared by sum(log p) / length ** length_penalty (length =
generated tokens, EOS included), and a batch element is done when it holds `num_beams` finished hypotheses that
no live beam can beat (transformers' early_stopping=False rule); at the length limit live beams join the pool.

Metrics: pycocoevalcap (the maintained COCO caption evaluation) with its PTB tokenizer: BLEU-1..4, METEOR,
ROUGE-L, CIDEr (CIDEr-D), and SPICE when its Stanford CoreNLP models are already installed (SPICE downloads them
at first use, so offline it is skipped with a message). The tokenizer and METEOR need Java.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .common import Amp, autocast, eval_mode, model_device, unwrap

DEFAULT_PROMPT = "a photo of"


@dataclass(frozen=True)
class CaptionConfig:
    prompt: str = DEFAULT_PROMPT  # text after the soft prompt (LLM); "" for none
    num_beams: int = 5  # the paper's beam width
    max_new_tokens: int = 30  # LAVIS's caption max_len
    min_new_tokens: int = 8  # LAVIS's caption min_len
    length_penalty: float = 1.0  # transformers' default; hypotheses ranked by sum log p / length ** this
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams={self.num_beams} must be >= 1")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens; got "
                             f"max_new_tokens={self.max_new_tokens}, min_new_tokens={self.min_new_tokens}")


# ------------------------------------------------------------------------------------------------ LLM
def llm_stop_ids(tokenizer, encoder_decoder: bool) -> list[int]:
    """The ids that end generation: the tokenizer's EOS, and for decoder-only LLMs the "\\n" token first."""
    ids = []
    if not encoder_decoder:
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(newline) == 1:
            ids.append(int(newline[0]))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the LLM tokenizer has no EOS token and no single-token '\\n': cannot tell where a "
                         "generated text ends")
    return ids


def llm_prompt_inputs(tokenizer, prompts: Sequence[str], encoder_decoder: bool,
                      bos_token_id: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of the text after the soft prompt.

    Decoder-only: [BOS] + prompt tokens, left-padded (the generated tokens follow the last column). Encoder-decoder:
    prompt tokens + [EOS] (as the stage-2 encoder input), right-padded."""
    plain = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if encoder_decoder:
        eos = tokenizer.eos_token_id
        rows = [list(r) + ([] if eos is None else [eos]) for r in plain]
    else:
        bos = bos_token_id if bos_token_id is not None else tokenizer.bos_token_id
        if bos is None:
            raise ValueError("the LLM tokenizer has no bos_token_id; pass bos_token_id=")
        rows = [[bos] + list(r) for r in plain]
    width = max(1, max((len(r) for r in rows), default=1))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if not encoder_decoder else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


@torch.no_grad()
def llm_generate_text(model: nn.Module, pixel_values: Tensor, tokenizer, prompts: Sequence[str], num_beams: int,
                      max_new_tokens: int, min_new_tokens: int, length_penalty: float,
                      repetition_penalty: float = 1.0) -> list[str]:
    """The LLM's text after [soft prompt | prompt] for each image (one prompt per image), beam search, stripped.
    No autocast: the frozen LLM runs in its own dtype (the soft prompt is cast to it)."""
    from ..models.llm import is_encoder_decoder

    model = unwrap(model)
    if model.config.llm is None:
        raise ValueError("this model has no LLM (a stage-1 checkpoint): caption it with decoder='qformer'")
    dev = model_device(model)
    enc_dec = is_encoder_decoder(model.language_model)
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = getattr(model.language_model.config, "bos_token_id", None)
    ids, mask = llm_prompt_inputs(tokenizer, prompts, enc_dec, bos)
    stop = llm_stop_ids(tokenizer, enc_dec)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
    with eval_mode(model):
        out = model.generate(pixel_values.to(dev), input_ids=ids.to(dev), attention_mask=mask.to(dev),
                             num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             length_penalty=length_penalty, repetition_penalty=repetition_penalty, do_sample=False,
                             eos_token_id=stop, pad_token_id=pad)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def llm_captions(model: nn.Module, pixel_values: Tensor, tokenizer, cfg: CaptionConfig = CaptionConfig()) -> list[str]:
    """One caption per image from the LLM: the continuation of [soft prompt | cfg.prompt]."""
    return llm_generate_text(model, pixel_values, tokenizer, [cfg.prompt] * pixel_values.shape[0], cfg.num_beams,
                             cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty, cfg.repetition_penalty)


# ------------------------------------------------------------------------------------------------ Q-Former decoder
def _step_log_probs(model, ids: Tensor, memory: tuple, eos: int, allow_eos: bool) -> Tensor:
    """(R, V) float32 log-probabilities of the next token after `ids` (R, t) given `_query_memory`'s output."""
    cache, weights = memory
    states = model.qformer.itg_pass(ids, torch.ones_like(ids), cache, weights=weights)
    logits = model.qformer.lm_head(states[:, -1:]).squeeze(1).float()
    logp = torch.log_softmax(logits, dim=-1)
    if not allow_eos:
        logp[:, eos] = float("-inf")
    return logp


def _query_memory(model, pixel_values: Tensor, repeat: int) -> tuple:
    """(the queries' per-layer K/V cache, repeated `repeat` times per image; the Q-Former's fused projection
    weights), what every decoding step reads: the weights are concatenated once per call, not once per token."""
    weights = model.qformer.projection_weights()
    embeds = model.image_embeds(pixel_values)
    queries = model.query_tokens.expand(embeds.shape[0], -1, -1)
    _, cache = model.qformer.query_pass(queries, model.qformer.image_kv(embeds, weights), weights=weights)
    if repeat > 1:
        cache = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in cache]
    return cache, weights


@torch.no_grad()
def qformer_generate(model: nn.Module, pixel_values: Tensor, num_beams: int = 1, max_new_tokens: int = 30,
                     min_new_tokens: int = 0, length_penalty: float = 1.0, prompt_ids: Sequence[int] = (),
                     amp: Amp = None) -> Tensor:
    """Captions from the stage-1 Q-Former decoder: (B, L) token ids after [DEC] + prompt_ids, EOS ([SEP])
    included, padded with [PAD] after it; L <= max_new_tokens. Greedy when num_beams == 1."""
    model = unwrap(model)
    if num_beams < 1 or max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need num_beams >= 1, max_new_tokens >= 1, 0 <= min_new_tokens <= max_new_tokens; got "
                         f"{num_beams}, {max_new_tokens}, {min_new_tokens}")
    q = model.config.qformer
    dev = model_device(model)
    pixel_values = pixel_values.to(dev)
    B = pixel_values.shape[0]
    start = torch.tensor([q.dec_token_id, *prompt_ids], dtype=torch.long, device=dev)
    with eval_mode(model), autocast(dev, amp):
        if num_beams == 1:
            return _greedy(model, _query_memory(model, pixel_values, 1), start, B, max_new_tokens, min_new_tokens,
                           q.sep_token_id, q.pad_token_id)
        return _beam(model, _query_memory(model, pixel_values, num_beams), start, B, num_beams, max_new_tokens,
                     min_new_tokens, length_penalty, q.sep_token_id, q.pad_token_id)


def _greedy(model, memory, start, B, max_new, min_new, eos, pad) -> Tensor:
    ids = start.expand(B, -1).clone()
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new = []
    for t in range(max_new):
        nxt = _step_log_probs(model, ids, memory, eos, allow_eos=t >= min_new).argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return torch.stack(new, dim=1)


def _beam(model, memory, start, B, K, max_new, min_new, length_penalty, eos, pad) -> Tensor:
    dev = start.device
    ids = start.expand(B * K, -1).clone()  # (B*K, t)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live beam at first, so the K beams do not start as copies
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]  # (normalised score, tokens)
    done = [False] * B
    n0 = start.shape[0]

    def norm(score: float, length: int) -> float:
        return score / (length ** length_penalty)

    for t in range(max_new):
        logp = _step_log_probs(model, ids, memory, eos, allow_eos=t >= min_new)  # (B*K, V)
        V = logp.shape[1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top_scores, top_pos = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        top_scores, top_pos = top_scores.tolist(), top_pos.tolist()
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            if done[b]:  # keep shapes: K dummy beams that are never used
                next_rows += [b * K] * K
                next_tokens += [pad] * K
                next_scores += [float("-inf")] * K
                continue
            kept = 0
            for rank, (s, pos) in enumerate(zip(top_scores[b], top_pos[b])):
                if s == float("-inf"):
                    break
                beam, tok = divmod(pos, V)
                if tok == eos:
                    if rank < K:
                        seq = ids[b * K + beam, n0:].tolist() + [eos]
                        finished[b].append((norm(s, len(seq)), seq))
                        finished[b].sort(key=lambda h: -h[0])
                        del finished[b][K:]
                    continue
                next_rows.append(b * K + beam)
                next_tokens.append(tok)
                next_scores.append(s)
                kept += 1
                if kept == K:
                    break
            while kept < K:  # fewer than K live continuations (tiny vocabularies): pad with dead beams
                next_rows.append(b * K)
                next_tokens.append(pad)
                next_scores.append(float("-inf"))
                kept += 1
            # done: K finished hypotheses and the best live beam (at its current length) cannot beat the worst
            best_live = max(next_scores[-K:])
            length = t + 1
            if len(finished[b]) == K and (best_live == float("-inf")
                                          or finished[b][-1][0] >= norm(best_live, length)):
                done[b] = True
        rows = torch.tensor(next_rows, dtype=torch.long, device=dev)
        ids = torch.cat([ids[rows], torch.tensor(next_tokens, dtype=torch.long, device=dev)[:, None]], dim=1)
        scores = torch.tensor(next_scores, dtype=torch.float32, device=dev).view(B, K)
        if all(done):
            break
    out = []
    for b in range(B):
        pool = list(finished[b])
        if not done[b]:  # the length limit: live beams are hypotheses too
            for j in range(K):
                s = float(scores[b, j])
                if s != float("-inf"):
                    seq = ids[b * K + j, n0:].tolist()
                    pool.append((norm(s, len(seq)), seq))
        best = max(pool, key=lambda h: h[0])[1] if pool else []
        out.append(best)
    width = max(1, max(len(s) for s in out))
    result = torch.full((B, width), pad, dtype=torch.long, device=dev)
    for b, seq in enumerate(out):
        if seq:
            result[b, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=dev)
    return result


def qformer_captions(model: nn.Module, pixel_values: Tensor, tokenizer, cfg: CaptionConfig = CaptionConfig(),
                     amp: Amp = None) -> list[str]:
    """Captions from the Q-Former decoder, decoded with the BERT tokenizer (special tokens dropped). cfg.prompt
    (often "" here: stage 1 trains captions right after [DEC]) is tokenised without special tokens."""
    prompt_ids = tokenizer(cfg.prompt, add_special_tokens=False)["input_ids"] if cfg.prompt else []
    ids = qformer_generate(model, pixel_values, cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens,
                           cfg.length_penalty, prompt_ids, amp)
    return [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]


# ------------------------------------------------------------------------------------------------ metrics
def java_available() -> bool:
    return shutil.which("java") is not None


def caption_metrics_available() -> Optional[str]:
    """None when the COCO caption metrics can run here, else the reason they cannot."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return ("pycocoevalcap is not installed: pip install pycocoevalcap (or pip install 'blip2fast[eval]')")
    if not java_available():
        return "java is not on PATH: pycocoevalcap's PTB tokenizer and METEOR run on Java (apt-get install default-jre)"
    return None


def spice_unavailable_reason() -> Optional[str]:
    """None when SPICE can run without downloading anything, else why it is skipped (offline, its models absent)."""
    try:
        from pycocoevalcap.spice import get_stanford_models as gsm
    except ImportError:
        return "pycocoevalcap is not installed"
    jar = os.path.join(os.path.dirname(gsm.__file__), "lib", "stanford-corenlp-3.6.0.jar")
    models = os.path.join(os.path.dirname(gsm.__file__), "lib", "stanford-corenlp-3.6.0-models.jar")
    if not (os.path.isfile(jar) and os.path.isfile(models)):
        return (f"needs the Stanford CoreNLP 3.6.0 jars in {os.path.dirname(jar)} "
                "(stanford-corenlp-3.6.0.jar and -models.jar), which pycocoevalcap downloads at first use; this "
                "evaluation never downloads. Put them there (e.g. copied from a machine with network access) to "
                "get SPICE.")
    return None


def caption_metrics(references: dict, predictions: dict, spice: bool = True, log=print) -> dict:
    """COCO caption metrics of `predictions` {image_id: caption} against `references` {image_id: [captions]}
    (the same ids). Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", ["SPICE"]} as pycocoevalcap reports
    them (fractions; CIDEr is not bounded by 1), plus "skipped": {metric: reason} for those not computed."""
    reason = caption_metrics_available()
    if reason is not None:
        raise RuntimeError(f"caption metrics unavailable: {reason}")
    if set(references) != set(predictions):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise ValueError(f"references and predictions name different images (missing predictions {missing}, "
                         f"predictions without references {extra})")
    empty = [i for i, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"images without reference captions: {empty[:5]}")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # pycocoevalcap's scorers key by image id; map ours to 0..n-1 (any hashable id, stable order)
    keys = list(references)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[key]] for i, key in enumerate(keys)})
    res = tok.tokenize({i: [{"caption": predictions[key]}] for i, key in enumerate(keys)})
    out: dict = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    meteor = Meteor()
    try:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        _close_meteor(meteor)
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    skipped = {}
    why = spice_unavailable_reason() if spice else "SPICE not requested"
    if why is None:
        from pycocoevalcap.spice.spice import Spice

        out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:
        skipped["SPICE"] = why
        if spice:
            log(f"SPICE skipped: {why}")
    out["skipped"] = skipped
    return out


def _close_meteor(meteor) -> None:
    """Stop METEOR's Java process now rather than at garbage collection (pycocoevalcap stops it in __del__, which
    repeats these calls harmlessly: closing a closed pipe and killing a reaped process do nothing)."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is None:
        return
    with meteor.lock:
        proc.stdin.close()
        proc.kill()
        proc.wait()
