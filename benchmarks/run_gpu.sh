#!/usr/bin/env bash
# PGD-10 AT throughput and peak memory on one GPU: jax_memat vs. the PyTorch baseline.
#
# Sized for a hard budget of about 8 minutes (BUDGET_S, default 420 s, is the
# stop for everything after the pre-flight). float32 runs first for both
# models and frameworks; the bfloat16 pass runs if BF16=1, or with BF16=auto
# (the default) only when at least BF16_NEEDS_S seconds of the budget remain.
# Every step is under `timeout`, and the JSON is rewritten after each
# (model, framework) pair, so a cut-short run keeps what it measured.
#
#   bash benchmarks/run_gpu.sh                     # results in $OUT, else benchmarks/results
#   BF16=0 STEPS=20 bash benchmarks/run_gpu.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
STEPS="${STEPS:-30}"
WARMUP="${WARMUP:-5}"
BATCH="${BATCH:-128}"
MODELS="${MODELS:-preact_resnet18,resnet18}"
BF16="${BF16:-auto}"
BF16_FRAMEWORKS="${BF16_FRAMEWORKS:-jax,torch}"
BUDGET_S="${BUDGET_S:-420}"
BF16_NEEDS_S="${BF16_NEEDS_S:-180}"
CHILD_TIMEOUT_S="${CHILD_TIMEOUT_S:-150}"  # one (model, framework) subprocess
TORCH_VARIANTS="${TORCH_VARIANTS:-eager,channels_last,compile}"  # --torch-variant
DEVICE="${DEVICE:-gpu}"  # cpu only to smoke-test this script off the GPU machine
mkdir -p "$OUT_DIR"
START=$(date +%s)
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

echo "== nvidia-smi"
timeout 20 nvidia-smi || echo "(nvidia-smi failed)"

echo "== versions and import pre-flight (no tensorflow / ml_collections on this machine)"
timeout 120 python - <<'EOF' || { echo "pre-flight failed; not benchmarking"; exit 1; }
import sys

sys.path.insert(0, "benchmarks")
import train_throughput as tt

api = tt._import_jax_memat()
import jax
import torch

print("python", sys.version.split()[0])
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
heavy = [m for m in ("tensorflow", "tensorflow_datasets", "ml_collections") if m in sys.modules]
print("tensorflow/ml_collections imported:", heavy)
EOF

run() {  # run <dtype> <frameworks> <json name>
  local left
  left=$(remaining)
  if [ "$left" -le 30 ]; then
    echo "== skipping $1 ($left s of the budget left)"
    return 0
  fi
  echo "== $1 / $2, $left s of the budget left"
  timeout --kill-after=10 "$left" python benchmarks/train_throughput.py \
    --models "$MODELS" --frameworks "$2" --dtype "$1" --batch-size "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --device "$DEVICE" --child-timeout "$CHILD_TIMEOUT_S" \
    --torch-variant "$TORCH_VARIANTS" --out "$OUT_DIR/$3" || echo "(exit $? for $1; partial results in $OUT_DIR/$3)"
}

run float32 jax,torch throughput_float32.json

if [ "$BF16" = "1" ] || { [ "$BF16" = "auto" ] && [ "$(remaining)" -ge "$BF16_NEEDS_S" ]; }; then
  run bfloat16 "$BF16_FRAMEWORKS" throughput_bfloat16.json
else
  echo "== bfloat16 skipped (BF16=$BF16, $(remaining) s of the budget left)"
fi
echo "== done in $(($(date +%s) - START)) s; JSON in $OUT_DIR"
# The tables again, from the JSON (also after a run that was cut short).
timeout 30 python - "$OUT_DIR"/throughput_*.json <<'EOF'
import json
import sys

sys.path.insert(0, "benchmarks")
import train_throughput as tt

for path in sys.argv[1:]:
    with open(path) as f:
        report = json.load(f)
    print(f"\n### {path}\n")
    print(tt.markdown(report["results"], report["ratios"]))
EOF
