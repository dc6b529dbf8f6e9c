#!/usr/bin/env bash
# One short, prepared GPU run: the three benchmarks with the book's full-size components (DistilBERT-base,
# ViT-B/16 at 224 px, GPT-2 124M with cross-attention; random weights), bf16 and SDPA, in under 5 minutes.
# Results go to $OUT/gpu_results.txt when $OUT is set, else to benchmarks/gpu_results.txt.
#
#   benchmarks/gpu.sh                       # on a CUDA machine
#   PYTHON=/path/to/python benchmarks/gpu.sh
#   DEVICE=cpu QUICK=1 benchmarks/gpu.sh    # smoke test of this script and every flag it passes, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x .venv/bin/python ]] && { [[ "$DEVICE" != cuda ]] || .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }; then
        PYTHON=.venv/bin/python
    fi
fi
if [[ "$DEVICE" == cuda ]]; then
    "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "$PYTHON: torch sees no CUDA device" >&2; exit 1; }
fi

RESULTS=${OUT:-benchmarks}/gpu_results.txt
mkdir -p "$(dirname "$RESULTS")"
: > "$RESULTS"
FLAGS=(--device "$DEVICE" --dtype bfloat16 --attn sdpa --full --out "$RESULTS")
if [[ -n "${QUICK:-}" ]]; then
    FLAGS+=(--quick)
fi
{
    echo "# vqa-fusion GPU benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC')"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    echo
} >> "$RESULTS"

# Each benchmark gets its own time limit (300 s in all); one that fails or runs out keeps what it wrote.
run() {
    local limit=$1
    shift
    local status=0
    timeout "$limit" "$PYTHON" "$@" "${FLAGS[@]}" || status=$?
    if [[ $status -ne 0 ]]; then
        echo "!! $* exited with status $status (124: over its ${limit}s limit)" | tee -a "$RESULTS"
    fi
}
run 60 benchmarks/bench_generation.py
run 130 benchmarks/bench_train_step.py --compile
run 110 benchmarks/bench_data.py --workers 0 1 2 4 8 --memory-workers 4

grep '^SUMMARY\|^!!' "$RESULTS" || true
echo "results: $RESULTS"
