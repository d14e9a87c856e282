"""``solarjax sft --data FILE [--init MODEL] [--out RUN] [--config.key=value ...]``: supervised fine-tuning."""

from __future__ import annotations

import argparse

from solarjax.commands._flags import (add_training, check_export, claim_out_dir, export_gguf, export_hf, report,
                                      resolved_config, training_config)

DATA_HELP = "training data: JSONL/Parquet files, globs or directories (comma-separated)"


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
    add_training(p, "sft_tiny", data_help=DATA_HELP)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad records (missing fields, empty responses, prompts longer than seq_len) "
                   "and report how many, instead of stopping at the first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.sft import add_sft_config, run_sft

    from solarjax.train import model_from_init

    config = training_config(args, add_sft_config)
    model_from_init(config)  # the --init model's shape, so --print-config shows what runs
    if args.skip_bad:
        config.sft.skip_bad = True
    if args.print_config:
        print(resolved_config(config))
        return 0
    check_export(args, config)
    claim_out_dir(config, "sft")
    summary = run_sft(config)
    summary["hf_export"] = export_hf(args, config, "sft")
    summary["gguf_export"] = export_gguf(args, config, "sft")
    final = summary["final_loss"]
    report(args, {k: summary[k] for k in ("steps", "final_loss", "checkpoint_dir", "hf_export")},
           f"sft: {summary['steps']} steps" + (f", final loss {final:.4f}" if final is not None else "")
           + (f"\ncheckpoints in {summary['checkpoint_dir']}" if summary["checkpoint_dir"] else "")
           + (f"\nHF export in {summary['hf_export']}" if summary["hf_export"] else ""))
    return 0
