#!/usr/bin/env bash
# The GPU checks, one CUDA GPU, under 11 minutes on one H200 (each step has its own time limit; BENCHMARKS.md "On a
# GPU" has the first run's times: 6.7 min, pytest 4.7 of it before its two training tests passed and took 50 s more):
#   1. python -m pytest tests/test_gpu.py -m gpu -v: bf16 ZeRO-2 / FSDP training on NCCL, bf16 lossless
#                                        decoding, the 8B-shape speed checks                      (≤ 420 s)
#   2. benchmarks/eval_speed.py --shape llama8b   decoding tokens/s of every method, random 8B bf16   (≤ 150 s)
#   3. benchmarks/train_throughput.py --shape llama8b   a training step ÷ the target's forward        (≤ 70 s)
#
#     bash benchmarks/gpu_check.sh                 # results in a new temporary folder (printed)
#     OUT=/some/folder bash benchmarks/gpu_check.sh   # results in $OUT/gpu_check/
#     PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Needs torch built for the machine's CUDA, then `pip install -e ".[dev,deepspeed]"` (DEVELOPERS.md); on a machine
# with CUDA torch but no package index, benchmarks/gpu_wheels.sh gathers the rest as wheels to carry there. Writes
# pytest.log, pytest.xml, eval_speed_llama8b.{json,log}, train_throughput_llama8b.{json,log} and summary.txt (each
# step's exit status and time); exits non-zero when a step failed. The tests build their toy target in a temporary
# cache; eval_speed builds toy_tiny (its prompts' tokenizer, seconds) in $SPECDISTILL_CACHE or ~/.cache/specdistill.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [[ -n "${OUT:-}" ]]; then
    RESULTS="$OUT/gpu_check"
else
    RESULTS=$(mktemp -d -t specdistill_gpu_check.XXXXXX)
fi
mkdir -p "$RESULTS"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SUMMARY="$RESULTS/summary.txt"
: > "$SUMMARY"
failed=0

step() {  # step <name> <seconds> <log file> <command...>: run with a time limit, log it, record status and duration
    local name=$1 limit=$2 log=$3
    shift 3
    local started=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    echo "$name: exit $status, $((SECONDS - started)) s$([[ $status == 124 ]] && echo ' (time limit)')" | tee -a "$SUMMARY"
    [[ $status == 0 ]] || failed=1
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
                  torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} | tee -a "$SUMMARY"

step "pytest -m gpu" 420 "$RESULTS/pytest.log" \
    "$PYTHON" -m pytest tests/test_gpu.py -m gpu -v -rs -p no:cacheprovider --junitxml="$RESULTS/pytest.xml"
step "eval_speed llama8b" 150 "$RESULTS/eval_speed_llama8b.log" \
    "$PYTHON" benchmarks/eval_speed.py --shape llama8b --tokenizer toy_tiny --num-prompts 2 --max-new-tokens 48 \
    --gamma 4 --out "$RESULTS/eval_speed_llama8b.json"
# its JSON goes to stdout: into its own file, the log keeps stderr
step "train_throughput llama8b" 70 "$RESULTS/train_throughput_llama8b.log" \
    bash -c '"$0" benchmarks/train_throughput.py --shape llama8b --batch 2 --seq 2048 --repeats 5 > "$1"' \
    "$PYTHON" "$RESULTS/train_throughput_llama8b.json"
cat "$RESULTS/train_throughput_llama8b.json" 2>/dev/null

echo "results: $RESULTS"
cat "$SUMMARY"
exit $failed
