"""The TPU launch scripts: check.sh's self-test, and the commands their dry runs print, decoded by
bash into argument lists: the exact gcloud arguments, and the ``solarjax`` command a worker would
run, parsed by solarjax's own CLI (and its config overrides applied), so a script that passes a
flag or config key solarjax does not take fails here, without a TPU."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
CHECK = SCRIPTS / "check.sh"
SCOPE = ["--zone=us-east5-a", "--project=my-proj"]
ENV = {"DRY_RUN": "1", "TPU_NAME": "solar", "ZONE": "us-east5-a", "PROJECT": "my-proj", "ACCELERATOR_TYPE": "v5p-128"}
# Each printed "+ cmd" line (printf %q quoting) evaluated by bash into its words, NUL-separated.
DECODE = 'while IFS= read -r line; do [[ $line == "+ "* ]] || continue; eval "a=(${line#+ })"; ' \
         'printf "%s\\0" "${a[@]}"; printf "\\1\\0"; done'

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")


def test_tpu_scripts_self_check_passes():
    result = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAIL" not in result.stdout + result.stderr and "all tpu_scripts checks passed" in result.stdout


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands ``script`` would run, each as its argument list."""
    run_env = {k: v for k, v in os.environ.items() if k not in ("NUM_SLICES", "QUEUED", "RUN_NAME", "LOCAL_WORKERS")}
    out = subprocess.run([str(SCRIPTS / script), *args], env={**run_env, **ENV, **env}, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    words = subprocess.run(["bash", "-c", DECODE], input=out, capture_output=True, text=True, check=True).stdout
    commands, current = [], []
    for word in words.split("\0")[:-1]:
        if word == "\1":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return commands


def worker_solarjax(command: list[str], verb: str) -> list[str]:
    """The ``solarjax VERB ...`` argv inside a ``gcloud ... ssh --command=SCRIPT`` (before any redirection)."""
    script = next(a for a in command if a.startswith("--command=")).removeprefix("--command=")
    marker = f"/venv/bin/solarjax {verb} "
    line = next(line for line in script.splitlines() if marker in line)
    words = shlex.split(line.split(marker, 1)[1])
    end = next((i for i, w in enumerate(words) if w in (">", "|", "&&", "||")), len(words))
    return [verb, *words[:end]]


def test_create_and_delete_gcloud_arguments():
    create, describe = dry_run("create.sh")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "solar", *SCOPE,
                      "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--node-id=solar"]
    assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "solar", *SCOPE,
                        "--format=value(state.state)"]
    (multi, _) = dry_run("create.sh", NUM_SLICES="2", SPOT="1")
    assert {"--node-count=2", "--node-prefix=solar", "--spot"} <= set(multi) and "--node-id=solar" not in multi
    assert dry_run("delete.sh") == [["gcloud", "compute", "tpus", "queued-resources", "delete", "solar", *SCOPE,
                                     "--force", "--quiet"]]


@pytest.mark.parametrize("slices", [1, 2])
def test_train_runs_what_solarjax_train_accepts(slices):
    from solarjax.cli import build_parser
    from solarjax.commands._flags import training_config

    commands = dry_run("train.sh", "--config.train.steps=7", "--config.mesh.fsdp=8", NUM_SLICES=str(slices))
    assert len(commands) == slices
    for i, command in enumerate(commands):
        node = "solar" if slices == 1 else f"solar-{i}"
        assert command[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *SCOPE[:1]]
        assert "--worker=all" in command
        argv = worker_solarjax(command, "train")
        config = training_config(build_parser().parse_args(argv))
        assert (config.train.steps, config.mesh.fsdp, config.distributed.enabled) == (7, 8, True)
    single = worker_solarjax(dry_run("train.sh", ACCELERATOR_TYPE="v5p-8")[0], "train")
    assert not training_config(build_parser().parse_args(single)).distributed.enabled


def test_solar_recipe_upscales_and_trains_with_its_settings():
    """The recipe's upscale and train commands, as solarjax's parsers read them: m=8, the 48-layer model as
    the init source, the documented budget and mesh."""
    from solarjax.cli import build_parser
    from solarjax.commands._flags import training_config

    commands = dry_run("solar_recipe.sh", "all", DATA_GCS="gs://b/corpus", CKPT_BUCKET="gs://b")
    upscale = build_parser().parse_args(next(worker_solarjax(c, "upscale") for c in commands
                                             if "solarjax upscale " in " ".join(c)))
    models = "/tmp/solarjax/models"
    assert (upscale.m, upscale.dtype, upscale.plan) == (8, "bfloat16", None)
    assert [str(v) for v in vars(upscale).values() if str(v).startswith(models)] == [f"{models}/mistral-7b",
                                                                                      f"{models}/solar-dus"]
    train = next(worker_solarjax(c, "train") for c in commands if "solarjax train " in " ".join(c))
    config = training_config(build_parser().parse_args(train))
    assert config.init.source == f"{models}/solar-dus" and config.data.source == "/tmp/solarjax/data"
    assert (config.train.steps, config.train.batch_size, config.train.seq_len) == (20000, 128, 4096)
    assert (config.optim.lr, config.mesh.fsdp, config.checkpoint.every) == (3e-5, 64, 500)
    assert config.model.n_layers == 48  # configs/solar_10_7b.py: the up-scaled shape
    copy = next(c for c in commands if "scp" in c)
    assert copy[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/solarjax-src.tar.gz"]
