# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: settings from the environment, dry-run, gcloud wrappers.
#
# Settings (environment variables):
#   TPU_NAME          name of the TPU VM, or of the queued resource (required)
#   ZONE              e.g. us-east5-a (required)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  e.g. v5p-128, v4-32, v5litepod-16, v6e-64 (required by create.sh and train.sh)
#   RUNTIME_VERSION   TPU software version (default: from ACCELERATOR_TYPE, see runtime_version)
#   NUM_SLICES        >1 provisions a multislice queued resource with nodes TPU_NAME-0..N-1 (default 1)
#   QUEUED            1: queued resource (default), 0: plain `tpu-vm create`
#   WORKDIR           where everything lives on the workers (default /tmp/solarjax)
#   DRY_RUN           1: print the commands instead of running them
#   LOCAL_WORKERS     1: run the worker-side commands in a local bash instead of over ssh (for
#                     testing the scripts end to end without a TPU; see check.sh)

set -euo pipefail

NUM_SLICES="${NUM_SLICES:-1}"
QUEUED="${QUEUED:-1}"
WORKDIR="${WORKDIR:-/tmp/solarjax}"
DRY_RUN="${DRY_RUN:-0}"
PROJECT="${PROJECT:-}"

die() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# Print a usage text (from the calling script) and exit; status 0 for -h/--help, 2 otherwise.
usage_exit() {
  printf '%s\n' "$USAGE"
  exit "${1:-2}"
}

want_help() {
  local arg
  for arg in "$@"; do
    [[ "$arg" == "-h" || "$arg" == "--help" ]] && usage_exit 0
  done
  return 0
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || { printf '%s: error: set %s\n\n' "$(basename "$0")" "$name" >&2; usage_exit 2; }
  done
}

# Run a command, or print it shell-quoted when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Flags every gcloud TPU command takes.
scope_flags() {
  SCOPE=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    SCOPE+=(--project="$PROJECT")
  fi
}

# The TPU software image that matches an accelerator generation (Cloud TPU's documented defaults).
runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    printf '%s\n' "$RUNTIME_VERSION"
    return
  fi
  case "${ACCELERATOR_TYPE:-}" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "cannot pick a runtime version for ACCELERATOR_TYPE='${ACCELERATOR_TYPE:-}'; set RUNTIME_VERSION" ;;
  esac
}

# Is one slice of ACCELERATOR_TYPE more than one host? (v2-v5p count TensorCores, v5e/v6e chips;
# either way a single host holds at most 8.)
multi_host() {
  local n="${ACCELERATOR_TYPE##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot read the size of ACCELERATOR_TYPE='${ACCELERATOR_TYPE:-}'"
  ((n > 8 || NUM_SLICES > 1))
}

# The TPU VM node names: one per slice.
nodes() {
  if ((NUM_SLICES > 1)); then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do
      printf '%s-%d\n' "$TPU_NAME" "$i"
    done
  else
    printf '%s\n' "$TPU_NAME"
  fi
}

# Run a shell command string on every worker of every slice (slices in parallel).
ssh_all() {
  local remote="$1" node pids=()
  if [[ "${LOCAL_WORKERS:-0}" == "1" ]]; then
    run bash -c "$remote"
    return
  fi
  scope_flags
  while read -r node; do
    if [[ "$DRY_RUN" == "1" ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" "${SCOPE[@]}" --worker=all --command="$remote"
    else
      run gcloud compute tpus tpu-vm ssh "$node" "${SCOPE[@]}" --worker=all --command="$remote" &
      pids+=("$!")
    fi
  done < <(nodes)
  local pid status=0
  for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
  done
  return "$status"
}

# Run a shell command string on one worker (default worker 0 of the first slice).
ssh_one() {
  local remote="$1" worker="${2:-0}" node
  if [[ "${LOCAL_WORKERS:-0}" == "1" ]]; then
    run bash -c "$remote"
    return
  fi
  scope_flags
  node="$(nodes | head -n 1)"
  run gcloud compute tpus tpu-vm ssh "$node" "${SCOPE[@]}" --worker="$worker" --command="$remote"
}

# Copy local files to the same directory on every worker.
scp_all() {
  local dest="$1" node
  shift
  if [[ "${LOCAL_WORKERS:-0}" == "1" ]]; then
    run cp "$@" "$dest"
    return
  fi
  scope_flags
  while read -r node; do
    run gcloud compute tpus tpu-vm scp "$@" "$node:$dest" "${SCOPE[@]}" --worker=all
  done < <(nodes)
}

# Quote words for a remote shell.
quote() {
  local out="" word
  for word in "$@"; do
    out+="$(printf '%q' "$word") "
  done
  printf '%s' "${out% }"
}
