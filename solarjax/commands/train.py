"""``solarjax train``: sharded (continued) pretraining from a config file plus ``--config.key=value`` overrides."""

from __future__ import annotations

import argparse

from solarjax.cli import accept_config_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="continued pretraining on a device mesh (data/fsdp/tensor), with Orbax checkpoints",
        description="Train (or resume) a model as configured: mesh, data, optimizer, checkpoints, init "
        "(random, an HF dir or an Orbax checkpoint, optionally depth up-scaled by init.upscale). Override "
        "any config field with --config.section.key=value, e.g. --config.train.steps=20 "
        "--config.mesh.fsdp=4 --config.init.upscale=solar:m=8.",
    )
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py) or preset name")
    parser.add_argument("--out", default=None, help="run directory for metrics, tokenizer and checkpoints "
                        "(default: config train.out_dir, else runs/<config name>)")
    accept_config_overrides(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from solarjax.config import apply_overrides, load_config

    config = load_config(args.config)
    apply_overrides(config, args.overrides)
    if args.out:
        config.train.out_dir = args.out
    elif not config.train.out_dir:
        config.train.out_dir = str(Path("runs") / Path(args.config).stem)

    claim_out_dir(config, "train")
    from solarjax.train import train

    summary = train(config)
    shown = {k: summary[k] for k in ("steps", "final_loss", "final_eval_loss", "tokens_per_s", "mfu", "checkpoint_dir")}
    shown["eval"] = summary["eval"]
    print(json.dumps(shown))
    return 0


def claim_out_dir(config, verb: str) -> None:
    """Apply the ownership rule to ``train.out_dir`` (``solarjax.outputs.claim_run_dir``) before any
    work: never a data/init/tokenizer/reference source or a directory around one, never cwd, home
    or an existing directory solarjax did not create; a marked run directory is resumed."""
    from solarjax.outputs import claim_run_dir, source_paths

    if not config.train.out_dir:
        return
    specs = [config.data.source, config.data.get("eval_source"), config.data.get("tokenizer"), config.init.source]
    if "dpo" in config:
        specs.append(config.dpo.get("reference"))
    claim_run_dir(config.train.out_dir, verb=verb, sources=source_paths(*specs))
