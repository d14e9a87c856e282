"""``solarjax sft --config CONFIG --data FILE [--config.key=value ...]``: supervised fine-tuning."""

from __future__ import annotations

import argparse

from solarjax.cli import accept_config_overrides

def add_common_arguments(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config,
                   help=f"config preset name in configs/ or a .py file (default {default_config})")
    p.add_argument("--data", help="training data: JSONL/Parquet files, globs or directories (comma-separated); "
                   "sets data.source")
    p.add_argument("--eval-data", help="held-out data of the same format; sets data.eval_source")
    p.add_argument("--init", help="start from this HF directory or Orbax params checkpoint; sets init.source")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the one in --init); "
                   "sets data.tokenizer")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl); sets train.out_dir")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad records (missing fields, empty responses, prompts longer than seq_len) "
                   "and report how many, instead of stopping at the first")
    p.add_argument("--steps", type=int, help="sets train.steps")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    accept_config_overrides(p)


def resolve_config(args: argparse.Namespace, section: str, add_section):
    """The preset with its extra section, the flag shortcuts, then the ``--config.*`` overrides."""
    from solarjax.config import apply_overrides, load_config

    config = load_config(args.config)
    add_section(config)
    shortcuts = {"data.source": args.data, "data.eval_source": args.eval_data, "init.source": args.init,
                 "data.tokenizer": args.tokenizer, "train.out_dir": args.out, "train.steps": args.steps}
    for key, value in shortcuts.items():
        if value is not None:
            group, name = key.split(".")
            config[group][name] = value
    if args.skip_bad:
        config[section].skip_bad = True
    apply_overrides(config, args.overrides)
    return config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on instruction data (loss on responses only)",
        description="Instruction-tune a model as SOLAR 10.7B-Instruct was: Alpaca records "
        "{instruction, input, output} or chats {messages: [{role, content}, ...]} from JSONL/Parquet, "
        "rendered with the Alpaca prompt or the tokenizer's chat template (sft.template=auto|alpaca|chat), "
        "loss on the response tokens only, several examples packed per row. Same mesh, optimizer, "
        "checkpoints and resume as 'solarjax train'; any config key can be set with --config.KEY=VALUE.",
    )
    add_common_arguments(p, "sft_tiny")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.sft import add_sft_config, run_sft

    config = resolve_config(args, "sft", add_sft_config)
    if args.print_config:
        print(config)
        return 0
    from solarjax.commands.train import claim_out_dir

    claim_out_dir(config, "sft")
    summary = run_sft(config)
    final = summary["final_loss"]
    print(f"sft: {summary['steps']} steps, final loss {final:.4f}" if final is not None else
          f"sft: {summary['steps']} steps")
    if summary["checkpoint_dir"]:
        print(f"checkpoints in {summary['checkpoint_dir']}")
    return 0
