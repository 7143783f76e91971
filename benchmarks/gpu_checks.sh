#!/usr/bin/env bash
# Every GPU figure and a CUDA end-to-end check, in one short run (about 8 minutes of device time,
# compiling included; a lent GPU is precious: run it once, read everything from the log).
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]        # DEVICE=cpu QUICK=1 for a dry run on a CPU
#
# 1. extraction, DToP hybrid, 1024 px, 3 scales, bf16: FLOPs per image, the model alone's TFLOP/s
#    and % of the device's bf16 peak (target >= 40 %), files / model alone (target >= 0.95), the
#    implied R1M time, the attention kernel at every scale (never math), batch fill, host waits;
# 2. the same model alone with torch.compile (dynamic shapes): compile time apart, TFLOP/s;
# 3. training step: DToP vs CLS at 512 px, bf16, images/s and peak memory with/without checkpointing;
# 4. forward: DToP vs the bare timm backbone at 1024x768;
# 5. end to end on CUDA: built-in data → `dtop train` (bf16) → `dtop evaluate`.
set -u
OUT=${1:-runs/gpu_checks}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ "$QUICK" = 1 ]; then
  MODEL=dtop_tiny; BASE=cls_tiny; N=8; N_COMPILE=2; BATCH_E=4; BATCH_T=4; WORKERS=2; SIZE_E=256; AMP=none
else
  MODEL=dtop_hybrid; BASE=cls_hybrid; N=384; N_COMPILE=32; BATCH_E=16; BATCH_T=32; WORKERS=12; SIZE_E=1024; AMP=bf16
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import sys, torch, timm; print('python', sys.version.split()[0], 'torch', torch.__version__, 'timm', timm.__version__)"

echo "== 1. extraction: FLOP utilisation, files vs model alone"
timeout 200 $PY benchmarks/bench_extract.py --model $MODEL --images $N --image-size $SIZE_E --batch $BATCH_E \
  --workers $WORKERS --device $DEVICE --amp $AMP --repeats 2

echo "== 2. extraction, model alone, torch.compile"
timeout 150 $PY benchmarks/bench_extract.py --model $MODEL --images $N_COMPILE --image-size $SIZE_E \
  --batch $BATCH_E --device $DEVICE --amp $AMP --repeats 2 --compile --no-files

echo "== 3. training step"
timeout 120 $PY benchmarks/bench_train_step.py --model $MODEL --baseline $BASE --size 512x384 --batch $BATCH_T \
  --classes 81313 --device $DEVICE --amp $AMP --repeats 5 --checkpointing

echo "== 4. forward vs bare backbone"
timeout 60 $PY benchmarks/bench_forward.py --model $MODEL --sizes 1024x768 --batches 1 8 --repeats 5 \
  --device $DEVICE --dtype $([ $AMP = bf16 ] && echo bfloat16 || echo float32)

echo "== 5. end to end on $DEVICE"
W="$OUT/e2e"
$PY -c "from dtop.apps.synthetic import generate_benchmark as g; g('$W/data')" >/dev/null
timeout 90 $PY -m dtop.cli.main train --config configs/train/tiny.yaml data.root="$W/data/dtop-mini-train" \
  run.out="$W/train" run.device=$DEVICE optim.amp=$AMP run.max_steps=30 data.train_size=96 data.num_workers=4 \
  run.progress=false
timeout 90 $PY -m dtop.cli.main evaluate --model "$W/train/last.safetensors" dtop_tiny \
  --dataset "$W/data/dtop-mini" --image-size 96 --device $DEVICE --amp auto --out "$W/eval" --no-progress
ls "$W/eval"
