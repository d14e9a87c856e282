#!/usr/bin/env bash
# Stop a run started by train.sh on every worker (by the pid it recorded), freeing the TPU chips.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE RUN_NAME=RUN [PROJECT=P] $(basename "$0") [-h]

Sends SIGTERM to the process group train.sh started on each worker (its pid file is
\$WORKDIR/logs/\$RUN_NAME.pid), then SIGKILL after GRACE seconds (default 30) if it is still there.
A TPU held by a stale process fails the next run with 'TPU in use'; this is the fix.

  DRY_RUN=1  print the gcloud commands only"

want_help "$@"
(($# == 0)) || usage_exit 2
require TPU_NAME ZONE RUN_NAME

GRACE="${GRACE:-30}"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "GRACE must be a number of seconds, got '$GRACE'"
pid="$(quote "$WORKDIR/logs/$RUN_NAME.pid")"
ssh_all "if [ ! -f $pid ]; then echo \"\$(hostname): no $RUN_NAME running\"; exit 0; fi
p=\"\$(cat $pid)\"
kill -TERM -- \"-\$p\" 2>/dev/null || true
for _ in \$(seq $GRACE); do kill -0 \"\$p\" 2>/dev/null || break; sleep 1; done
kill -KILL -- \"-\$p\" 2>/dev/null || true
rm -f $pid
echo \"\$(hostname): stopped $RUN_NAME (pid \$p)\""
