#!/usr/bin/env bash
# Put data (or a model) on every worker at the same local path: copy from GCS, or mount a bucket.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=P] $(basename "$0") [-h] SRC DEST

  SRC   gs://bucket/path (copied with 'gcloud storage cp -r'; wildcards allowed), or with
        MOUNT=1 a bucket name (gs://bucket) to mount
  DEST  absolute directory on the workers, the same on all of them, e.g. /tmp/solarjax/data

solarjax reads local paths, so every worker needs the files at the same place: a copy for the
training corpus and the initial model (read once, fast), a gcsfuse mount for checkpoints (written
by all hosts, must outlive the TPU). MOUNT=1 needs gcsfuse on the workers (see README).

  MOUNT=1    mount the bucket at DEST with gcsfuse instead of copying
  DRY_RUN=1  print the gcloud commands only

examples:
  $(basename "$0") gs://my-bucket/corpus/ /tmp/solarjax/data
  MOUNT=1 $(basename "$0") gs://my-bucket /tmp/solarjax/gcs"

want_help "$@"
(($# == 2)) || usage_exit 2
require TPU_NAME ZONE
SRC="$1"
DEST="$2"
[[ "$SRC" == gs://* ]] || die "SRC must be a gs:// URL, got '$SRC'"
[[ "$DEST" == /* ]] || die "DEST must be an absolute path on the workers, got '$DEST'"

if [[ "${MOUNT:-0}" == "1" ]]; then
  bucket="${SRC#gs://}"
  bucket="${bucket%%/*}"
  [[ -n "$bucket" ]] || die "no bucket name in '$SRC'"
  ssh_all "set -euo pipefail
command -v gcsfuse >/dev/null || { echo \"\$(hostname): gcsfuse is not installed (see tpu_scripts/README.md)\" >&2; exit 1; }
mkdir -p $(quote "$DEST")
mountpoint -q $(quote "$DEST") || gcsfuse --implicit-dirs $(quote "$bucket" "$DEST")"
else
  ssh_all "set -euo pipefail
mkdir -p $(quote "$DEST")
gcloud storage cp -r $(quote "$SRC" "$DEST")"
fi
