#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one H100/H200, that spends its minutes on what only a GPU can show.
#
#   bash benchmarks/gpu/run.sh                      # on the GPU machine (python3 with a CUDA torch, nvcc, ninja)
#   bash benchmarks/gpu/run.sh --budget-s 300       # a shorter run: the last stages are skipped first
#   bash benchmarks/gpu/run.sh --dry-run            # on a CPU, tiny sizes (CI); same as BLIP2FAST_DRY_RUN=1
#   bash benchmarks/gpu/run.sh --stages=env,build,bench    # a subset (BLIP2FAST_STAGES)
#   bash benchmarks/gpu/run.sh --plan               # print the stage order and limits, run nothing
#   bash benchmarks/gpu/run.sh --write-commit       # here, before sending a tree without .git: commit.txt
#
# Stages, most valuable first (the table, with what each shows, is benchmarks/gpu/stages.py and the README's):
#   env -> build -> cuda_tests -> bench -> train_modes -> e2e_stage1 -> e2e_stage2 -> e2e_qformer_hf -> predict
# The stage limits add up to the default budget. A stage starts only if its whole limit fits in what is left of
# the budget, else it is skipped up front (never started and killed); it runs under `timeout` with its limit, which
# also reaches it as BLIP2FAST_STAGE_LIMIT_S (pytest runs inside stop before it, so finished rows are kept).
# A failed build does not stop the rest: the later stages run on the Triton and torch paths, with blip2fast imported
# from the source tree (BLIP2FAST_GPU_FORCE_BUILD_FAIL=1 forces that case, to test it). After each stage
# $OUT/gpu_results.json (OUT defaults to ./out) is rewritten and one line is printed. Logs: $OUT/<stage>.log.
# Exit code 0 iff every selected fatal stage is ok. Afterwards, here:
#   python benchmarks/report.py refresh $OUT/gpu_results.json --readme README.md
# refreshes blip2fast/ops/measured_backends.json and the README tables in one go.
# The GPU machine has no network and no webdataset/braceexpand/pycocoevalcap: the build installs with --no-deps,
# and the dry run makes those packages unimportable so that an eager import on the script's path fails on the CPU
# first. No torch.compile at paper size here (a cold compile takes minutes). PYTHON overrides python3.
set -uo pipefail  # no -e: a failing stage is recorded, and the next stage still runs

cd "$(dirname "$0")/../.."
DRY="${BLIP2FAST_DRY_RUN:-0}"
SELECT="${BLIP2FAST_STAGES:-}"
BUDGET_ARG=""
PLAN_ONLY=0
PY="${PYTHON:-python3}"
usage="usage: $0 [--dry-run] [--budget-s SECONDS] [--stages=a,b,...] [--plan] [--write-commit]"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages=*) SELECT="${1#--stages=}" ;;
    --budget-s=*) BUDGET_ARG="${1#--budget-s=}" ;;
    --budget-s) shift; BUDGET_ARG="${1:-}" ;;
    --plan) PLAN_ONLY=1 ;;
    --write-commit) exec "$PY" benchmarks/gpu/check.py write-commit ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$BUDGET_ARG" ] && ! [[ "$BUDGET_ARG" =~ ^[0-9]+$ && "$BUDGET_ARG" -gt 0 ]]; then
  echo "--budget-s $BUDGET_ARG: give a whole number of seconds above 0 (default: the sum of the stage limits)" >&2
  exit 2
fi
export BLIP2FAST_STAGES="$SELECT"
export BLIP2FAST_DRY_RUN="$DRY"
export OUT="${OUT:-./out}"
export PYTHONUNBUFFERED=1
# The stages account for skips themselves (a C++ row skips after a failed build, a GPU-only test on the CPU dry run):
# CI's rule that turns any non-GPU skip into a failure (conftest.py, CI=true) is not for the tests this script runs.
export BLIP2FAST_STRICT_SKIPS=0
PLAN_ARGS=()
[ -n "$BUDGET_ARG" ] && PLAN_ARGS=(--budget-s "$BUDGET_ARG")

if [ "$PLAN_ONLY" = "1" ]; then
  exec "$PY" benchmarks/gpu/check.py plan --check "${PLAN_ARGS[@]}"
fi
mkdir -p "$OUT"
if [ "$DRY" = "1" ]; then
  echo "blip2fast GPU check: DRY RUN on the CPU (tiny sizes); results in $OUT/gpu_results.json"
  # Python as the GPU machine sees it (benchmarks/gpu/like_gpu_machine/sitecustomize.py)
  export PYTHONPATH="$PWD/benchmarks/gpu/like_gpu_machine${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "blip2fast GPU check on the GPU; results in $OUT/gpu_results.json"
  export BLIP2FAST_GPU_TESTS=1  # conftest.py then leaves TRITON_INTERPRET unset: real Triton kernels
  unset TRITON_INTERPRET
  export BLIP2FAST_BENCH_HF_EXPORT=0  # no transformers peer exported through the CPU at paper size
fi
export BLIP2FAST_EXPECT_EXT=1  # until the build fails: then the C++ tests skip instead

"$PY" benchmarks/gpu/check.py plan --check "${PLAN_ARGS[@]}" || exit $?
"$PY" benchmarks/gpu/check.py init "${PLAN_ARGS[@]}" || { echo "cannot write $OUT/gpu_results.json" >&2; exit 1; }
BUDGET_S="$("$PY" benchmarks/gpu/check.py budget "${PLAN_ARGS[@]}")"  # times stages.DRY_RUN_FACTOR in a dry run
T_START=$SECONDS

selected() { [ -z "$SELECT" ] || [[ ",$SELECT," == *",$1,"* ]]; }

skip_stage() {  # skip_stage NAME REASON
  "$PY" benchmarks/gpu/check.py finish --stage "$1" --rc 0 --started "$(date +%s.%N)" \
    --limit "$("$PY" benchmarks/gpu/check.py limit --stage "$1")" --skip-reason "$2"
}

# stage NAME -- COMMAND...   (NAME's limit comes from benchmarks/gpu/stages.py)
stage() {
  local name="$1"; shift
  [ "$1" = "--" ] && shift
  if ! selected "$name"; then
    "$PY" benchmarks/gpu/check.py not-selected --stage "$name"
    return
  fi
  local limit left
  limit="$("$PY" benchmarks/gpu/check.py limit --stage "$name")"
  left=$((BUDGET_S - (SECONDS - T_START)))
  if [ "$left" -lt "$limit" ]; then
    skip_stage "$name" "its ${limit} s limit does not fit in the ${left} s left of the ${BUDGET_S} s budget"
    return
  fi
  echo "--- stage $name (limit ${limit} s, ${left} s left): $*"
  local t0 rc
  t0=$(date +%s.%N)
  BLIP2FAST_STAGE_LIMIT_S="$limit" timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  "$PY" benchmarks/gpu/check.py finish --stage "$name" --rc "$rc" --started "$t0" --limit "$limit" \
    --log "$OUT/$name.log"
  return "$rc"
}

stage env -- "$PY" benchmarks/gpu/check.py env

if [ "${BLIP2FAST_GPU_FORCE_BUILD_FAIL:-0}" = "1" ]; then
  stage build -- "$PY" benchmarks/gpu/check.py fail-build
elif [ "$DRY" = "1" ]; then
  # CI's test venv has just built it (same pip command, plus deps): then only check that it loads; a fresh venv
  # (CI's twin of the GPU machine's stack) installs it as the GPU run does, without FORCE_CUDA (no GPU here)
  export PY
  stage build -- bash -c '"$PY" benchmarks/gpu/check.py verify-build || { echo "build: not built for this Python: \
installing as on the GPU"; "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    && "$PY" benchmarks/gpu/check.py verify-build; }'
else
  # against the machine's own torch, no network: --no-deps --no-build-isolation; a CPU-only build is a failure
  export PY FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  stage build -- bash -c '"$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    && "$PY" benchmarks/gpu/check.py verify-build'
fi
BUILD_RC=$?
if [ "$BUILD_RC" -ne 0 ] && selected build; then
  # as on a machine where the build never happened: no blip2fast._C (a stale one in the tree is ignored), the C++
  # tests skip, and (dry run) no editable install, so blip2fast and blip2fast.kernels import from the source tree
  echo "--- build failed: the later stages run without blip2fast._C (Triton and torch paths)"
  export BLIP2FAST_BUILD_EXT=0 BLIP2FAST_LIKE_NOT_INSTALLED=1
  unset BLIP2FAST_EXPECT_EXT
fi

stage cuda_tests -- "$PY" benchmarks/gpu/check.py cuda-tests
stage bench -- "$PY" benchmarks/gpu/check.py bench
stage train_modes -- "$PY" benchmarks/gpu/check.py e2e --stage train_modes
stage e2e_stage1 -- "$PY" benchmarks/gpu/check.py e2e --stage e2e_stage1
stage e2e_stage2 -- "$PY" benchmarks/gpu/check.py e2e --stage e2e_stage2
stage e2e_qformer_hf -- "$PY" benchmarks/gpu/check.py e2e --stage e2e_qformer_hf
if [ -f benchmarks/gpu_model.py ] || ! selected predict; then
  stage predict -- "$PY" benchmarks/gpu_model.py annotate "$OUT/gpu_results.json"
else
  skip_stage predict "benchmarks/gpu_model.py not found (the cost model, issue 15): nothing to annotate"
fi

echo "--- done in $((SECONDS - T_START)) s; results: $OUT/gpu_results.json"
"$PY" benchmarks/gpu/check.py summary
