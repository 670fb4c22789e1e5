"""Predict a GPU training step from the CPU: trace one whole step (forward, backward, clipping, AdamW) on meta
tensors standing in for CUDA ones and cost every kernel (benchmarks/cost_model/). A prediction, never a measurement.

    python benchmarks/gpu_model.py                                   # stage 1, ViT-g, batch 128, blip2fast, torch
    python benchmarks/gpu_model.py --stage=2 --impl=transformers     # stage 2 with OPT-2.7B
    python benchmarks/gpu_model.py --backend=triton --cuda_graphs --attention_dropout=0 --out=pred.json
    python benchmarks/gpu_model.py suite --out=benchmarks/results/predicted-h200.json    # the README's rows
    python benchmarks/gpu_model.py readme benchmarks/results/predicted-h200.json --readme README.md
    python benchmarks/gpu_model.py annotate out/gpu_results.json     # prediction beside each GPU measurement
                                                                     # (--max_seconds=S: stop tracing after S)
    python benchmarks/gpu_model.py refit benchmarks/results/gpu-XXXX.json    # constants from a GPU results file

Options of a prediction: --stage 1|2, --preset vit_g|vit_l|tiny, --batch, --text_len, --impl blip2fast|lavis|
transformers, --backend torch|triton|cpp|auto|<op>=<backend>,..., --cuda_graphs, --fp8, --attention_dropout,
--hidden_dropout, --gpu h200|h100, --constants FIT.json (refitted constants), --out FILE.json, --top N.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from cost_model import hardware, report  # noqa: E402
from cost_model.steps import IMPLS, PRESETS, StepSpec  # noqa: E402


class UsageError(Exception):
    """A bad argument: printed as one line."""


def useful_flops(spec: StepSpec) -> float:
    """The minimal formulation's FLOPs of the step (blip2fast/flops.py), the same for every implementation."""
    import torch

    from blip2fast import Blip2, flops

    from cost_model.steps import model_config

    cfg = model_config(spec)
    if spec.stage == 1:
        return flops.stage1_step_flops(cfg, spec.batch, spec.text_len).total
    with torch.device("meta"):
        model = Blip2(cfg)
    return flops.stage2_step_flops(model, spec.batch, spec.text_len).total


def predict(spec: StepSpec, gpu: hardware.Gpu, top: int = 20) -> dict:
    from cost_model.steps import backend_env, build_step
    from cost_model.trace import trace_step

    t0 = time.perf_counter()
    with backend_env(spec.backend):
        events, _ = trace_step(build_step(spec))
    seconds = time.perf_counter() - t0
    cfg_dropout = spec.attention_dropout
    if cfg_dropout is None:
        from cost_model.steps import model_config

        cfg_dropout = model_config(spec).qformer.attention_dropout
    summary = report.summarize(events, gpu, spec.mode == "cuda_graphs", spec.batch, useful_flops(spec), top=top)
    return {"kind": "blip2fast cost-model prediction", "label": spec.label(), "spec": vars(spec).copy(),
            "attention_dropout": cfg_dropout, "gpu": gpu.as_dict(), "summary": summary,
            "trace": {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "events": len(events)}}


def _spec_from(args) -> StepSpec:
    if args.stage not in (1, 2):
        raise UsageError(f"--stage={args.stage}: 1 or 2")
    if args.preset not in PRESETS:
        raise UsageError(f"--preset={args.preset!r}: one of {PRESETS}")
    if args.impl not in IMPLS:
        raise UsageError(f"--impl={args.impl!r}: one of {IMPLS}")
    if args.batch < 2:
        raise UsageError(f"--batch={args.batch}: at least 2 (ITM needs a negative in the batch)")
    if args.impl == "transformers" and args.stage == 1:
        raise UsageError("--impl=transformers has no stage-1 training (transformers #22645, #34019): use --stage=2")
    for name in ("attention_dropout", "hidden_dropout"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v < 1.0:
            raise UsageError(f"--{name}={v}: must be in [0, 1)")
    return StepSpec(stage=args.stage, preset=args.preset, batch=args.batch, text_len=args.text_len, impl=args.impl,
                    backend=args.backend, mode="cuda_graphs" if args.cuda_graphs else "eager", fp8=args.fp8,
                    attention_dropout=args.attention_dropout, hidden_dropout=args.hidden_dropout)


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--preset", default="vit_g", help=f"model sizes: {', '.join(PRESETS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--text_len", type=int, default=32)
    p.add_argument("--impl", default="blip2fast", help=f"{', '.join(IMPLS)}")
    p.add_argument("--backend", default="torch", help="BLIP2FAST_BACKEND during the trace: torch | triton | cpp | "
                                                      "auto | op=backend,...")
    p.add_argument("--cuda_graphs", action="store_true", help="the step replayed as one CUDA graph")
    p.add_argument("--fp8", action="store_true", help="frozen towers' linears in float8")
    p.add_argument("--attention_dropout", type=float, default=None, help="default: the preset's (0.1)")
    p.add_argument("--hidden_dropout", type=float, default=None)


def _add_gpu_args(p: argparse.ArgumentParser, default: str = "h200") -> None:
    p.add_argument("--gpu", default=default, help=f"{', '.join(hardware.GPUS)}"
                   + (" or auto (the GPU the results file names)" if default == "auto" else ""))
    p.add_argument("--constants", default=None, help="a fitted-constants file from `refit` (default: hardware.py)")


def _gpu(args) -> hardware.Gpu:
    try:
        return hardware.load_gpu(args.gpu, args.constants)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _write(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# the README's rows: stage 1 ViT-g b128 and stage 2 ViT-g + OPT-2.7B b128
SUITE = [
    dict(stage=1, impl="blip2fast", backend="torch", mode="eager"),
    dict(stage=1, impl="blip2fast", backend="torch", mode="eager", attention_dropout=0.0),
    dict(stage=1, impl="blip2fast", backend="triton", mode="eager"),
    dict(stage=1, impl="blip2fast", backend="triton", mode="cuda_graphs"),
    dict(stage=1, impl="blip2fast", backend="triton", mode="cuda_graphs", fp8=True),
    dict(stage=1, impl="blip2fast", backend="cpp", mode="eager"),
    dict(stage=1, impl="lavis"),
    dict(stage=1, impl="lavis", attention_dropout=0.0),
    dict(stage=2, impl="blip2fast", backend="torch", mode="eager"),
    dict(stage=2, impl="blip2fast", backend="triton", mode="eager"),
    dict(stage=2, impl="blip2fast", backend="triton", mode="cuda_graphs"),
    dict(stage=2, impl="lavis"),
    dict(stage=2, impl="transformers"),
]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("predict", "suite", "readme", "annotate", "refit") else "predict"
    p = argparse.ArgumentParser(prog=f"gpu_model.py {command}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        if command == "predict":
            _add_spec_args(p)
            _add_gpu_args(p)
            p.add_argument("--out", default=None)
            p.add_argument("--top", type=int, default=20)
            args = p.parse_args(argv)
            pred = predict(_spec_from(args), _gpu(args), args.top)
            print(report.render(pred))
            if args.out:
                _write(args.out, pred)
                print(f"\nwritten: {args.out}")
            return 0
        if command == "suite":
            _add_gpu_args(p)
            p.add_argument("--out", required=True)
            p.add_argument("--batch", type=int, default=128)
            p.add_argument("--stages", default="1,2")
            args = p.parse_args(argv)
            gpu = _gpu(args)
            stages = {int(s) for s in args.stages.split(",")}
            preds = []
            for row in SUITE:
                if row["stage"] not in stages:
                    continue
                spec = StepSpec(batch=args.batch, **row)
                pred = predict(spec, gpu, top=10)
                s = pred["summary"]
                print(f"{spec.label():60s} stage {spec.stage}: {s['step_ms']:8.1f} ms {s['samples_per_s']:7.0f} "
                      f"samples/s {s['launches']:7,d} launches {s['hbm_bytes'] / 1e9:7.1f} GB {s['host_syncs']:4d} "
                      f"syncs (trace {pred['trace']['seconds']:.0f} s)", flush=True)
                preds.append(pred)
            _write(args.out, {"kind": "blip2fast cost-model predictions", "predictions": preds})
            print(f"written: {args.out}")
            return 0
        if command == "readme":
            p.add_argument("predictions")
            p.add_argument("--readme", default=None, help="rewrite this README's predicted-gpu block")
            args = p.parse_args(argv)
            with open(args.predictions) as f:
                preds = json.load(f).get("predictions")
            if not preds:
                raise UsageError(f"{args.predictions} holds no predictions: write one with `gpu_model.py suite "
                                 "--out=FILE`")
            block = report.readme_table(preds, os.path.relpath(args.predictions))
            if args.readme:
                report.write_readme(args.readme, block)
                print(f"updated: {args.readme}")
            else:
                print(block)
            return 0
        from cost_model import calibrate

        p.add_argument("results", help="a GPU results file (benchmarks/gpu/check.py's gpu_results.json)")
        _add_gpu_args(p, default="auto")
        if command == "annotate":
            p.add_argument("--out", default=None, help="default: rewrite RESULTS in place")
            p.add_argument("--max_seconds", type=float, default=None,
                           help="stop tracing after this long (rows not reached say so)")
            args = p.parse_args(argv)
            if args.max_seconds is None and os.environ.get("BLIP2FAST_STAGE_LIMIT_S"):
                # run as a stage of benchmarks/gpu/run.sh: finish (and write) inside the stage's limit, leaving
                # time for this process's imports and the write
                args.max_seconds = max(0.0, float(os.environ["BLIP2FAST_STAGE_LIMIT_S"]) - 8.0)
            if args.gpu == "auto":
                with open(args.results) as f:
                    args.gpu = calibrate.measured_gpu(json.load(f))
            n = calibrate.annotate(args.results, _gpu(args), out=args.out, max_seconds=args.max_seconds)
            print(f"annotated {n} measurements with the cost model's prediction: {args.out or args.results}")
            return 0
        p.add_argument("--out", default=hardware.FIT_FILE)
        args = p.parse_args(argv)
        if args.gpu == "auto":
            with open(args.results) as f:
                args.gpu = calibrate.measured_gpu(json.load(f))
        fit = calibrate.refit(args.results, _gpu(args))
        _write(args.out, fit)
        print(calibrate.render_fit(fit))
        print(f"written: {args.out} (use it with --constants {os.path.relpath(args.out)})")
        return 0
    except (UsageError, FileNotFoundError) as e:
        print(f"gpu_model.py {command}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a file that is not what the command reads (bad JSON, no rows, no markers)
        if command == "predict":
            raise
        print(f"gpu_model.py {command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
