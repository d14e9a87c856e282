"""``solarjax upscale SRC DST``: depth up-scale a checkpoint on disk (SOLAR DUS and friends).

HF directories are streamed tensor by tensor (out of core); Orbax params checkpoints are
restored, grown and saved. The plan is validated before anything is written, and the output
directory appears only when complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """plans (--plan; the trainer's init.upscale takes the same strings):
  solar:m=8                       SOLAR: [0, n-8) then [8, n)
  seam:first_end=24,second_start=8
  repeat:k=2                      the whole stack twice (= solar:m=0)
  middle:start=8,end=24           duplicate block [8, 24) in place (Yi-9B style)
  interleave:start=8,end=16,k=2   every layer of [8, 16) twice in place
  llama_pro:new=8                 LLaMA Pro identity blocks (zero o_proj/down_proj copies)
  0:24,8:32                       explicit half-open ranges; 0:8,7:8*0 scales a range's
                                  o_proj and down_proj (mergekit passthrough 'scale')
examples:
  solarjax upscale mistral-7b solar-10.7b-init --m 8 --dtype bfloat16
  solarjax upscale ckpt/step_1000 grown --format orbax --plan llama_pro:new=8
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale",
        help="depth up-scale a checkpoint (SOLAR DUS, repetition, LLaMA Pro, ...)",
        description="Grow a model's depth by slicing and concatenating its layer stack. HF checkpoints are "
        "streamed (memory stays about one tensor); the output directory is written atomically.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="source checkpoint directory (HF safetensors or solarjax Orbax)")
    p.add_argument("dst", type=Path, help="output directory (must not exist unless --overwrite)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--m", type=int, help="SOLAR DUS: drop m layers on each side of the seam (paper: 8)")
    which.add_argument("--plan", help="a plan spec, e.g. '0:24,8:32' or 'solar:m=8' (see below)")
    which.add_argument("--method", choices=("llama-pro", "repeat"), help="a named operator (with --new-layers / --k)")
    p.add_argument("--new-layers", type=int, help="llama-pro: number of identity blocks to insert")
    p.add_argument("--k", type=int, default=2, help="repeat: how many copies of the stack (default 2)")
    p.add_argument("--format", choices=("auto", "hf", "orbax"), default="auto",
                   help="checkpoint format (default: detect from SRC)")
    p.add_argument("--dtype", help="cast floating weights: float32, float16 or bfloat16 (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if solarjax wrote it (never a source or a directory holding other files)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def plan_spec(args: argparse.Namespace) -> str:
    """The plan spec string the flags describe."""
    from solarjax.dus import PlanError

    if args.m is not None:
        return f"solar:m={args.m}"
    if args.plan is not None:
        return args.plan
    if args.method == "llama-pro":
        if args.new_layers is None:
            raise PlanError("--method llama-pro needs --new-layers N (the number of identity blocks)")
        return f"llama_pro:new={args.new_layers}"
    return f"repeat:k={args.k}"


def detect_format(src: Path) -> str:
    from solarjax.hf import CheckpointError

    if (src / "config.json").is_file():
        return "hf"
    if (src / "model_config").is_dir():
        return "orbax"
    raise CheckpointError(f"{src} is neither an HF checkpoint (config.json) nor a solarjax Orbax checkpoint "
                          "(model_config/); pass --format if it is one")


def run(args: argparse.Namespace) -> int:
    import time

    from solarjax import dus

    if not args.src.is_dir():
        raise FileNotFoundError(f"source checkpoint {args.src} is not a directory")
    fmt = detect_format(args.src) if args.format == "auto" else args.format
    spec = plan_spec(args)
    start = time.perf_counter()
    if fmt == "hf":
        from solarjax.hf import read_hf_config

        n_src = read_hf_config(args.src).get("num_hidden_layers")
        plan = dus.parse_plan_spec(spec, n_src)
        dus.upscale_hf(args.src, args.dst, plan, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite, progress=not args.no_progress)
    else:
        from solarjax.ckpt import read_config

        n_src = read_config(args.src).n_layers
        plan = dus.parse_plan_spec(spec, n_src)
        dus.upscale_orbax(args.src, args.dst, plan, dtype=args.dtype and dus.canonical_dtype(args.dtype),
                          overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    print(f"{args.src} ({n_src} layers) -> {args.dst} ({len(dus.plan_layers(plan))} layers), plan "
          f"{dus.format_plan(plan)}: {size / 1e9:.3f} GB in {seconds:.1f} s "
          f"({size / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return 0
