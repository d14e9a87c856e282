"""``solarjax dpo --config CONFIG --data FILE [--config.key=value ...]``: preference tuning with DPO."""

from __future__ import annotations

import argparse

from solarjax.commands.sft import add_common_arguments, resolve_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "dpo",
        help="direct preference optimisation against a frozen reference (the SFT start)",
        description="Align a model with DPO as SOLAR 10.7B-Instruct was: {prompt, chosen, rejected} records "
        "(strings or chat message lists) from JSONL/Parquet, rendered like 'solarjax sft'; the reference is "
        "the starting model (or dpo.reference), frozen and sharded like the policy. dpo.loss_type=sigmoid "
        "(with dpo.beta and dpo.label_smoothing) or ipo. train.batch_size counts pairs. Logs loss, reward "
        "accuracy and margins; same mesh, optimizer, checkpoints and resume as 'solarjax train'.",
    )
    add_common_arguments(p, "dpo_tiny")
    p.add_argument("--reference", help="reference model (HF dir or Orbax params checkpoint); sets dpo.reference "
                   "(default: the --init model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.dpo import add_dpo_config, run_dpo

    config = resolve_config(args, "dpo", add_dpo_config)
    if args.reference:
        config.dpo.reference = args.reference
    if args.print_config:
        print(config)
        return 0
    from solarjax.commands.train import claim_out_dir

    claim_out_dir(config, "dpo")
    summary = run_dpo(config)
    if summary["final_loss"] is not None:
        print(f"dpo: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"reward accuracy {summary['final_reward_accuracy']:.3f}")
    if summary["checkpoint_dir"]:
        print(f"checkpoints in {summary['checkpoint_dir']}")
    return 0
