#!/usr/bin/env bash
# The GPU checks beyond run_gpu.sh, each part under its own time budget:
#
#   memory   memory.py (XLA:GPU's buffers of the step, float32 and bfloat16),
#            then the JAX float32 step once with convolution autotuning off
#            (XLA_FLAGS=--xla_gpu_autotune_level=0), to tell the program's
#            memory from compile-time autotuning scratch (benchmarks/README.md,
#            "Memory analysis")
#   eval     eval_throughput.py: PGD-20 evaluation and standard AutoAttack,
#            jax_memat against PyTorch and the reference AutoAttack package
#   scaling  scaling.py: seconds per epoch against batch size and model, and
#            AutoAttack seconds against points
#
#   PARTS=memory,eval bash benchmarks/run_gpu_rest.sh      # results in $OUT
#
# The machine has no network: for the reference AutoAttack, carry its source
# folder and set AUTOATTACK_SRC to it (installed with pip --no-deps first);
# without it the reference side is recorded as skipped.
# DEVICE=cpu (with small sizes) only smoke-tests this script.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
PARTS="${PARTS:-memory,eval,scaling}"
DEVICE="${DEVICE:-gpu}"
MEMORY_BUDGET_S="${MEMORY_BUDGET_S:-150}"
EVAL_BUDGET_S="${EVAL_BUDGET_S:-240}"
SCALING_BUDGET_S="${SCALING_BUDGET_S:-300}"
MODEL="${MODEL:-preact_resnet18}"
BATCH="${BATCH:-128}"
STEPS="${STEPS:-20}"
PGD_POINTS="${PGD_POINTS:-5000}"
AA_POINTS="${AA_POINTS:-500}"
AA_BATCH="${AA_BATCH:-250}"
SCALING_MODELS="${SCALING_MODELS:-preact_resnet18,wide_resnet}"
SCALING_BATCHES="${SCALING_BATCHES:-64,128,256,512}"
SCALING_AA_POINTS="${SCALING_AA_POINTS:-100,200,500,1000}"
AUTOATTACK_SRC="${AUTOATTACK_SRC:-}"
mkdir -p "$OUT_DIR"

has_part() { [[ ",$PARTS," == *",$1,"* ]]; }
timed() {  # timed <budget s> <label> <command...>
  local budget=$1 label=$2
  shift 2
  echo "== $label (budget $budget s)"
  local start=$SECONDS
  timeout --kill-after=10 "$budget" "$@" || echo "(exit $? for $label; partial results, if any, in $OUT_DIR)"
  echo "== $label: $((SECONDS - start)) s"
}

timeout 20 nvidia-smi || echo "(nvidia-smi failed)"

if has_part memory; then
  timed "$MEMORY_BUDGET_S" "memory.py" python benchmarks/memory.py --model "$MODEL" \
    --batch-size "$BATCH" --dtype float32,bfloat16 --out "$OUT_DIR/memory_$DEVICE.json"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timed "$MEMORY_BUDGET_S" \
    "JAX float32 step without autotuning" python benchmarks/train_throughput.py \
    --models "$MODEL" --frameworks jax --dtype float32 --batch-size "$BATCH" --steps "$STEPS" \
    --warmup 3 --device "$DEVICE" --out "$OUT_DIR/throughput_float32_autotune0.json"
fi

if has_part eval; then
  if [ -n "$AUTOATTACK_SRC" ]; then
    timeout 120 python -m pip install --no-deps --no-build-isolation -q "$AUTOATTACK_SRC" \
      || echo "(could not install the reference AutoAttack from AUTOATTACK_SRC)"
  fi
  timed "$EVAL_BUDGET_S" "eval_throughput.py" python benchmarks/eval_throughput.py \
    --models "$MODEL" --device "$DEVICE" --pgd-points "$PGD_POINTS" --batch-size "$BATCH" \
    --aa-points "$AA_POINTS" --aa-batch-size "$AA_BATCH" --out "$OUT_DIR/eval_$DEVICE.json"
fi

if has_part scaling; then
  timed "$SCALING_BUDGET_S" "scaling.py" python benchmarks/scaling.py \
    --models "$SCALING_MODELS" --batch-sizes "$SCALING_BATCHES" --steps 10 --warmup 2 \
    --aa-model "$MODEL" --aa-points "$SCALING_AA_POINTS" --device "$DEVICE" \
    --out-dir "$OUT_DIR" --name "scaling_$DEVICE"
fi
echo "== done; JSON in $OUT_DIR"
