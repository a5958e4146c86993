#!/usr/bin/env bash
# Paper-scale GPU benchmarks in one short run (BERT-base-size teacher, DistilBERT-size
# student, random weights, bf16). Used on a lent GPU machine; results go to docs/benchmarks.md.
#
#   OUT=bench-out bash kdcl_dist/bench/gpu_paper_scale.sh
#
# If deepspeed/webdataset are missing (a bare GPU image), wheels in .whl/ are installed into
# /tmp/site first (no network needed). Every step has its own time limit so one hang cannot
# eat the others; logs and JSON land in $OUT.
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
STEP_LIMIT=${STEP_LIMIT:-170}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import deepspeed, webdataset" 2>/dev/null; then
  pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH="$PWD:/tmp/site"
fi
[ -d .device_carry/data ] && export KDCL_DATA_DIR=$PWD/.device_carry/data
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME CMD...: run with a limit, keep its log, never stop the script
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$STEP_LIMIT" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - t0)) s"
  grep -v -E "^\[|Warning|warn" "$OUT/$name.log" | tail -25
}

# MFU of the student-only and KD steps (plain loop and the DeepSpeed KDEngine) at max length
# 128 and 512; the 512 run adds padded vs length-grouped micro-batches (real abstracts when
# .device_carry/data is carried, else a labelled synthetic corpus) and device->host sync counts.
PS="--preset paper-size --device cuda --dtype bf16 --engine --ds-config ds_configs/zero2_bf16.json"
step train_128 python3 -m kdcl_dist bench train $PS --seq-len 128 --no-batching \
  --json "$OUT/train_128.json"
step train_512 python3 -m kdcl_dist bench train $PS --seq-len 512 --no-memory --micro-batch 32 \
  --batching-steps 3 --batching-warmup 1 --json "$OUT/train_512.json"
step train_512_ckpt python3 -m kdcl_dist bench train $PS --seq-len 512 --batch 64 --no-memory \
  --no-batching --gradient-checkpointing --json "$OUT/train_512_ckpt.json"
# KD from a cached sparse teacher (issue 14 item 2), when that flag exists in this checkout
if python3 -m kdcl_dist bench train --help 2>/dev/null | grep -q -- "--teacher-cache"; then
  for L in 128 512; do
    step "train_cache_$L" python3 -m kdcl_dist bench train $PS --seq-len $L --no-memory \
      --no-batching --teacher-cache --json "$OUT/train_cache_$L.json"
  done
fi
step train_zero3 python3 -m kdcl_dist bench train --preset paper-size --device cuda --dtype bf16 \
  --engine --ds-config ds_configs/zero3_bf16.json --no-memory --no-batching --json "$OUT/train_zero3.json"
step score python3 -m kdcl_dist bench score --device cuda --dtype bf16 --no-ranks --repeats 3 \
  --docs 2000 --naive-docs 200 --distilbert-docs 400 --workdir "$OUT/score-work"
rm -rf "$OUT/score-work"
# Optional correctness check of non-finite step handling in bf16/fp16 (not shipped: a
# scratch script carried to the device when present).
if [ -f .device_carry/hd/gpu_nan_check.py ]; then
  STEP_LIMIT=${NAN_LIMIT:-150} step nan_check env CONFIGS=zero2_fp16,zero2_bf16 OUT="$OUT" \
    python3 .device_carry/hd/gpu_nan_check.py
fi
