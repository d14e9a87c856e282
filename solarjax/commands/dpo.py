"""``solarjax dpo --data FILE [--init MODEL] [--out RUN] [--config.key=value ...]``: preference tuning with DPO."""

from __future__ import annotations

import argparse

from solarjax.commands._flags import (add_training, check_export, claim_out_dir, export_gguf, export_hf, report,
                                      resolved_config, training_config)


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
    add_training(p, "dpo_tiny", data_help="preference pairs: JSONL/Parquet files, globs or directories "
                 "(comma-separated)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad pairs (missing fields, empty answers, too long) and report how many, instead "
                   "of stopping at the first")
    p.add_argument("--reference", help="reference model (any model path, like --init); sets dpo.reference "
                   "(default: the --init model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.dpo import add_dpo_config, run_dpo

    from solarjax.train import model_from_init

    config = training_config(args, add_dpo_config)
    model_from_init(config)  # the --init model's shape, so --print-config shows what runs
    if args.skip_bad:
        config.dpo.skip_bad = True
    if args.reference:
        config.dpo.reference = args.reference
    if args.print_config:
        print(resolved_config(config))
        return 0
    check_export(args, config)
    claim_out_dir(config, "dpo")
    summary = run_dpo(config)
    summary["hf_export"] = export_hf(args, config, "dpo")
    summary["gguf_export"] = export_gguf(args, config, "dpo")
    final = summary["final_loss"]
    report(args, {k: summary[k] for k in ("steps", "final_loss", "final_reward_accuracy", "checkpoint_dir", "hf_export")},
           f"dpo: {summary['steps']} steps" + (f", final loss {final:.4f}, reward accuracy "
                                               f"{summary['final_reward_accuracy']:.3f}" if final is not None else "")
           + (f"\ncheckpoints in {summary['checkpoint_dir']}" if summary["checkpoint_dir"] else "")
           + (f"\nHF export in {summary['hf_export']}" if summary["hf_export"] else ""))
    return 0
