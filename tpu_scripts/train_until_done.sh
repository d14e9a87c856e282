#!/usr/bin/env bash
# Keep one training run going through preemptions: relaunch it, re-creating a preempted spot or
# queued slice, until it completes. solarjax checkpoints the step it is in on SIGTERM and running
# the same command again resumes from there, so a relaunch loses no step.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE ACCELERATOR_TYPE=TYPE RUN_NAME=RUN [PROJECT=P] $(basename "$0") [-h] [OVERRIDE ...]

Runs train.sh in the foreground (same RUN_NAME, same OVERRIDEs) until the run completes:
  exit 0                the run is complete (a run resumed at its last step exits 0 at once): stop
  preempted             solarjax wrote 'stopped by SIGTERM' (exit 143; a spot reclaim, maintenance,
                        stop.sh), or the slice is no longer ACTIVE/READY: re-create the slice when it
                        is gone (delete.sh, create.sh, setup.sh), wait RETRY_WAIT and relaunch
  anything else         a real failure (config, data, divergence): stop with that status
Checkpoints must outlive a VM: put train.out_dir / checkpoint.dir on gs://... or a gcsfuse mount.

  MAX_RESTARTS  relaunches before giving up (default 20)
  RETRY_WAIT    seconds before a relaunch (default 60)
  SPOT, QUEUED, NUM_SLICES, RUNTIME_VERSION, JAX_SPEC ...  as create.sh / setup.sh read them
  DRY_RUN=1     print the gcloud commands of one pass only"

want_help "$@"
require TPU_NAME ZONE ACCELERATOR_TYPE RUN_NAME

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
RETRY_WAIT="${RETRY_WAIT:-60}"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ && "$RETRY_WAIT" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS and RETRY_WAIT must be whole numbers"

# ACTIVE (queued resource) / READY (TPU VM) when the slice can run; anything else (PREEMPTED,
# SUSPENDED, FAILED, missing) means it must be re-created.
slice_state() {
  if [[ "${LOCAL_WORKERS:-0}" == "1" ]]; then echo ACTIVE; return; fi
  scope_flags
  if [[ "$DRY_RUN" == "1" ]]; then
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${SCOPE[@]}" --format="value(state.state)" >&2
    echo ACTIVE
  elif [[ "$QUEUED" == "1" ]]; then
    gcloud compute tpus queued-resources describe "$TPU_NAME" "${SCOPE[@]}" --format="value(state.state)" 2>/dev/null || echo MISSING
  else
    gcloud compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE[@]}" --format="value(state)" 2>/dev/null || echo MISSING
  fi
}

slice_up() { [[ "$1" == "ACTIVE" || "$1" == "READY" ]]; }

# Did the run on worker 0 stop on a preemption notice (solarjax's own last words)?
was_preempted() {
  ssh_one "tail -n 20 $(quote "$WORKDIR/logs/$RUN_NAME.log") 2>/dev/null | grep -q 'solarjax: stopped by SIG'" 2>/dev/null
}

restarts=0
while :; do
  state="$(slice_state)"
  if ! slice_up "$state"; then
    echo "slice $TPU_NAME is ${state:-MISSING}: re-creating it"
    "$HERE/delete.sh" || true
    "$HERE/create.sh"
    "$HERE/setup.sh"
  fi
  status=0
  FOREGROUND=1 "$HERE/train.sh" "$@" || status=$?
  if ((status == 0)); then
    echo "run $RUN_NAME complete"
    exit 0
  fi
  state="$(slice_state)"
  # 143: solarjax stopped on SIGTERM; 255: ssh lost the VM (it may still read ACTIVE for a moment)
  if slice_up "$state" && ((status != 143 && status != 255)) && ! was_preempted; then
    echo "$(basename "$0"): run $RUN_NAME failed (exit $status) on a healthy slice; not relaunching" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  if ((restarts > MAX_RESTARTS)); then
    die "run $RUN_NAME was preempted $restarts times; giving up (MAX_RESTARTS=$MAX_RESTARTS)"
  fi
  echo "run $RUN_NAME preempted (exit $status, slice $state); relaunch $restarts of $MAX_RESTARTS in ${RETRY_WAIT}s"
  sleep "$RETRY_WAIT"
done
