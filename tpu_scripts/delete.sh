#!/usr/bin/env bash
# Tear down the TPU (queued resource with its nodes, or a plain TPU VM). Billing stops here.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=P] $(basename "$0") [-h]

  QUEUED=1  (default) delete the queued resource and every node in it (--force)
  QUEUED=0  delete a TPU VM made by 'tpu-vm create'
  DRY_RUN=1 print the gcloud commands only

Everything under \$WORKDIR on the workers is lost; copy checkpoints to GCS first."

want_help "$@"
(($# == 0)) || usage_exit 2
require TPU_NAME ZONE

scope_flags
if [[ "$QUEUED" == "1" ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}" --quiet
fi
