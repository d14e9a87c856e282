"""``solarjax merge RECIPE --out OUT``: run a mergekit-style YAML recipe on local checkpoints."""

from __future__ import annotations

import argparse
import warnings

from solarjax.commands._flags import add_json, add_out, add_progress, paths, report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge checkpoints (linear, slerp, task_arithmetic, ties, dare_ties, dare_linear)",
        description="Merge models of one architecture (HF directories, solarjax Orbax checkpoints, training runs, "
        ".gguf files) "
        "with a mergekit-style YAML recipe: models: [{model: PATH, parameters: {weight: 0.5}}], "
        "merge_method, base_model, parameters, dtype. Streams one tensor at a time and writes an HF "
        "directory atomically. SOLAR 10.7B-Instruct is a linear 0.5/0.5 merge of two DPO models. "
        "Every number must be finite; slerp's t is in [0, 1], density in (0, 1], weights and lambda any "
        "finite value (negative subtracts a task vector); YAML aliases may share values but not expand past "
        "100000 nodes.",
    )
    p.add_argument("recipe", help="YAML recipe (mergekit's 'models' form)")
    add_out(p, "output directory ('merge RECIPE OUT', positional, still works)", alias="out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if solarjax wrote it (never an input or a directory holding other files)")
    p.add_argument("--seed", type=int, default=0, help="random seed for DARE (default 0)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf",
                   help="output as an HF safetensors directory (default) or a solarjax Orbax checkpoint")
    add_progress(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.merge import merge_checkpoints

    paths(args)
    # recipe warnings (e.g. a parameter the method ignores) as one line, not a source excerpt
    warnings.formatwarning = lambda message, *_, **__: f"solarjax merge: warning: {message}\n"

    out = merge_checkpoints(args.recipe, args.out, overwrite=args.overwrite, seed=args.seed,
                            max_shard_size=args.max_shard_size, progress=not args.no_progress, out_format=args.format)
    report(args, {"recipe": str(args.recipe), "out": str(out)}, f"wrote {out}")
    return 0
