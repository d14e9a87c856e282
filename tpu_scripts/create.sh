#!/usr/bin/env bash
# Create a TPU VM slice (or a multislice) for solarjax: a queued resource by default.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE ACCELERATOR_TYPE=TYPE [PROJECT=P] $(basename "$0") [-h]

Creates the TPU and (with WAIT=1, the default) waits until it is ready.

  QUEUED=1        (default) gcloud compute tpus queued-resources create; the request waits for
                  capacity instead of failing. QUEUED=0: gcloud compute tpus tpu-vm create.
  NUM_SLICES=N    N>1: a multislice queued resource, nodes \$TPU_NAME-0 .. \$TPU_NAME-(N-1)
  SPOT=1          spot capacity (cheaper, preemptible); RESERVED=1: use a reservation
  RUNTIME_VERSION TPU software image (default from ACCELERATOR_TYPE: v2-alpha-tpuv5 for v5p, ...)
  WAIT=0          return as soon as the request is accepted
  WAIT_TIMEOUT    seconds to wait for ACTIVE/READY (default 3600)
  DRY_RUN=1       print the gcloud commands only

examples:
  TPU_NAME=solar ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 $(basename "$0")
  TPU_NAME=solar ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 NUM_SLICES=2 SPOT=1 $(basename "$0")"

want_help "$@"
(($# == 0)) || usage_exit 2
require TPU_NAME ZONE ACCELERATOR_TYPE

VERSION="$(runtime_version)"
scope_flags
CAPACITY=()
[[ "${SPOT:-0}" == "1" ]] && CAPACITY+=(--spot)
[[ "${RESERVED:-0}" == "1" ]] && CAPACITY+=(--reserved)

if [[ "$QUEUED" == "1" ]]; then
  if ((NUM_SLICES > 1)); then
    TARGET=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
  else
    TARGET=(--node-id="$TPU_NAME")
  fi
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" "${TARGET[@]}" "${CAPACITY[@]}"
else
  ((NUM_SLICES == 1)) || die "multislice (NUM_SLICES=$NUM_SLICES) needs a queued resource; unset QUEUED"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" "${CAPACITY[@]}"
fi

[[ "${WAIT:-1}" == "1" && "$QUEUED" == "1" ]] || exit 0

# A queued resource goes WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE (or FAILED/SUSPENDED).
DESCRIBE=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${SCOPE[@]}" --format="value(state.state)")
if [[ "$DRY_RUN" == "1" ]]; then
  run "${DESCRIBE[@]}"
  exit 0
fi
deadline=$((SECONDS + ${WAIT_TIMEOUT:-3600}))
while :; do
  state="$("${DESCRIBE[@]}")"
  echo "queued resource $TPU_NAME: $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state; see: ${DESCRIBE[*]% --format=*}" ;;
  esac
  ((SECONDS < deadline)) || die "still $state after ${WAIT_TIMEOUT:-3600}s (the request stays queued; rerun with WAIT=1 later)"
  sleep 30
done
