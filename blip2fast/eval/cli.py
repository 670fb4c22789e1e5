"""`python -m blip2fast.eval {retrieval,caption,vqa} --model=PATH --data=...`: prints a table, writes JSON.

    retrieval  --data=ANNOTATIONS.json --images=DIR  or  --data='shards/{000..009}.tar'   [--k=128]
    caption    the same data; --decoder=llm (stage 2; prompt: what the run trained with, "a photo of" for a LAVIS /
               transformers checkpoint) or qformer (stage 1; the default for a model without an LLM)
    vqa        --data=QUESTIONS.json --images=DIR [--annotations=ANNOTATIONS.json]  (VQAv2 layout)

--model: a blip2fast run folder (its model/ folder, else its latest checkpoint), a model folder written by a run or
`save_pretrained(kind="native")`, a checkpoint folder, a transformers BLIP-2 folder or a LAVIS `.pth`
(`Blip2.from_pretrained`); --config: a preset name
(stage1_vit_g, stage1_vit_l, tiny) or a JSON file of `Blip2Config.to_dict()` when the checkpoint's sizes cannot be
inferred. Tokenizers are local folders: --tokenizer (the Q-Former's bert-base-uncased, for retrieval and
qformer captions) and --llm_tokenizer (captions and VQA with the LLM); by default the model folder, then
llm.path. Nothing is downloaded. Under torchrun every rank evaluates its share and the results are gathered;
rank 0 prints and writes. Recalls, accuracies and caption metrics are fractions in the JSON, percent in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

from ..config import PRESETS, Blip2Config
from ..distributed import world
from .common import gather_objects, split_range

TASKS = ("retrieval", "caption", "vqa")
DTYPES = ("float32", "float16", "bfloat16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip2fast.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--model", required=True, help="blip2fast run / model / checkpoint folder, transformers BLIP-2 folder "
                                                  "or LAVIS .pth (local)")
    p.add_argument("--data", default=None, help="annotation/questions .json, or .tar shard pattern(s); default for a "
                                                 "run's folders (run, model/, hf/, a checkpoint): the held-out shards "
                                                 "the run evaluated on (<run>/heldout.json)")
    p.add_argument("--images", default=None, help="image folder for an annotation/questions file")
    p.add_argument("--annotations", default=None, help="vqa: VQAv2 annotations .json (answers); omit to only predict")
    p.add_argument("--config", default=None, help=f"model sizes: a preset {sorted(PRESETS)} or a config .json")
    p.add_argument("--tokenizer", default=None, help="Q-Former (BERT) tokenizer folder")
    p.add_argument("--llm_tokenizer", default=None, help="LLM tokenizer folder")
    p.add_argument("--out", default=None, help="JSON output path (default: eval_<task>.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="frozen ViT / LLM storage dtype (default: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--amp", default="auto", choices=("auto", "none", "bfloat16", "float16"),
                   help="autocast for the Q-Former in retrieval and qformer captions (auto: bfloat16 on CUDA, none "
                        "on the CPU); the LLM always runs in its own dtype")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding worker processes (default: 4, at most the CPU count)")
    p.add_argument("--resize", default=None, choices=("squash", "crop"),
                   help="eval image transform: squash = resize to size x size (LAVIS's), crop = shorter side + "
                        "centre crop (default: what the model was trained with, else its tower's own)")
    p.add_argument("--image_mean", default=None, help="R,G,B pixel mean (default: the model's / its tower's)")
    p.add_argument("--image_std", default=None, help="R,G,B pixel std (default: the model's / its tower's)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images / questions")
    # retrieval
    p.add_argument("--k", type=int, default=128, help="retrieval: ITC candidates per query reranked by ITM")
    p.add_argument("--itm_batch", type=int, default=256, help="retrieval: ITM pairs per forward")
    p.add_argument("--text_len", type=int, default=None, help="retrieval: caption tokens (default: the model's)")
    p.add_argument("--max_words", type=int, default=50, help="retrieval: caption cleaning keeps this many words")
    # generation
    p.add_argument("--decoder", default=None, choices=("llm", "qformer"),
                   help="caption: which decoder (default: the LLM when the model has one, else the Q-Former)")
    p.add_argument("--prompt", default=None,
                   help='caption: text prompt (default: the prompt a blip2fast stage-2 run trained with, recorded '
                        'in its model folder; "a photo of" for the LLM of a LAVIS / transformers checkpoint; none '
                        'for the Q-Former); vqa: a template with {} (default: the paper\'s per LLM family)')
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: 30 (caption), 10 (vqa)")
    p.add_argument("--min_new_tokens", type=int, default=None,
                   help="default: 8 (caption), 1 (vqa); at most --max_new_tokens")
    p.add_argument("--length_penalty", type=float, default=None, help="default: 1 (caption), -1 (vqa)")
    p.add_argument("--no_spice", action="store_true", help="caption: do not attempt SPICE")
    return p


def _rgb(parser: argparse.ArgumentParser, name: str, text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or (name == "image_std" and min(values) <= 0):
        _fail(parser, f"--{name}={text!r}: give three comma-separated numbers R,G,B"
                      + (" (each > 0)" if name == "image_std" else ""))
    return values


def _fail(parser: argparse.ArgumentParser, msg: str):
    """One line naming the value and the fix (argparse's own parse errors keep their usage line)."""
    print(f"{parser.prog}: error: {' '.join(str(msg).split())}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_heldout_data(model: str) -> Optional[str]:
    """The held-out shards recorded by the run that `model` belongs to (the run folder itself, its model/ or hf/
    export, or one of its checkpoints), None when there is no such record."""
    path = os.path.abspath(model)
    for _ in range(4):  # <run>, <run>/model, <run>/hf, <run>/checkpoints/step_N
        record = os.path.join(path, "heldout.json")
        if os.path.isfile(record):
            with open(record) as f:
                urls = json.load(f).get("urls")
            return urls or None
        path = os.path.dirname(path)
    return None


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("batch_size", "k", "itm_batch", "num_beams", "max_words"):
        if getattr(a, name) < 1:
            _fail(p, f"--{name}={getattr(a, name)} must be >= 1")
    for name in ("workers",):
        if getattr(a, name) < 0:
            _fail(p, f"--{name}={getattr(a, name)} must be >= 0")
    if a.limit is not None and a.limit < 1:
        _fail(p, f"--limit={a.limit} must be >= 1")
    if a.text_len is not None and a.text_len < 2:
        _fail(p, f"--text_len={a.text_len} must be >= 2 ([CLS] and [SEP])")
    if not (os.path.isfile(a.model) or os.path.isdir(a.model)):
        _fail(p, f"--model={a.model!r} does not exist (a blip2fast run or model folder, a checkpoint folder, a "
                 "transformers BLIP-2 folder or a LAVIS .pth file)")
    if a.data is None:
        a.data = run_heldout_data(a.model) if a.task != "vqa" else None
        if a.data is None:
            _fail(p, f"--data is required: {a.model!r} is not from a blip2fast run that recorded its held-out set "
                     "(<run>/heldout.json); give --data=ANNOTATIONS.json --images=DIR or --data='shards/{000..009}.tar'")
        print(f"--data: the run's held-out shards ({a.data})", file=sys.stderr, flush=True)
    if a.images is not None and not os.path.isdir(a.images):
        _fail(p, f"--images={a.images!r} is not a folder")
    if a.annotations is not None and a.task != "vqa":
        _fail(p, f"--annotations is for vqa; {a.task} reads its references from --data")
    if a.annotations is not None and not os.path.isfile(a.annotations):
        _fail(p, f"--annotations={a.annotations!r} does not exist")
    if a.task == "vqa" and (not a.data.endswith(".json") or a.images is None):
        _fail(p, f"vqa needs --data=QUESTIONS.json and --images=FOLDER (got --data={a.data!r}, --images={a.images!r})")
    if a.task == "vqa" and a.prompt is not None and "{}" not in a.prompt:
        _fail(p, f"--prompt={a.prompt!r}: a VQA prompt needs {{}} where the question goes")
    if a.config is not None and a.config not in PRESETS and not os.path.isfile(a.config):
        _fail(p, f"--config={a.config!r} is neither a preset {sorted(PRESETS)} nor an existing .json file")
    for name in ("tokenizer", "llm_tokenizer"):
        v = getattr(a, name)
        if v is not None and not os.path.isdir(v):
            _fail(p, f"--{name}={v!r} is not a folder (a local tokenizer folder; nothing is downloaded)")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        _fail(p, f"--max_new_tokens={a.max_new_tokens} must be >= 1")
    if a.min_new_tokens is not None and a.min_new_tokens < 0:
        _fail(p, f"--min_new_tokens={a.min_new_tokens} must be >= 0")


# ------------------------------------------------------------------------------------------------ setup
def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); nothing otherwise. True when it started one."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device={name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={name!r}: CUDA is not available on this machine")
    return dev


def load_config(spec: Optional[str], dtype: str) -> Optional[Blip2Config]:
    if spec is None:
        return None
    if spec in PRESETS:
        cfg = PRESETS[spec]()
    else:
        with open(spec, encoding="utf-8") as f:
            cfg = Blip2Config.from_dict(json.load(f))
    import dataclasses

    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, dtype=dtype))
    if cfg.llm is not None:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, dtype=dtype))
    return cfg


def load_model(path: str, config: Optional[Blip2Config], dtype: str, device: torch.device):
    from ..models.blip2 import Blip2

    import warnings

    with warnings.catch_warnings():
        # a run folder's checkpoint rebuilds the model through the training code, whose notes are not news here
        warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
        model = Blip2.from_pretrained(path, config=config, vision_dtype=dtype, llm_dtype=dtype)
    return model.to(device).eval()


def _has_tokenizer(folder: Optional[str]) -> bool:
    return bool(folder) and os.path.isdir(folder) and any(
        os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES)


def find_tokenizer_folder(given: Optional[str], candidates: Sequence[Optional[str]], flag: str) -> str:
    if given is not None:
        return given
    for c in candidates:
        if _has_tokenizer(c):
            return c
    looked = [c for c in candidates if c]
    raise SystemExit(f"python -m blip2fast.eval: error: no tokenizer found: pass --{flag}=FOLDER (a local tokenizer "
                     f"folder); looked in {looked}")


def amp_of(name: str):
    return {"auto": "auto", "none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ------------------------------------------------------------------------------------------------ tasks
def run_retrieval(model, data, tokenizer_folder: str, a: argparse.Namespace) -> dict:
    from ..data.captions import clean_caption
    from ..data.tokenize import Stage1Text, load_bert_tokenizer
    from .data import image_batches
    from .retrieval import RetrievalFeatures, encode_images, encode_texts, retrieval_from_features

    text_len = a.text_len or model.config.max_text_len
    if text_len > model.config.qformer.max_position_embeddings:
        raise SystemExit(f"--text_len={text_len} exceeds the Q-Former's "
                         f"{model.config.qformer.max_position_embeddings} positions")
    text = Stage1Text(load_bert_tokenizer(tokenizer_folder), text_len)
    _, n_ranks = world()
    if len(data) < n_ranks:
        raise SystemExit(f"{len(data)} images for {n_ranks} ranks: every rank needs at least one image")
    start, end = split_range(len(data))
    local = data.subset(range(start, end))
    amp = amp_of(a.amp)
    feats, embeds = [], []
    for pixels in image_batches(local.images, model.config.vision.image_size, a.batch_size, a.resize, a.workers,
                                a.image_mean, a.image_std):
        f, e = encode_images(model, pixels, amp)
        feats.append(f)
        embeds.append(e)
    captions, text_image = [], []
    for i, caps in enumerate(local.captions):
        for c in caps:
            captions.append(clean_caption(c, a.max_words))
            text_image.append(i)
    ids, masks, tfeat = [], [], []
    for s in range(0, len(captions), a.batch_size * 4):
        enc = text(captions[s:s + a.batch_size * 4])
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
        tfeat.append(encode_texts(model, enc["input_ids"], enc["attention_mask"], amp))
    dev = model.query_tokens.device
    local_feats = RetrievalFeatures(torch.cat(feats), torch.cat(embeds), torch.cat(tfeat), torch.cat(ids).to(dev),
                                    torch.cat(masks).to(dev), torch.tensor(text_image, dtype=torch.long, device=dev))
    result = retrieval_from_features(model, local_feats, k=a.k, itm_batch=a.itm_batch, amp=amp)
    return {"metrics": result.metrics, "settings": {"k": a.k, "text_len": text_len, "max_words": a.max_words,
                                                    "resize": a.resize}}


def _gen_settings(a: argparse.Namespace, task: str) -> dict:
    """The generation settings in force: the task's defaults where not given; min_new_tokens is clamped to
    max_new_tokens."""
    caption = task == "caption"
    max_new = a.max_new_tokens if a.max_new_tokens is not None else (30 if caption else 10)
    min_new = a.min_new_tokens if a.min_new_tokens is not None else (8 if caption else 1)
    return {"num_beams": a.num_beams, "max_new_tokens": max_new, "min_new_tokens": min(min_new, max_new),
            "length_penalty": a.length_penalty if a.length_penalty is not None else (1.0 if caption else -1.0)}


def default_caption_prompt(model_path: str, decoder: str) -> str:
    """The LLM captions with the prompt its soft prompt was trained with: a stage-2 run records it (none by default,
    as in the paper); a LAVIS / transformers checkpoint records nothing and gets LAVIS's captioning prompt. A prompt
    the model never saw pulls the frozen LLM towards its own continuation of that text, whatever the image."""
    if decoder != "llm":
        return ""
    from ..checkpoint.native import recorded_prompt

    recorded = recorded_prompt(model_path)
    return "a photo of" if recorded is None else recorded


def run_caption(model, data, tokenizer, a: argparse.Namespace) -> dict:
    from .captioning import CaptionConfig, caption_metrics, caption_metrics_available, llm_captions, qformer_captions
    from .data import image_batches

    g = _gen_settings(a, "caption")
    prompt = a.prompt if a.prompt is not None else default_caption_prompt(a.model, a.decoder)
    cfg = CaptionConfig(prompt=prompt, num_beams=g["num_beams"], max_new_tokens=g["max_new_tokens"],
                        min_new_tokens=g["min_new_tokens"], length_penalty=g["length_penalty"])
    if a.decoder == "llm" and model.config.llm is None:
        raise SystemExit(f"--decoder=llm but {a.model!r} has no LLM (a stage-1 model): use --decoder=qformer")
    start, end = split_range(len(data))
    local = data.subset(range(start, end))
    amp = amp_of(a.amp)
    mine = []
    for pixels in image_batches(local.images, model.config.vision.image_size, a.batch_size, a.resize, a.workers,
                                a.image_mean, a.image_std):
        if a.decoder == "llm":
            mine += llm_captions(model, pixels, tokenizer, cfg)
        else:
            mine += qformer_captions(model, pixels, tokenizer, cfg, amp)
    captions = [c for part in gather_objects(mine) for c in part]
    preds = [{"image_id": i, "caption": c} for i, c in zip(data.image_ids, captions)]
    metrics: dict = {"n_images": len(data)}
    if world()[0] == 0:
        unavailable = caption_metrics_available()
        if unavailable is None:
            refs = {str(i): caps for i, caps in zip(data.image_ids, data.captions)}
            metrics.update(caption_metrics(refs, {str(p["image_id"]): p["caption"] for p in preds},
                                           spice=not a.no_spice))
        else:  # the captions are still written
            metrics["skipped"] = {"all metrics": unavailable}
    return {"metrics": metrics, "settings": {"decoder": a.decoder, "prompt": prompt, **g, "resize": a.resize},
            "predictions": preds}


def run_vqa(model, data, tokenizer, a: argparse.Namespace) -> dict:
    from .data import image_batches
    from .vqa import VQAConfig, prompt_for, vqa_answers, vqa_score

    g = _gen_settings(a, "vqa")
    cfg = VQAConfig(prompt=a.prompt, num_beams=g["num_beams"], max_new_tokens=g["max_new_tokens"],
                    min_new_tokens=g["min_new_tokens"], length_penalty=g["length_penalty"])
    if model.config.llm is None:
        raise SystemExit(f"vqa needs a stage-2 model with an LLM; {a.model!r} has none")
    start, end = split_range(len(data))
    local = data.subset(range(start, end))
    mine, pos = [], 0
    for pixels in image_batches(local.images, model.config.vision.image_size, a.batch_size, a.resize, a.workers,
                                a.image_mean, a.image_std):
        qs = local.questions[pos:pos + pixels.shape[0]]
        pos += pixels.shape[0]
        mine += vqa_answers(model, pixels, qs, tokenizer, cfg)
    answers = [x for part in gather_objects(mine) for x in part]
    preds = [{"question_id": q, "answer": x} for q, x in zip(data.question_ids, answers)]
    metrics: dict = {"n_questions": len(data)}
    if data.annotations is not None:
        metrics.update(vqa_score({p["question_id"]: p["answer"] for p in preds}, data.annotations))
    return {"metrics": metrics, "settings": {"prompt": prompt_for(model, cfg), **g, "resize": a.resize},
            "predictions": preds}


# ------------------------------------------------------------------------------------------------ output
def format_table(task: str, metrics: dict) -> str:
    pct = lambda v: f"{100 * v:6.2f}"  # noqa: E731
    lines = []
    if task == "retrieval":
        lines.append(f"retrieval: {metrics['n_images']} images, {metrics['n_texts']} texts, top-{metrics['k']} ITC "
                     "candidates reranked by ITM + ITC (recall in %)")
        lines.append(f"{'':24s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'mean':>6s}")
        for prefix, tag in (("", ""), ("itc_", " (ITC only)")):
            for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
                row = [metrics[f"{prefix}{d}_r{k}"] for k in (1, 5, 10)] + [metrics[f"{prefix}{d}_r_mean"]]
                lines.append(f"{(name + tag):24s} " + " ".join(pct(v) for v in row))
        lines.append(f"{'r_mean':24s} {pct(metrics['r_mean'])}   (ITC only {pct(metrics['itc_r_mean']).strip()}; "
                     f"chance R@1 i2t {pct(metrics['chance_i2t_r1']).strip()}, t2i "
                     f"{pct(metrics['chance_t2i_r1']).strip()})")
    elif task == "caption":
        lines.append(f"captioning: {metrics['n_images']} images (COCO caption metrics, x100)")
        for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"):
            if name in metrics:
                lines.append(f"{name:10s} {pct(metrics[name])}")
        for name, why in metrics.get("skipped", {}).items():
            lines.append(f"{name:10s} skipped: {why}")
    else:
        lines.append(f"VQA: {metrics['n_questions']} questions")
        if "accuracy" in metrics:
            lines.append(f"{'accuracy':14s} {pct(metrics['accuracy'])}")
            for t, v in metrics["per_answer_type"].items():
                lines.append(f"  {str(t):12s} {pct(v)}")
        else:
            lines.append("(no --annotations: predictions only)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    a = parser.parse_args(argv)
    check_args(parser, a)
    t0 = time.perf_counter()
    device = resolve_device(a.device)
    started_group = init_distributed(device)
    dtype = a.dtype or ("float16" if device.type == "cuda" else "float32")
    from .data import load_captions, load_vqa

    try:
        data = (load_vqa(a.data, a.images, a.annotations) if a.task == "vqa"
                else load_captions(a.data, a.images, a.max_words)).limit(a.limit)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--data: {e}") from None
    try:
        model = load_model(a.model, load_config(a.config, dtype), dtype, device)
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as e:
        _fail(parser, f"--model={a.model!r}: {e}")
    from ..checkpoint.native import find_qformer_tokenizer

    if a.decoder is None:
        a.decoder = "llm" if model.config.llm is not None else "qformer"
    from ..checkpoint.native import recorded_preprocess

    pre = recorded_preprocess(a.model, model.config)  # what the model was trained with, else its tower's own
    a.resize = a.resize or pre.resize
    a.image_mean = _rgb(parser, "image_mean", a.image_mean) or tuple(pre.mean)
    a.image_std = _rgb(parser, "image_std", a.image_std) or tuple(pre.std)
    model_dir = a.model if os.path.isdir(a.model) else None
    llm_path = model.config.llm.path if model.config.llm is not None else None
    if a.task == "retrieval" or (a.task == "caption" and a.decoder == "qformer"):
        folder = find_tokenizer_folder(a.tokenizer, [find_qformer_tokenizer(a.model), model_dir], "tokenizer")
    else:
        folder = find_tokenizer_folder(a.llm_tokenizer, [model_dir, llm_path], "llm_tokenizer")
    if a.task == "retrieval":
        out = run_retrieval(model, data, folder, a)
    else:
        if a.task == "caption" and a.decoder == "qformer":
            from ..data.tokenize import load_bert_tokenizer

            tokenizer = load_bert_tokenizer(folder)
        else:
            from ..data.tokenize import load_tokenizer

            tokenizer = load_tokenizer(folder)
        out = (run_caption if a.task == "caption" else run_vqa)(model, data, tokenizer, a)
    record = {"task": a.task, "model": os.path.abspath(a.model), "data": a.data, "images": a.images,
              "world_size": world()[1], "wall_s": time.perf_counter() - t0, **out}
    if world()[0] == 0:
        print(format_table(a.task, out["metrics"]), flush=True)
        path = a.out or f"eval_{a.task}.json"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_jsonable(record), f, indent=1)
        print(f"wrote {path}", flush=True)
    if started_group:
        from ..distributed import end_process_group

        end_process_group()
    return record


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


if __name__ == "__main__":
    from ..distributed import run_launched_cli

    run_launched_cli(lambda: main(sys.argv[1:]))
