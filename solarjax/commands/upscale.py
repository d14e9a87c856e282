"""``solarjax upscale SRC DST``: depth up-scale a checkpoint on disk (SOLAR DUS and friends).

HF directories are streamed tensor by tensor (out of core); Orbax params checkpoints and training
runs are restored, grown and saved as Orbax; a GGUF is dequantized, grown and written as an HF
directory. The plan is validated before anything is written, and the output directory appears
only when complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from solarjax.commands._flags import add_json, add_model, add_out, add_progress, paths, report

EPILOG = """plans (--plan; the trainer's init.upscale takes the same strings):
  solar:m=8                       SOLAR: [0, n-8) then [8, n)
  seam:first_end=24,second_start=8
  repeat:k=2                      the whole stack twice (= solar:m=0)
  middle:start=8,end=24           duplicate block [8, 24) in place (Yi-9B style)
  interleave:start=8,end=16,k=2   every layer of [8, 16) twice in place
  llama_pro:new=8                 LLaMA Pro identity blocks (zero o_proj/down_proj copies)
  0:24,8:32                       explicit half-open ranges; 0:8,7:8*0 scales a range's
                                  o_proj and down_proj (mergekit passthrough 'scale')
sparse upcycling (--upcycle, alone or after the plan; the output is a Mixtral):
  experts=8,k=2                   each MLP copied into 8 experts, top-2, renormalised
  ...,noise=0.01 | add_noise=0.01 multiplicative | additive Gaussian noise on the copies
  ...,reinit=0.5,router=0         re-draw half of each expert's hidden units; zero router
  a --plan may chain steps with '+': upcycle:experts=8,k=2+solar:m=8 (upcycle, then DUS)
examples:
  solarjax upscale mistral-7b solar-10.7b-init --m 8 --dtype bfloat16
  solarjax upscale ckpt/step_1000 grown --format orbax --plan llama_pro:new=8
  solarjax upscale SmolLM2-135M-Instruct.Q4_1.gguf smollm2-dus --m 7
  solarjax upscale --model smollm2-135m --out smollm2-moe --m 8 --upcycle experts=8,k=2
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
    add_model(p, "source model: HF directory, solarjax Orbax checkpoint, training run or .gguf", alias="src")
    add_out(p, "output directory (must not exist unless --overwrite)", alias="dst")
    which = p.add_mutually_exclusive_group()  # one of them, or only --upcycle
    which.add_argument("--m", type=int, help="SOLAR DUS: drop m layers on each side of the seam (paper: 8)")
    which.add_argument("--plan", help="a plan spec, e.g. '0:24,8:32' or 'solar:m=8' (see below)")
    which.add_argument("--method", choices=("llama-pro", "repeat"), help="a named operator (with --new-layers / --k)")
    p.add_argument("--upcycle", metavar="experts=E,k=K[,...]",
                   help="sparse upcycling after the plan (if any): each MLP copied into E experts, top-K; "
                   "writes a Mixtral (see below)")
    p.add_argument("--new-layers", type=int, help="llama-pro: number of identity blocks to insert")
    p.add_argument("--k", type=int, default=2, help="repeat: how many copies of the stack (default 2)")
    p.add_argument("--format", choices=("auto", "hf", "orbax", "gguf"), default="auto",
                   help="the source's format, checked against SRC (default: detected)")
    p.add_argument("--dtype", help="cast floating weights: float32, float16 or bfloat16 (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default 5GB; HF and GGUF sources)")
    p.add_argument("--allow-shallower", action="store_true",
                   help="write a plan whose model is no deeper than the source (e.g. --m of n/2 or more: SOLAR "
                   "keeps 2(n-m) layers); refused otherwise as a likely wrong m")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if solarjax wrote it (never a source or a directory holding other files)")
    add_progress(p)
    add_json(p)
    p.set_defaults(func=run)


def plan_spec(args: argparse.Namespace) -> str:
    """The plan (or growth) spec string the flags describe."""
    from solarjax.growth.plans import PlanError

    if getattr(args, "upcycle", None):
        upcycle = "upcycle:" + args.upcycle.removeprefix("upcycle:")
        if args.m is None and args.plan is None and args.method is None:
            return upcycle
        return plan_spec(argparse.Namespace(**{**vars(args), "upcycle": None})) + "+" + upcycle
    if args.m is None and args.plan is None and args.method is None:
        raise PlanError("say how to grow: --m, --plan, --method or --upcycle")
    if args.m is not None:
        return f"solar:m={args.m}"
    if args.plan is not None:
        return args.plan
    if args.method == "llama-pro":
        if args.new_layers is None:
            raise PlanError("--method llama-pro needs --new-layers N (the number of identity blocks)")
        return f"llama_pro:new={args.new_layers}"
    return f"repeat:k={args.k}"


def run(args: argparse.Namespace) -> int:
    from solarjax import growth, loading
    from solarjax.growth import dus, plans
    from solarjax.hf import CheckpointError, read_hf_config

    paths(args)
    args.src, args.dst = Path(args.model), Path(args.out)
    source = loading.detect(args.src)
    kind = "orbax" if source.kind == "run" else source.kind
    if args.format not in ("auto", kind):
        raise CheckpointError(f"{args.src} is a {source.description}, not {args.format}")
    spec = plan_spec(args)
    if source.kind != "hf" or len(growth.growth_steps(spec)) > 1 or growth.is_upcycle(spec):
        return _grow_in_memory(args, spec)
    # an HF source is streamed without being modelled, so any Llama-family config.json is fine
    n_src = read_hf_config(source.weights).get("num_hidden_layers")
    plan = plans.parse_plan_spec(spec, n_src)
    if not args.allow_shallower:
        plans.check_deeper(plan, n_src, spec)
    start = time.perf_counter()
    dus.upscale_hf(args.src, args.dst, plan, dtype=args.dtype, max_shard_size=args.max_shard_size,
                   overwrite=args.overwrite, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    n_out = len(plans.plan_layers(plan))
    report(args, {"model": str(args.src), "out": str(args.dst), "layers_in": n_src, "layers_out": n_out,
                  "plan": plans.format_plan(plan), "bytes": size, "seconds": seconds},
           f"{args.src} ({n_src} layers) -> {args.dst} ({n_out} layers), plan {plans.format_plan(plan)}: "
           f"{size / 1e9:.3f} GB in {seconds:.1f} s ({size / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return 0


def _grow_in_memory(args: argparse.Namespace, spec: str) -> int:
    """Grow in memory: GGUF, Orbax and run sources, and growth specs with sparse upcycling or several
    steps (load, grow, save: HF for HF/GGUF sources, an upcycled model as a Mixtral; else Orbax)."""
    from solarjax import growth

    start = time.perf_counter()
    cfg_in, cfg = growth.grow_loaded(args.src, args.dst, spec, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                      overwrite=args.overwrite, progress=not args.no_progress,
                                      allow_shallower=args.allow_shallower)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    report(args, {"model": str(args.src), "out": str(args.dst), "layers_in": cfg_in.n_layers,
                  "layers_out": cfg.n_layers, "plan": spec, "arch": cfg.arch, "experts": cfg.n_experts,
                  "experts_per_token": cfg.experts_per_token, "params": cfg.num_params(),
                  "active_params": cfg.num_params(active=True), "bytes": size, "seconds": seconds},
           f"{args.src} ({cfg_in.n_layers} layers, {cfg_in.num_params() / 1e6:.1f}M params) -> {args.dst} "
           f"({cfg.n_layers} layers, " + (f"{cfg.n_experts} experts top-{cfg.experts_per_token}, " if cfg.is_moe else "")
           + f"{cfg.num_params() / 1e6:.1f}M params, {cfg.num_params(active=True) / 1e6:.1f}M active), {spec}: "
           f"{size / 1e9:.3f} GB in {seconds:.1f} s")
    return 0
