"""The stages of the GPU check (benchmarks/gpu/run.sh), in the order they run: most valuable first, so that a run cut
short by its budget still brings back what only a GPU can show. One table, read by run.sh (limits), check.py
(the plan, the results file) and report.py (the README stage table). Standard library only.

A stage runs only when its whole limit fits in what is left of the budget; otherwise it is skipped up front (never
started and killed). The limits add up to the default budget, so a run where every stage takes its full limit still
runs them all; the stages at the end are the ones skipped first when the budget is smaller.

`typical_s` is an estimate for a fresh H200 (no GPU run has timed these stages yet); `report.py refresh` replaces it
in the README with the seconds of the latest GPU run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_BUDGET_S = 460  # the whole script under 8 minutes on the GPU, with ~20 s of bookkeeping between stages
DRY_RUN_FACTOR = 6  # a CPU dry run (Triton interpreter, 2 shared cores) gets 6x every limit and 6x the budget


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int  # hard limit on the GPU (the stage's process group is killed after it)
    typical_s: int  # estimated time on a fresh H200
    shows: str  # what the stage tells us that the CPU cannot
    fatal: bool = True  # a non-fatal stage's failure or skip does not clear the run's "ok"


STAGES = (
    Stage("env", 15, 6, "versions, GPU name and memory, the commit measured (git, else benchmarks/gpu/commit.txt)"),
    Stage("build", 95, 70, "blip2fast._C compiles with nvcc against the machine's torch and loads with CUDA kernels; "
                            "on failure the later stages run without it (Triton and torch paths)"),
    Stage("cuda_tests", 95, 70, "every `cuda`-marked test, kernels first: bf16 correctness of each Triton and CUDA "
                                "kernel at the paper's shapes, no host sync, CUDA-graph replay = eager, FP8 tower"),
    Stage("bench", 95, 75, "per-op timings of every backend at the paper's shapes (Q-Former attention with the "
                           "paper's attention dropout 0.1 first, then ITC loss, ITM sampling, LayerNorm, linear+CE): "
                           "the rows that set blip2fast/ops/measured_backends.json"),
    Stage("train_modes", 50, 35, "the whole stage-1 training step (ViT-g + BERT-base Q-Former, batch 128) eager, "
                                 "as CUDA graphs under bf16 autocast, with the FP8 tower"),
    Stage("e2e_stage1", 30, 20, "stage-1 step at paper size: blip2fast vs the LAVIS formulation (equal losses first)"),
    Stage("e2e_stage2", 35, 25, "stage-2 step with OPT-2.7B: blip2fast vs the LAVIS formulation (no transformers "
                                "export: that would move ~7.6 GB through the CPU)"),
    Stage("e2e_qformer_hf", 30, 20, "Q-Former forward, ITC and ITM scoring at paper size vs the LAVIS formulation "
                                    "(transformers' peer needs an export through the CPU: CPU sizes only)"),
    Stage("predict", 15, 8, "benchmarks/gpu_model.py annotate: the cost model's prediction beside every measurement",
          fatal=False),
)
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def plan(budget_s: float, selected: Optional[set] = None) -> list[dict]:
    """Each stage with its limit, as run.sh decides it when every stage before it takes its whole limit (the worst
    case): `runs` when its limit fits in what is left, and then `cumulative_s` grows by it; a stage that does not
    fit is skipped up front and uses nothing, so a smaller later stage may still run. Stages with `runs` false are
    the ones skipped first when time is short (at run time, earlier stages that finish early leave them more)."""
    rows, used = [], 0
    for i, s in enumerate(STAGES, 1):
        chosen = selected is None or s.name in selected
        runs = chosen and budget_s - used >= s.limit_s
        if runs:
            used += s.limit_s
        rows.append({"order": i, "stage": s.name, "limit_s": s.limit_s, "typical_s": s.typical_s,
                     "cumulative_s": used, "selected": chosen, "runs": runs, "fatal": s.fatal})
    return rows
