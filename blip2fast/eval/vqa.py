"""Zero-shot VQA (spec section 5): the paper's prompts, beam search, and VQAv2 accuracy.

Generation: the question goes into the prompt "Question: {} Answer:" for decoder-only LLMs (OPT) or
"Question: {} Short answer:" for encoder-decoders (FlanT5); beam search with 5 beams, length penalty -1 (a
hypothesis is ranked by sum(log p) x length, which favours short answers), at least 1 and at most 10 new tokens.

Accuracy (the VQAv2 evaluation as published and as its official evaluation code behaves):
    prediction -> replace newlines and tabs by spaces, strip, punctuation rule, then digit / article /
                  contraction rule (`normalize_answer`)
    references -> when the 10 human answers are not all the same string, each gets the punctuation rule only;
                  when they are unanimous they are compared as given (the official code's behaviour)
    accuracy   -> for each of the 10 leave-one-out subsets of 9 human answers, min(1, matches / 3); the mean of
                  the 10 (so an answer given by 3 or more humans scores 1, by 2 scores 0.6 ... )
Punctuation rule: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the text has it next to a
space or the text holds a digit-comma-digit group (so "100,978" -> "100978"), and replaced by a space otherwise;
then a period is deleted unless a digit follows it ("2.5" stays; the official code deletes at most 32 periods).
Apostrophes and colons stay ("girl's", "2:50"). Digit / article / contraction rule: lower-case, split on
whitespace, number words zero..ten (and "none") become digits, the articles a / an / the are dropped, and a known
contraction written without its apostrophe gets it back ("dont" -> "don't"); words are joined by single spaces.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

from .captioning import llm_generate_text
from .common import unwrap

PROMPTS = {
    "decoder_only": "Question: {} Answer:",  # OPT (the paper)
    "encoder_decoder": "Question: {} Short answer:",  # FlanT5 (the paper)
}


@dataclass(frozen=True)
class VQAConfig:
    prompt: Optional[str] = None  # None: the paper's prompt for the LLM family; must contain "{}"
    num_beams: int = 5
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    length_penalty: float = -1.0

    def __post_init__(self):
        if self.prompt is not None and "{}" not in self.prompt:
            raise ValueError(f"VQA prompt {self.prompt!r} must contain '{{}}' where the question goes")
        if self.num_beams < 1 or self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need num_beams >= 1 and 0 <= min_new_tokens <= max_new_tokens >= 1; got "
                             f"{self.num_beams}, {self.min_new_tokens}, {self.max_new_tokens}")


def prompt_for(model: nn.Module, cfg: VQAConfig = VQAConfig()) -> str:
    from ..models.llm import is_encoder_decoder

    model = unwrap(model)
    if cfg.prompt is not None:
        return cfg.prompt
    if model.config.llm is None:
        raise ValueError("zero-shot VQA needs a stage-2 model (with an LLM); this checkpoint has none")
    return PROMPTS["encoder_decoder" if is_encoder_decoder(model.language_model) else "decoder_only"]


def vqa_answers(model: nn.Module, pixel_values: Tensor, questions: Sequence[str], tokenizer,
                cfg: VQAConfig = VQAConfig()) -> list[str]:
    """One generated answer per (image b, question b)."""
    if len(questions) != pixel_values.shape[0]:
        raise ValueError(f"{len(questions)} questions for {pixel_values.shape[0]} images")
    template = prompt_for(model, cfg)
    prompts = [template.format(q.strip()) for q in questions]
    return llm_generate_text(model, pixel_values, tokenizer, prompts, cfg.num_beams, cfg.max_new_tokens,
                             cfg.min_new_tokens, cfg.length_penalty)


# ------------------------------------------------------------------------------------------------ normalisation
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_LIMIT = 32  # the official code passes re.UNICODE (32) where re.sub takes its count
_NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                             "eight", "nine", "ten"))}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))


def _contractions() -> dict:
    """Apostrophe-less spelling -> contraction, the table of the official VQA evaluation (entries only as they
    can match: the official table's capitalised keys such as "Im" never match lower-cased text, so they are
    absent here with the same effect)."""
    table = {}

    def add(*pairs):
        for spelled, proper in pairs:
            table[spelled] = proper

    # X + n't (and n't've)
    for stem in ("ai", "are", "ca", "could", "did", "does", "do", "had", "has", "have", "is", "might", "must",
                 "need", "ought", "sha", "should", "was", "were", "would", "wo"):
        add((stem + "nt", stem + "n't"))
    for stem in ("could", "had", "might", "should", "would"):
        add((stem + "nt've", stem + "n't've"), (stem + "n'tve", stem + "n't've"))
    # X + 'd, and 'd've
    for stem in ("he", "how", "it", "someone", "something", "there", "they", "who", "you", "where"):
        add((stem + "d", stem + "'d"))
    for stem in ("he", "it", "she", "somebody", "someone", "something", "there", "they", "we", "who", "you"):
        add((stem + "d've", stem + "'d've"), (stem + "'dve", stem + "'d've"))
    # X + 'll
    for stem in ("how", "it", "somebody", "someone", "something", "they", "what", "who", "why", "you"):
        add((stem + "ll", stem + "'ll"))
    # X + 's
    for stem in ("he", "how", "somebody", "someone", "that", "there", "what", "when", "where", "who", "why"):
        add((stem + "s", stem + "'s"))
    # X + 're, X + 've
    for stem in ("there", "they", "what", "why", "you"):
        add((stem + "re", stem + "'re"))
    for stem in ("could", "might", "must", "should", "would", "they", "we", "what", "where", "who", "you", "not"):
        add((stem + "ve", stem + "'ve"))
    add(("maam", "ma'am"), ("oclock", "o'clock"), ("twas", "'twas"), ("yall", "y'all"),
        ("yall'll", "y'all'll"), ("y'allll", "y'all'll"),
        ("yall'd've", "y'all'd've"), ("y'alld've", "y'all'd've"), ("y'all'dve", "y'all'd've"),
        ("ow's'at", "'ow's'at"), ("'ows'at", "'ow's'at"), ("'ow'sat", "'ow's'at"),
        ("somebody'd", "somebodyd"))  # (sic: the official table maps this one backwards)
    return table


CONTRACTIONS = _contractions()


def process_punctuation(text: str) -> str:
    """The punctuation rule of the module docstring."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:
        # decided on the input text, applied to the running output (as the official code does)
        if delete or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_LIMIT)


def process_digits_articles(text: str) -> str:
    """The digit / article / contraction rule of the module docstring."""
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """What a predicted answer is compared as."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digits_articles(process_punctuation(text))


def normalize_references(answers: Sequence[str]) -> list[str]:
    """What the human answers are compared as: the punctuation rule, unless all of them are the same string."""
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (10 in VQAv2): the mean over the leave-one-out
    subsets of min(1, matches / 3)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    refs = normalize_references(answers)
    matches = sum(r == pred for r in refs)
    # leaving out answer j removes one match exactly when answer j matches
    scores = [min(1.0, (matches - (r == pred)) / 3.0) for r in refs]
    return sum(scores) / len(scores)


def vqa_score(predictions: dict, annotations: dict) -> dict:
    """Overall and per-answer-type accuracy (fractions in [0, 1]; the VQAv2 server prints them as percent) of
    {question_id: answer} against {question_id: {"answers": [str, ...], "answer_type": str (optional)}}."""
    missing = [q for q in annotations if q not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} annotated questions have no prediction (e.g. {missing[:5]})")
    per_q, by_type = {}, {}
    for qid, ann in annotations.items():
        acc = vqa_accuracy(predictions[qid], ann["answers"])
        per_q[qid] = acc
        by_type.setdefault(ann.get("answer_type") or "all", []).append(acc)
    if not per_q:
        raise ValueError("no annotated questions to score")
    out = {"accuracy": sum(per_q.values()) / len(per_q), "n_questions": len(per_q)}
    out["per_answer_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    return out
