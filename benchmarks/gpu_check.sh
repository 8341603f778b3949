#!/usr/bin/env bash
# One prepared GPU session (device tool), at most 9 minutes on an H100 / H200, no install (a PYTHONPATH shim):
#   1. the GPU tests: pytest on the tests that need CUDA (they skip elsewhere)       at most TESTS_S (120 s)
#   2. the torch runner's levers on the reference-size model (dim 64, two UNets) at 512², batch 8 then 1:
#      eager fp32 vs each lever alone, every lever at fp32 / bf16 / fp16, bf16 + torch.compile
#      (benchmarks/gpu_torch.py)                                                     BENCH_S (200 s) + 45 s at most
#   3. folder restore of generated 2-12 MP JPEGs, sequential vs overlapped --io-workers       FOLDER_S (150 s)
# Everything lands in $OUT, at most 8 files: gpu_check.log (all output, the tests' included), gpu_torch.json,
# folder_restore.json, and with TRAIN_MIN > 0 the training run's five (that run then takes TRAIN_MIN more minutes).
#   device run: command "bash benchmarks/gpu_check.sh", timeout_s 580
#   with training: carry [".data"] (made by `python -m benchmarks.pack_train_data`), "TRAIN_MIN=6 bash ..."
# DEVICE=cpu is a smoke of the same steps here (tiny sizes; about 2 minutes on 2 cores):
#   OUT=/tmp/gpu_out DEVICE=cpu TRAIN_MIN=0 BENCH_S=60 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
TRAIN_MIN=${TRAIN_MIN:-0}
BENCH_S=${BENCH_S:-200}
TESTS_S=${TESTS_S:-120}
FOLDER_S=${FOLDER_S:-150}
DEVICE=${DEVICE:-cuda}
GPU_TESTS=${GPU_TESTS:-"tests/unit/test_torch_levers.py tests/unit/test_train_gpu.py"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - T0 )) s in)"; }
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
# The import names map onto folders (rddm_export -> export/, rddm_train -> train/): link them onto
# PYTHONPATH, which needs neither pip nor network on the device.
SHIM=/tmp/rddm_shim; rm -rf "$SHIM"; mkdir -p "$SHIM"
ln -s "$PWD/rddm_infer" "$SHIM/rddm_infer"; ln -s "$PWD/export" "$SHIM/rddm_export"; ln -s "$PWD/train" "$SHIM/rddm_train"
export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import rddm_train, rddm_infer.model" || exit 3
rddm-train() { python3 -c "import sys; from rddm_train.cli import main; sys.exit(main())" "$@"; }

if [ "$TRAIN_MIN" != 0 ]; then  # TRAIN_MIN=0: no training (max-minutes 0 would mean "no budget")
  step "training the default model, $TRAIN_MIN min"
  RUN=/tmp/rddm_default_run
  rm -rf "$RUN"
  t0=$(date +%s)
  rddm-train --config default_denoiser --data .data/train --val .data/val --out "$RUN" \
    --device "$DEVICE" --bf16 --channels-last --max-minutes "$TRAIN_MIN" --no-progress ${TRAIN_EXTRA:-}
  echo "training wall time: $(( $(date +%s) - t0 )) s"
  for f in ema.safetensors ema.json config.toml train_log.jsonl val_log.csv; do
    cp "$RUN/$f" "$OUT/" 2>/dev/null || echo "missing $RUN/$f"
  done
fi

# ---- 1. GPU tests (CUDA-only tests skip without a GPU; -rs names every skip and why) -------------------------
step "1. GPU tests: $GPU_TESTS"
timeout "$TESTS_S" python3 -m pytest -q -rs -p no:cacheprovider $GPU_TESTS
echo "pytest exit status: $?"

# ---- 2. torch levers vs eager fp32, reference-size model ----------------------------------------------------
step "2. torch levers vs eager fp32"
if [ "$DEVICE" = cpu ]; then  # smoke: the same script on a tiny network of the same shape
  LEVER_ARGS="--device cpu --dim 8 --sizes 32 --batches 2 1 --steps 2 --repeats 1 --no-compile"
else
  LEVER_ARGS="--device $DEVICE --sizes 512 --batches 8 1 --steps 5 --repeats 3"
fi
timeout $(( BENCH_S + 45 )) python3 -m benchmarks.gpu_torch $LEVER_ARGS --budget-s "$BENCH_S" \
  --out "$OUT/gpu_torch.json" ${BENCH_EXTRA:-}
echo "gpu_torch exit status: $?"

# ---- 3. folder restore: sequential vs overlapped --io-workers (benchmarks/overlap.py) ------------------------
# Generated JPEGs through Restorer.restore_paths, each way in its own process: the stand-in engine (fixed latency)
# for the pipeline's ceiling, then the built-in model on torch (all levers on), --io-workers 0 vs auto, with the
# GPU's busy share (nvidia-smi sampled every 100 ms) and the host CPU cores busy. One file: folder_restore.json.
step "3. folder restore, sequential vs overlapped (budget ${FOLDER_S} s)"
if [ "$DEVICE" = cpu ]; then
  FOLDER_ARGS="--images 6 --latency-ms 10 --real 2 --real-mp 0.05 0.1"
else
  FOLDER_ARGS="--images 60 --latency-ms 10 --real ${FOLDER_IMAGES:-40} --real-mp 2 12 --real-backend torch \
    --real-device $DEVICE --real-batch 8 --in-flight-mb 16000"
fi
timeout "$FOLDER_S" python3 -m benchmarks.overlap $FOLDER_ARGS --out "$OUT/folder_restore.json"
echo "overlap exit status: $?"

step "done"
ls -l "$OUT"
date -u
