#!/usr/bin/env bash
# The prepared GPU check: seconds per epoch and peak memory of the shipped SD 1.5 and SDXL recipes on
# random-weight models of the real sizes (nothing from the hub), the epoch / bare-model-passes ratio, and
# SDPA attention and torch.compile on and off. Fits in 8 minutes on one H100 or H200: each step has its own
# time limit and a step that runs out prints "timed out" and the check goes on.
#
#   bash benchmarks/gpu_check.sh                 # after `pip install -e .` on the GPU machine
#   OUT=/some/folder bash benchmarks/gpu_check.sh   # keep the logs there (default: a temporary folder)
#
# Every step is benchmarks/gpu_memory.py with the product setup (LoRA, 8-bit AdamW, bf16, the recipe's
# checkpointing choice), one prompt group per epoch, two epochs (the first a warm-up); its table gives
# s/epoch, loaded and peak GiB. Copy the printed summary into benchmarks/RESULTS.md with the card's name,
# and the README's time-per-adapter table says which figures were measured on which card.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS ARGS...: one gpu_memory.py run under a time limit, its log kept in $OUT
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  if timeout "$limit" python benchmarks/gpu_memory.py --setups lora "$@" >"$OUT/$name.log" 2>&1; then
    grep -E "^(device|setup|lora)|epoch / bare" "$OUT/$name.log"
  else
    echo "$name: timed out or failed (exit $?); the last lines of $OUT/$name.log:"
    tail -n 5 "$OUT/$name.log"
  fi
}

start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
step sd15-sdpa 110 --size sd15 --bare
step sd15-classic-attention 90 --size sd15 --attention classic
step sd15-compile 120 --size sd15 --compile
step sdxl-sdpa 150 --size sdxl
echo "gpu_check: $(($(date +%s) - start)) s in all; logs in $OUT"
