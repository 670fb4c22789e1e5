"""The training loop behind `python -m blip2fast.train`, one concern per module:

    config      TrainConfig dataclasses, presets (demo, demo_small, paper stage 1 / stage 2), the --key=value CLI
    optim       AdamW with the no-decay rule, warmup + cosine schedule (host and device), gradient clipping
    step        the training step on device: eager, torch.compile'd or replayed as a CUDA graph
    parallel    DDP over the trainable step, replicated or FSDP2-sharded frozen towers
    checkpoint  atomic safetensors/JSON checkpoints, latest / resume, transformers export
    logging     progress lines, metrics.jsonl, TensorBoard, FLOP estimate and MFU
    data        demo shards, text encoders, the ShardLoader of a run, the held-out batch
    model       Blip2 from the config with local weights (vision tower, BERT, LLM, stage-1 checkpoint)
    evaluate    held-out retrieval R@k against chance
    trainer     Trainer.train_step / fit

Submodules are imported where used: `import blip2fast.training` stays cheap.
"""
