#!/usr/bin/env bash
# Device check for one H200 (or any CUDA GPU): build blip2fast._C with CUDA, run the `cuda`-marked tests, the per-op
# benchmarks, and the end-to-end paper-size benchmarks (stage 1 and stage 2 vs the LAVIS formulation and
# transformers, the Q-Former / retrieval pieces vs transformers, the training modes). Finishes in under 6 minutes:
# the whole script has a 345 s budget, and a stage gets min(its own limit, what is left), so a slow stage squeezes
# the later ones instead of overrunning (a squeezed-out stage is recorded as skipped).
#
#   bash benchmarks/gpu/run.sh                        # on the GPU machine (python3 with a CUDA torch, nvcc, ninja)
#   bash benchmarks/gpu/run.sh --dry-run              # on a CPU, tiny sizes (CI); same as BLIP2FAST_DRY_RUN=1
#   bash benchmarks/gpu/run.sh --stages=env,build,e2e_stage1,e2e_stage2    # a subset (BLIP2FAST_STAGES)
#
# Stages: env -> build -> cuda_tests -> e2e_stage1 -> e2e_stage2 -> e2e_qformer_hf -> train_modes -> bench ->
# attention -> ops, each under its own `timeout` (its limit also reaches the command as BLIP2FAST_STAGE_LIMIT_S, so
# pytest runs stop in time for their rows to be summarised). After each stage $OUT/gpu_results.json (OUT defaults
# to ./out) is rewritten with every stage's status, seconds and data, and one line is printed; a failed stage does
# not stop the later ones. Logs: $OUT/<stage>.log; pytest-benchmark JSONs: $OUT/bench_*.json. Exit code 0 iff all
# selected stages are ok. `python benchmarks/report.py $OUT/gpu_results.json` renders the README table from it.
# No torch.compile at paper size here (a cold compile takes minutes). The GPU machine has no internet and no
# webdataset, hence `pip install --no-deps`. PYTHON overrides python3.
set -uo pipefail  # no -e: a failing stage is recorded, and the next stage still runs

cd "$(dirname "$0")/../.."
DRY="${BLIP2FAST_DRY_RUN:-0}"
SELECT="${BLIP2FAST_STAGES:-}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --stages=*) SELECT="${arg#--stages=}" ;;
    *) echo "usage: $0 [--dry-run] [--stages=a,b,...]" >&2; exit 2 ;;
  esac
done
export BLIP2FAST_STAGES="$SELECT"
export BLIP2FAST_DRY_RUN="$DRY"
export OUT="${OUT:-./out}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if [ "$DRY" = "1" ]; then
  echo "blip2fast device check: DRY RUN on the CPU (tiny sizes); results in $OUT/gpu_results.json"
else
  echo "blip2fast device check on the GPU; results in $OUT/gpu_results.json"
  export BLIP2FAST_GPU_TESTS=1  # conftest.py then leaves TRITON_INTERPRET unset: real Triton kernels
  unset TRITON_INTERPRET
fi
export BLIP2FAST_EXPECT_EXT=1

# whole script; a stage gets min(its limit, what is left). The CPU dry run (CI) is not held to the GPU's 6 minutes.
if [ "$DRY" = "1" ]; then DEFAULT_BUDGET=1500; else DEFAULT_BUDGET=345; fi
BUDGET_S="${BLIP2FAST_CHECK_BUDGET_S:-$DEFAULT_BUDGET}"
T_START=$SECONDS
"$PY" benchmarks/gpu/check.py init || { echo "cannot write $OUT/gpu_results.json" >&2; exit 1; }

# stage NAME LIMIT_S [--pytest] -- COMMAND...
stage() {
  local name="$1" limit="$2"; shift 2
  local extra=()
  if [ "$1" = "--pytest" ]; then extra=(--pytest); shift; fi
  [ "$1" = "--" ] && shift
  if [ -n "$SELECT" ] && [[ ",$SELECT," != *",$name,"* ]]; then
    "$PY" benchmarks/gpu/check.py not-selected --stage "$name"
    return
  fi
  # the limits are the GPU's; a 2-core CPU running the Triton interpreter and tiny models needs more
  if [ "$DRY" = "1" ]; then limit=$((limit * 4)); fi
  local left=$((BUDGET_S - (SECONDS - T_START)))
  if [ "$left" -lt "$limit" ]; then limit="$left"; fi
  if [ "$limit" -le 5 ]; then
    "$PY" benchmarks/gpu/check.py finish --stage "$name" --rc 1 --started "$(date +%s.%N)" --limit "$limit" \
      --skip-reason "no time left in the ${BUDGET_S} s budget"
    return
  fi
  echo "--- stage $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s.%N)
  BLIP2FAST_STAGE_LIMIT_S="$limit" timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  "$PY" benchmarks/gpu/check.py finish --stage "$name" --rc "$rc" --started "$t0" --limit "$limit" \
    --log "$OUT/$name.log" "${extra[@]}"
}

# Limits (s) are sized for a fresh H200; together they exceed the budget on purpose (most stages finish early).
# (a) versions, GPU, commit
stage env 20 -- "$PY" benchmarks/gpu/check.py env

# (b) build the extension against the machine's own torch (CUDA when torch is a CUDA build and nvcc is found)
if [ "$DRY" = "1" ]; then
  # CI has just built it with the same pip command (plus deps); only check that it loads.
  stage build 60 -- "$PY" benchmarks/gpu/check.py verify-build
else
  export PY FORCE_CUDA=1  # a CPU-only build here would be a failure: say so at build time
  stage build 120 -- bash -c '"$PY" -m pip install -e . --no-build-isolation --no-deps \
    && "$PY" benchmarks/gpu/check.py verify-build'
fi

# (c) every test marked cuda (ours and the models'; the attention kernel's run in (g), under their own limit, as
#     their first launches compile Triton kernels); exit code 5 (nothing collected) counts as a failure
stage cuda_tests 75 --pytest -- "$PY" -m pytest -q -m cuda tests -p no:cacheprovider \
  --ignore=tests/ops/test_qformer_attention_triton.py

# (d) end-to-end at paper size, right after the tests (the budget squeezes the last stages first): EVA ViT-g +
#     BERT-base Q-Former (+ OPT-2.7B), batch 128, random weights built on the GPU; blip2fast vs the LAVIS
#     formulation (same weights, equal losses asserted) vs transformers
stage e2e_stage1 60 -- "$PY" benchmarks/gpu/check.py e2e --stage e2e_stage1
stage e2e_stage2 80 -- "$PY" benchmarks/gpu/check.py e2e --stage e2e_stage2
stage e2e_qformer_hf 45 -- "$PY" benchmarks/gpu/check.py e2e --stage e2e_qformer_hf

# (e) training modes (benchmarks/bench_train_modes.py: FP8, CUDA graphs, ...)
stage train_modes 50 -- "$PY" benchmarks/gpu/check.py e2e --stage train_modes

# (f) ITM sampler micro-benchmark: torch reference vs blip2fast._C (identical indices checked first)
stage bench 20 -- "$PY" benchmarks/gpu/check.py bench

# (g) Q-Former attention: cuda-marked tests (bf16, batch-128 shapes, CUDA graphs) + benchmark vs reference and SDPA
stage attention 90 -- "$PY" benchmarks/gpu/check.py attention

# (h) every other per-op benchmark (benchmarks/bench_*.py: ITC loss, ITM sampling, LayerNorm, linear CE, ...)
stage ops 50 -- "$PY" benchmarks/gpu/check.py ops

echo "--- done in $((SECONDS - T_START)) s; results: $OUT/gpu_results.json"
"$PY" - "$OUT/gpu_results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for name, s in r["stages"].items():
    print(f"  {name:15s} {s['status']:12s} {s.get('seconds')} s  {s.get('message', '')}")
sys.exit(0 if r["ok"] else 1)
EOF
