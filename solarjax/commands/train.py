"""``solarjax train``: sharded (continued) pretraining from a config file plus ``--config.key=value`` overrides."""

from __future__ import annotations

import argparse


class _OverrideParser(argparse.ArgumentParser):
    """Collects ml_collections-style ``--config.a.b=value`` flags, which argparse cannot declare."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(args or [])
        overrides = [a.removeprefix("--config.") for a in args if a.startswith("--config.")]
        namespace, extra = super().parse_known_args([a for a in args if not a.startswith("--config.")], namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, extra


def register(subparsers: argparse._SubParsersAction) -> None:
    default_class, subparsers._parser_class = subparsers._parser_class, _OverrideParser
    try:
        parser = subparsers.add_parser(
            "train",
            help="continued pretraining on a device mesh (data/fsdp/tensor), with Orbax checkpoints",
            description="Train (or resume) a model as configured: mesh, data, optimizer, checkpoints, init "
            "(random, an HF dir or an Orbax checkpoint, optionally depth up-scaled by init.upscale). Override "
            "any config field with --config.section.key=value, e.g. --config.train.steps=20 "
            "--config.mesh.fsdp=4 --config.init.upscale=solar:m=8.",
        )
    finally:
        subparsers._parser_class = default_class
    parser.add_argument("--config", required=True, help="config file (configs/<name>.py) or preset name")
    parser.add_argument("--out", default=None, help="run directory for metrics, tokenizer and checkpoints "
                        "(default: config train.out_dir, else runs/<config name>)")
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

    from solarjax.train import train

    summary = train(config)
    shown = {k: summary[k] for k in ("steps", "final_loss", "final_eval_loss", "tokens_per_s", "mfu", "checkpoint_dir")}
    shown["eval"] = summary["eval"]
    print(json.dumps(shown))
    return 0
