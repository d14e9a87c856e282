"""``solarjax eval``: perplexity on a text file, offline MMLU, or the lm-eval harness."""

from __future__ import annotations

import argparse
import json

from solarjax.commands._flags import (NO_LIMIT_HELP, add_json, add_model, add_progress, add_tokenizer, limit,
                                      loading_progress, print_json)


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_tokenizer(p)
    p.add_argument("--dtype", help="param dtype to load as, e.g. bfloat16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization on load (per-output-"
                   "channel scales; dequantized inside the layer loop)")
    add_json(p)
    add_progress(p)


def _load(args: argparse.Namespace):
    """``(cfg, params, tokenizer)`` from ``--model/--tokenizer/--dtype``; scoring text needs a tokenizer."""
    from solarjax.generate import load_model, require_tokenizer

    from solarjax.eval import check_positive

    check_positive(batch_size=args.batch_size)
    cfg, params, tokenizer = load_model(args.model, args.tokenizer, dtype=args.dtype, progress=loading_progress(args))
    require_tokenizer(tokenizer, args.model)
    if args.quantize:
        from solarjax.quant import quantize_params

        params = quantize_params(params, bits=int(args.quantize[3:]))
    return cfg, params, tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model: perplexity, offline MMLU, or lm-eval-harness tasks",
        description="Evaluate a model. 'ppl' scores a text or JSONL file with a sliding window; 'mmlu' "
        "runs the MMLU questions that ship inside lm-eval (no download); 'lm-eval' runs harness tasks.",
    )
    sub = parser.add_subparsers(dest="eval_kind", metavar="KIND", required=True)

    p = sub.add_parser("ppl", help="token-level perplexity of text, JSONL or Parquet documents")
    _model_args(p)
    p.add_argument("--data", required=True, help=".txt/.md (one document each), .jsonl (field --field per line) "
                   "or .parquet; files, globs or directories, comma-separated")
    p.add_argument("--field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--window", type=int, help="tokens per window (default: min(max_seq_len, 1024))")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: window / 2)")
    p.set_defaults(func=run_ppl)

    p = sub.add_parser("mmlu", help="MMLU dev questions shipped in lm-eval, scored by log-likelihood")
    _model_args(p)
    p.add_argument("--subjects", help="comma-separated subjects (default: all 57)")
    p.add_argument("--limit", type=int, default=0,
                   help=f"at most this many questions, spread over subjects ({NO_LIMIT_HELP})")
    p.add_argument("--shots", type=int, default=0, help="solved same-subject examples before each question")
    p.set_defaults(func=run_mmlu)

    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks through the solarjax model class")
    _model_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, default=0, help=f"examples per task, or a fraction below 1 ({NO_LIMIT_HELP})")
    p.add_argument("--include-path", help="directory of extra task YAMLs (e.g. local data)")
    p.add_argument("--out", "--output", dest="out", help="write the full results JSON to this file (--output: "
                   "deprecated spelling)")
    p.set_defaults(func=run_lm_eval)


def run_ppl(args: argparse.Namespace) -> int:
    from solarjax.data import read_documents
    from solarjax.eval import check_positive, text_perplexity

    check_positive(window=args.window, stride=args.stride)
    docs = read_documents(args.data, args.field, field_setting="--field")
    cfg, params, tokenizer = _load(args)
    result = text_perplexity(params, cfg, tokenizer, docs, window=args.window, stride=args.stride,
                             batch_size=args.batch_size, progress=not args.no_progress)
    if args.json:
        print_json(result.as_dict())
    else:
        print(f"perplexity {result.ppl:.4f} (loss {result.loss:.4f} nats/token) over {result.tokens} tokens "
              f"in {result.documents} document(s)")
    return 0


def run_mmlu(args: argparse.Namespace) -> int:
    from solarjax.eval import mmlu_accuracy

    questions = limit(args.limit, "--limit")
    if args.shots < 0:
        raise ValueError(f"--shots must be 0 or more, got {args.shots}")
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    cfg, params, tokenizer = _load(args)
    result = mmlu_accuracy(params, cfg, tokenizer, subjects, questions, shots=args.shots,
                           batch_size=args.batch_size, progress=not args.no_progress)
    if args.json:
        print_json(result.as_dict())
    else:
        print(f"MMLU accuracy {result.accuracy:.4f} ± {result.stderr:.4f} ({result.correct}/{result.total}, "
              f"{args.shots}-shot; chance 0.25)")
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # lm-eval installed without its dependencies
        raise ValueError(f"the lm-eval harness cannot run here ({err}); install lm-eval with its dependencies "
                         "(pip install lm-eval)") from err
    from solarjax.eval import check_positive
    from solarjax.lm_eval_adapter import SolarJaxLM

    check_positive(batch_size=args.batch_size)
    if args.limit < 0:
        raise ValueError(f"--limit must be 0 (no limit), a count, or a fraction below 1, got {args.limit}")
    model = SolarJaxLM(path=args.model, tokenizer=args.tokenizer, batch_size=args.batch_size, dtype=args.dtype,
                       quantize=args.quantize, progress=not args.no_progress)
    results = simple_evaluate(
        model=model, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit or None,
        task_manager=TaskManager(include_path=args.include_path) if args.include_path else None,
    )
    table = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
             for task, metrics in results["results"].items()}
    print_json(table, indent=None if args.json else 2)
    if args.out:
        from lm_eval.utils import handle_non_serializable

        from solarjax.outputs import replace_text

        replace_text(args.out, json.dumps(results, indent=2, default=handle_non_serializable))
    return 0
