#!/usr/bin/env bash
# The GPU measurements, one prepared run per lent machine (see bench/README-style notes in the
# README's Performance section). Usage: OUT=dir bash bench/gpu_run.sh PART   (PART: 1 or 2)
# Every figure goes to $OUT/*.jsonl as it is produced, so a timeout keeps what finished.
set -u
part=${1:-1}
out=${OUT:?set OUT to a directory}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
py=python3
tiny="--preset tinyllama_1_1b --steps 5"
if [ "$part" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
  $py -c "import jax, torch, transformers; print(jax.__version__, torch.__version__, transformers.__version__)" >> "$out/gpu.txt" 2>&1
  timeout 100 $py bench/attention_check.py > "$out/attention_check.jsonl" 2> "$out/attention_check.err"
  timeout 120 $py bench/train_step.py $tiny --batch 4 --seq 2048 --segments none --peers "" --timeout 110 >> "$out/train.jsonl" 2>> "$out/train.err"
  timeout 330 $py bench/train_step.py $tiny --batch 4 --seq 2048 --peers compile,eager --timeout 150 >> "$out/train.jsonl" 2>> "$out/train.err"
  timeout 260 $py bench/train_step.py $tiny --batch 8 --seq 2048 --peers compile --timeout 150 >> "$out/train.jsonl" 2>> "$out/train.err"
  timeout 260 $py bench/train_step.py $tiny --batch 1 --seq 8192 --peers compile --timeout 150 >> "$out/train.jsonl" 2>> "$out/train.err"
else
  for remat in full save_qkv_attn dots_with_no_batch_dims; do
    timeout 100 $py bench/train_step.py $tiny --batch 4 --seq 2048 --remat $remat --peers "" --timeout 95 >> "$out/remat.jsonl" 2>> "$out/remat.err"
  done
  gen=$(sed -n 's/^ *GPU: *//p' bench/generate.py | head -1)
  if [ -n "$gen" ]; then
    timeout 260 bash -c "$gen" > "$out/generate.jsonl" 2> "$out/generate.err"
  fi
fi
echo done >> "$out/done.txt"
