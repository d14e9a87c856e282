#!/usr/bin/env bash
# SOLAR-10.7B end to end on a TPU pod: Mistral-7B -> depth up-scaling (m=8) -> continued pretraining.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE DATA_GCS=gs://... [PROJECT=P] $(basename "$0") [-h] STEP...

STEPs, in order (or 'all'):
  create   create the TPU (create.sh; default ACCELERATOR_TYPE=v5p-128)
  setup    install JAX for TPU + solarjax on every worker (setup.sh)
  model    on every worker: fetch Mistral-7B (from BASE_GCS, else the Hugging Face Hub) and
           up-scale it: solarjax upscale BASE \$WORKDIR/models/solar-dus --m \$M --dtype bfloat16
  data     copy DATA_GCS (jsonl/parquet/txt files) to \$WORKDIR/data on every worker
  mount    mount CKPT_BUCKET at \$WORKDIR/gcs on every worker for checkpoints (needs gcsfuse)
  train    continued pretraining of the 48-layer model (train.sh), checkpoints under the mount
  delete   tear the TPU down (delete.sh)

  ACCELERATOR_TYPE  default v5p-128 (64 chips, 16 hosts)
  M               layers dropped at the seam (default 8: 2*(32-8) = 48 layers, 10.7B params)
  BASE_GCS        gs:// copy of mistralai/Mistral-7B-v0.1 (HF safetensors); default: Hub download
  BASE_REPO       Hub repo when BASE_GCS is unset (default mistralai/Mistral-7B-v0.1)
  DATA_GCS        corpus to continue pretraining on (required by 'data')
  CKPT_BUCKET     gs://bucket for checkpoints and logs (required by 'mount' and 'train')
  STEPS, BATCH, SEQ, LR, FSDP   training budget and mesh (defaults 20000, 128, 4096, 3e-5, 64)
  RUN_NAME        (default solar-dus-m\$M)
  DRY_RUN=1       print every gcloud command instead of running it

example (dry run of the whole recipe):
  DRY_RUN=1 TPU_NAME=solar ZONE=us-east5-a DATA_GCS=gs://b/corpus CKPT_BUCKET=gs://b $(basename "$0") all"

want_help "$@"
(($# >= 1)) || usage_exit 2
require TPU_NAME ZONE

export ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-128}"
M="${M:-8}"
BASE_REPO="${BASE_REPO:-mistralai/Mistral-7B-v0.1}"
STEPS="${STEPS:-20000}"
BATCH="${BATCH:-128}"
SEQ="${SEQ:-4096}"
LR="${LR:-3e-5}"
FSDP="${FSDP:-64}"
RUN_NAME="${RUN_NAME:-solar-dus-m$M}"
export RUN_NAME
HERE="$(dirname "${BASH_SOURCE[0]}")"
MODELS="$WORKDIR/models"
[[ "$M" =~ ^[0-9]+$ ]] || die "M must be a whole number, got '$M'"

step_model() {
  local fetch py="$WORKDIR/venv/bin/python"
  if [[ -n "${BASE_GCS:-}" ]]; then
    fetch="mkdir -p $(quote "$MODELS/mistral-7b") && gcloud storage cp -r $(quote "${BASE_GCS%/}/*" "$MODELS/mistral-7b/")"
  else
    fetch="$(quote "$py") -c $(quote "from huggingface_hub import snapshot_download as d; d('$BASE_REPO', local_dir='$MODELS/mistral-7b', allow_patterns=['*.json', '*.safetensors', 'tokenizer.model'])")"
  fi
  ssh_all "set -euo pipefail
[ -f $(quote "$MODELS/mistral-7b/config.json") ] || { $fetch; }
[ -f $(quote "$MODELS/solar-dus/config.json") ] || $(quote "$WORKDIR/venv/bin/solarjax") upscale \
$(quote "$MODELS/mistral-7b" "$MODELS/solar-dus") --m $M --dtype bfloat16 --no-progress
echo \"\$(hostname): \$(ls $(quote "$MODELS/solar-dus") | wc -l) files in $MODELS/solar-dus\""
}

step_train() {
  require CKPT_BUCKET
  local out="$WORKDIR/gcs/runs/$RUN_NAME"
  "$HERE/train.sh" \
    --config.init.source="$MODELS/solar-dus" \
    --config.data.source="$WORKDIR/data" \
    --config.train.steps="$STEPS" --config.train.batch_size="$BATCH" --config.train.seq_len="$SEQ" \
    --config.train.out_dir="$out" --config.checkpoint.dir="$out/checkpoints" --config.checkpoint.every=500 \
    --config.optim.lr="$LR" --config.optim.warmup_steps=200 --config.optim.schedule=cosine \
    --config.mesh.data=-1 --config.mesh.fsdp="$FSDP" --config.mesh.tensor=1
}

steps=("$@")
[[ "${steps[*]}" == "all" ]] && steps=(create setup model data mount train)
for step in "${steps[@]}"; do
  echo "== $step"
  case "$step" in
    create) "$HERE/create.sh" ;;
    setup) EXTRA_PIP="${EXTRA_PIP:-huggingface_hub}" GCSFUSE=1 "$HERE/setup.sh" ;;
    model) step_model ;;
    data) require DATA_GCS && "$HERE/stage_data.sh" "$DATA_GCS" "$WORKDIR/data" ;;
    mount) require CKPT_BUCKET && MOUNT=1 "$HERE/stage_data.sh" "$CKPT_BUCKET" "$WORKDIR/gcs" ;;
    train) step_train ;;
    delete) "$HERE/delete.sh" ;;
    *) die "unknown step '$step' (see --help)" ;;
  esac
done
