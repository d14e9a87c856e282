#!/usr/bin/env bash
# Launch `solarjax train` on every worker of every slice at once (one JAX process per host).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE ACCELERATOR_TYPE=TYPE [PROJECT=P] $(basename "$0") [-h] [OVERRIDE ...]

Runs, on all workers (gcloud ... ssh --worker=all), in \$WORKDIR/src:
  solarjax train --config \$CONFIG [--config.distributed.enabled=True] OVERRIDE ...
detached (nohup), logging to \$WORKDIR/logs/\$RUN_NAME.log on each worker. Every worker must run
the same command: JAX's multi-controller model starts one process per host, and
jax.distributed.initialize() finds the coordinator from the TPU metadata by itself.

  CONFIG      preset name or path on the workers (default configs/solar_10_7b.py)
  RUN_NAME    log/pid name (default train-YYYYmmdd-HHMMSS)
  DISTRIBUTED auto (default: on when the slice has more than one host or NUM_SLICES>1), 1 or 0
  FOREGROUND=1  stay attached and stream every worker's output (small runs, debugging)
  FORWARD_ENV names of local variables to export on the workers
              (default: LIBTPU_INIT_ARGS XLA_FLAGS JAX_COMPILATION_CACHE_DIR TPU_STDERR_LOG_LEVEL)
  DRY_RUN=1   print the gcloud commands only

OVERRIDEs are config keys as solarjax.config.apply_overrides reads them, e.g.
  --config.train.steps=20000 --config.train.batch_size=128 --config.mesh.fsdp=64 --config.mesh.data=1
  --config.init.source=/tmp/solarjax/models/solar-dus --config.data.source='/tmp/solarjax/data/*.jsonl'

example:
  TPU_NAME=solar ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 $(basename "$0") --config.train.steps=100"

want_help "$@"
require TPU_NAME ZONE ACCELERATOR_TYPE

CONFIG="${CONFIG:-configs/solar_10_7b.py}"
RUN_NAME="${RUN_NAME:-train-$(date +%Y%m%d-%H%M%S)}"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME='$RUN_NAME' may only hold letters, digits, '.', '_' and '-'"
DISTRIBUTED="${DISTRIBUTED:-auto}"
FORWARD_ENV="${FORWARD_ENV:-LIBTPU_INIT_ARGS XLA_FLAGS JAX_COMPILATION_CACHE_DIR TPU_STDERR_LOG_LEVEL}"

args=(train --config "$CONFIG")
case "$DISTRIBUTED" in
  auto) if multi_host; then args+=(--config.distributed.enabled=True); fi ;;
  1) args+=(--config.distributed.enabled=True) ;;
  0) ;;
  *) die "DISTRIBUTED must be auto, 1 or 0, got '$DISTRIBUTED'" ;;
esac
args+=("$@")

exports=""
read -r -a forward <<<"$FORWARD_ENV"
for name in "${forward[@]}"; do
  if [[ -n "${!name:-}" ]]; then
    exports+="export $name=$(quote "${!name}")"$'\n'
  fi
done

log="$WORKDIR/logs/$RUN_NAME.log"
pid="$WORKDIR/logs/$RUN_NAME.pid"
cmd="$(quote "$WORKDIR/venv/bin/solarjax" "${args[@]}")"
if [[ "${FOREGROUND:-0}" == "1" ]]; then
  launch="$cmd 2>&1 | tee $(quote "$log")"
else
  launch="setsid nohup $cmd > $(quote "$log") 2>&1 < /dev/null &
echo \$! > $(quote "$pid")
echo \"\$(hostname): started pid \$(cat $(quote "$pid")), log $log\""
fi
remote="set -euo pipefail
mkdir -p $(quote "$WORKDIR/logs")
cd $(quote "$WORKDIR/src") 2>/dev/null || cd $(quote "$WORKDIR")
if [ -f $(quote "$pid") ] && kill -0 \"\$(cat $(quote "$pid"))\" 2>/dev/null; then
  echo \"\$(hostname): run $RUN_NAME is already running\" >&2; exit 1
fi
${exports}$launch"

ssh_all "$remote"
if [[ "${FOREGROUND:-0}" != "1" ]]; then
  echo "launched $RUN_NAME; follow it with: RUN_NAME=$RUN_NAME $(dirname "$0")/logs.sh"
fi
