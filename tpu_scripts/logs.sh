#!/usr/bin/env bash
# Tail a training log on one worker (or print the last lines from all workers).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE RUN_NAME=RUN [PROJECT=P] $(basename "$0") [-h]

  WORKER=N     which worker to follow (default 0: process 0 prints the progress bar and evals)
  WORKER=all   print the last TAIL_LINES lines of every worker's log once (no following)
  TAIL_LINES=N lines of history (default 100)
  FOLLOW=0     print and exit instead of following
  DRY_RUN=1    print the gcloud commands only"

want_help "$@"
(($# == 0)) || usage_exit 2
require TPU_NAME ZONE RUN_NAME

WORKER="${WORKER:-0}"
TAIL_LINES="${TAIL_LINES:-100}"
[[ "$TAIL_LINES" =~ ^[0-9]+$ ]] || die "TAIL_LINES must be a number, got '$TAIL_LINES'"
log="$(quote "$WORKDIR/logs/$RUN_NAME.log")"

if [[ "$WORKER" == "all" ]]; then
  ssh_all "echo \"== \$(hostname)\"; tail -n $TAIL_LINES $log"
elif [[ "${FOLLOW:-1}" == "1" ]]; then
  ssh_one "tail -n $TAIL_LINES -F $log" "$WORKER"
else
  ssh_one "tail -n $TAIL_LINES $log" "$WORKER"
fi
