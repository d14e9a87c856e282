#!/usr/bin/env bash
# The GPU measurements behind the GPU figures in docs/performance.md, as one prepared run on a lent machine.
#   OUT=dir bash bench/gpu_run.sh A    # attention check, train step vs torch.compile, remat
#   OUT=dir bash bench/gpu_run.sh B    # generation latency, eager peer, plain causal kernel
# Every figure goes to $OUT/*.jsonl as soon as it exists, so a timeout keeps what finished.
# BENCH_SHAPE overrides the model (e.g. "--preset tiny --steps 1" for a CPU smoke run).
set -u
part=${1:-A}
out=${OUT:?set OUT to a directory}
if [ -d .whl ]; then  # packages the device lacks (ml_collections), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
py=python3
shape=${BENCH_SHAPE:-"--preset tinyllama_1_1b --steps 5"}
train() { timeout "$1" $py bench/train_step.py $shape "${@:3}" >> "$out/$2.jsonl" 2>> "$out/$2.err"; }
if [ "$part" = A ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
  $py -c "import jax, torch, transformers; print(jax.__version__, torch.__version__, transformers.__version__)" >> "$out/gpu.txt" 2>&1
  timeout 80 $py bench/attention_check.py > "$out/attention_check.jsonl" 2> "$out/attention_check.err"
  train 200 train --batch 4 --seq 2048 --peers compile --timeout 120
  train 170 train --batch 8 --seq 2048 --peers compile --timeout 110
  train 170 train --batch 1 --seq 8192 --peers compile --timeout 110
  for remat in full save_qkv_attn; do
    train 60 remat --batch 4 --seq 2048 --remat $remat --peers "" --timeout 55
  done
else
  gen=$(sed -n 's/^GPU: *//p' bench/generate.py | head -1)
  [ -n "$gen" ] && timeout 200 bash -c "$gen" > "$out/generate.jsonl" 2> "$out/generate.err"
  train 120 train --batch 4 --seq 2048 --peers eager --segments none --timeout 100
  train 60 remat --batch 4 --seq 2048 --remat dots_with_no_batch_dims --peers "" --timeout 55
fi
echo "part $part done" >> "$out/done.txt"
