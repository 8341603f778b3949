#!/usr/bin/env bash
# One prepared GPU session (device tool): no install (a PYTHONPATH shim), train the default model with
# rddm-train, then benchmark the torch sampler on the reference model size. Results land in $OUT
# (at most 8 files). Needs .data/ (made by `python -m benchmarks.pack_train_data`) carried along:
#   device run: carry [".data"], command "TRAIN_MIN=6 bash benchmarks/gpu_check.sh"
# Finishes in about TRAIN_MIN + 4 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
TRAIN_MIN=${TRAIN_MIN:-6}
BENCH_S=${BENCH_S:-300}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
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

if [ "$TRAIN_MIN" != 0 ]; then  # TRAIN_MIN=0: benchmark only (max-minutes 0 would mean "no budget")
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

if [ "$DEVICE" = cuda ]; then
  python3 -m benchmarks.gpu_torch --out "$OUT/gpu_torch.json" --budget-s "$BENCH_S" ${BENCH_EXTRA:-}
fi
date -u
