#!/usr/bin/env bash
# Install JAX for TPU and solarjax on every worker of every slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="usage: TPU_NAME=NAME ZONE=ZONE [PROJECT=P] $(basename "$0") [-h]

On every worker: a Python venv in \$WORKDIR/venv (default /tmp/solarjax/venv; uv provides the
Python, since JAX needs a newer one than Ubuntu 22.04's 3.10), then pip install \"jax[tpu]\" and
solarjax. By default this checkout is packed (tracked + untracked, not ignored files), copied to
\$WORKDIR/src on every worker and installed editable there, so configs/ travels with it.

  SOLARJAX_SPEC   install this pip requirement instead of copying the checkout
                  (e.g. 'git+https://github.com/ORG/solarjax@v0.1.0'); configs then come from
                  --config paths you copy yourself
  JAX_SPEC        the JAX requirement (default 'jax[tpu]'; pin it, e.g. 'jax[tpu]==0.10.2')
  PYTHON_VERSION  venv Python (default 3.11)
  EXTRA_PIP       more requirements, space separated (e.g. 'huggingface_hub[cli]')
  ACCELERATOR_TYPE  when set, the smoke test also lists the TPU devices on every worker
  GCSFUSE=1       also install gcsfuse from Google's apt repository (for stage_data.sh MOUNT=1)
  DRY_RUN=1       print the commands only

example:
  TPU_NAME=solar ZONE=us-east5-a JAX_SPEC='jax[tpu]==0.10.2' $(basename "$0")"

want_help "$@"
(($# == 0)) || usage_exit 2
require TPU_NAME ZONE

JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$WORKDIR/venv"

if [[ -z "${SOLARJAX_SPEC:-}" ]]; then
  tarball="${TMPDIR:-/tmp}/solarjax-src.tar.gz"
  # Everything git would commit (tracked and untracked-but-not-ignored files), no .git, no runs/.
  run bash -c "git -C $(quote "$REPO") ls-files -z -co --exclude-standard \
| tar -czf $(quote "$tarball") -C $(quote "$REPO") --null --ignore-failed-read -T -"
  ssh_all "mkdir -p $(quote "$WORKDIR")"
  scp_all "$WORKDIR/" "$tarball"
  unpack="rm -rf $(quote "$WORKDIR/src") && mkdir -p $(quote "$WORKDIR/src") \
&& tar -xzf $(quote "$WORKDIR/solarjax-src.tar.gz") -C $(quote "$WORKDIR/src")"
  install_spec=(-e "$WORKDIR/src")
else
  unpack="true"
  install_spec=("$SOLARJAX_SPEC")
fi

# gcsfs: etils.epath's gs:// backend, so the trainer reads data and writes checkpoints on GCS directly
read -r -a extra <<<"gcsfs ${EXTRA_PIP:-}"
# The smoke test runs on all workers at once; a multi-host slice needs jax.distributed first.
check="import jax; print('jax', jax.__version__)"
if [[ -n "${ACCELERATOR_TYPE:-}" ]]; then
  init=""
  multi_host && init="jax.distributed.initialize(); "
  check="import jax; ${init}print('process', jax.process_index(), 'of', jax.process_count(), jax.local_device_count(), 'local devices', jax.devices()[0].device_kind)"
fi
gcsfuse="true"
if [[ "${GCSFUSE:-0}" == "1" ]]; then
  # shellcheck disable=SC2016  # expanded on the worker, not here
  gcsfuse='command -v gcsfuse >/dev/null || {
repo="gcsfuse-$(lsb_release -c -s)"
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt $repo main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
}'
fi
remote="set -euo pipefail
mkdir -p $(quote "$WORKDIR/logs")
$unpack
$gcsfuse
command -v uv >/dev/null || python3 -m pip install --user --quiet uv
export PATH=\"\$HOME/.local/bin:\$PATH\"
[ -x $(quote "$VENV/bin/python") ] || uv venv --python $(quote "$PYTHON_VERSION") $(quote "$VENV")
uv pip install --python $(quote "$VENV/bin/python") $(quote "$JAX_SPEC" "${install_spec[@]}" "${extra[@]}")
$(quote "$VENV/bin/python") -c $(quote "$check")"
ssh_all "$remote"
echo "installed solarjax on every worker of $TPU_NAME (venv $VENV)"
