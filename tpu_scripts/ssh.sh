#!/usr/bin/env bash
# Run one shell command on every worker of every slice (or one worker), in $WORKDIR/src.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=P] $(basename "$0") [-h] COMMAND

The venv's bin directory is first on PATH, so 'solarjax ...' and 'python ...' are the installed ones.

  WORKER=N   only worker N of the first slice (default: all workers of all slices)
  DRY_RUN=1  print the gcloud commands only

examples:
  $(basename "$0") 'solarjax info configs/solar_10_7b.py'
  WORKER=0 $(basename "$0") 'df -h /tmp; free -g'"

want_help "$@"
(($# == 1)) || usage_exit 2
require TPU_NAME ZONE

remote="export PATH=$(quote "$WORKDIR/venv/bin"):\"\$PATH\"
cd $(quote "$WORKDIR/src") 2>/dev/null || cd
$1"
if [[ -n "${WORKER:-}" ]]; then
  ssh_one "$remote" "$WORKER"
else
  ssh_all "$remote"
fi
