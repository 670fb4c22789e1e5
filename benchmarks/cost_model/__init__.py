"""A kernel-level cost model of one training step on a GPU, computed on a CPU without a GPU and without memory.

    hardware.py   the GPU's constants: the measured ones (with their source) and every assumption (with its reason)
    trace.py      runs one whole training step on `meta` tensors and records every aten / custom op it dispatches,
                  standing in for CUDA where the code asks (device type, autocast, SDPA kernels, host reads)
    rules.py      per-op cost: which ops are kernels, their FLOPs and HBM bytes, and the roofline time
    steps.py      the steps traced: blip2fast (each backend setting and mode), the LAVIS formulation, transformers
    report.py     totals by region and by op, the printed table, the JSON, the README table
    calibrate.py  prediction beside each GPU measurement (annotate) and refitting the constants (refit)

`python benchmarks/gpu_model.py --help` is the command line.
"""
