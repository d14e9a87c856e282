"""``solarjax bench latency``: prefill / decode latency and memory across presets, DUS and weight formats."""

from __future__ import annotations

import argparse
import json
import sys

from solarjax.commands._flags import add_json, add_progress, print_json


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure inference latency and memory (prefill, decode, peak) across presets",
        description="Benchmarks that run inside solarjax. 'latency' times random-weight presets.",
    )
    sub = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    p = sub.add_parser(
        "latency",
        help="prefill ms at several prompt lengths, decode ms/token and peak memory per preset",
        description="For each preset (random weights) and its SOLAR-style up-scaled version (m = n // 4), in each "
        "weight format: prefill ms at each prompt length (batch 1), decode ms/token (generate's compiled loop) "
        "and XLA's peak memory. Prints a markdown table and one JSON line per row; --out DIR also writes "
        "latency.md, latency.jsonl and latency.png. On CPU the defaults take long (1B-class models in fp32): "
        "start with --presets smollm2_135m --lengths 128,512.",
    )
    p.add_argument("--presets", type=_names, default=["smollm2_135m", "tinyllama_1_1b", "geb_1_3b"],
                   help="comma-separated config presets (default: smollm2_135m,tinyllama_1_1b,geb_1_3b)")
    p.add_argument("--formats", type=_names, default=["float32", "bfloat16", "int8"],
                   help="comma-separated weight formats: float32, bfloat16, int8 (default: all)")
    p.add_argument("--lengths", type=_ints, default=[128, 512, 2048], help="prefill prompt lengths (default "
                   "128,512,2048); decode runs after the first")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per decode measurement (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-cpp", type=_names, default=[], metavar="TYPES",
                   help="also time llama.cpp (llama-cpp-python) on the same weights exported to GGUF at these "
                   "types, e.g. f32,q8_0 (CPU; default: none)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: the CPUs this process may use)")
    p.add_argument("--no-upscale", action="store_true", help="base models only (skip the up-scaled versions)")
    p.add_argument("--tiny", action="store_true", help="shrink every preset to 4 layers, d_model 64, vocab 256 (a "
                   "smoke test that runs in seconds)")
    p.add_argument("--out", help="directory for latency.md, latency.jsonl and latency.png (must not exist, or "
                   "pass --overwrite for one solarjax wrote)")
    p.add_argument("--overwrite", action="store_true")
    add_progress(p)
    add_json(p)
    p.set_defaults(func=run_latency)


def run_latency(args: argparse.Namespace) -> int:
    from solarjax import latency

    if args.repeats < 1:
        raise ValueError(f"--repeats must be a positive integer, got {args.repeats}")
    configs = None
    if args.tiny:
        configs = {}
        for name in args.presets:
            cfg = latency._preset(name)
            heads = 4
            configs[name] = cfg.replace(vocab_size=256, d_model=64, n_layers=4, n_heads=heads,
                                        n_kv_heads=min(cfg.n_kv_heads, heads) if heads % cfg.n_kv_heads == 0 else 1,
                                        ffn_dim=128, head_dim=16, sliding_window=None)
    check = None
    if args.out:  # refuse a bad destination before measuring anything
        from solarjax.outputs import check_destination

        check = check_destination(args.out, overwrite=args.overwrite)

    def show(row) -> None:  # each row as it is measured (with --json: only the final object)
        if not args.json:
            print(json.dumps(row.as_dict()), flush=True)

    rows = latency.latency_table(args.presets, args.formats, args.lengths, args.new_tokens,
                                 upscale=not args.no_upscale, repeats=args.repeats, configs=configs, on_row=show,
                                 llama_cpp=args.llama_cpp, threads=args.threads,
                                 progress=sys.stderr.isatty() and not args.no_progress)
    table = latency.markdown(rows)
    if args.json:
        print_json({"rows": [row.as_dict() for row in rows], "out": args.out})
    else:
        print(table)
    if check is not None:
        from solarjax.outputs import atomic_output_dir

        with atomic_output_dir(args.out, overwrite=args.overwrite, verb="bench latency") as tmp:
            (tmp / "latency.md").write_text(table + "\n")
            latency.write_jsonl(rows, tmp / "latency.jsonl")
            latency.plot(rows, tmp / "latency.png")
    return 0
