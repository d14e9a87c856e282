"""``solarjax convert``: move a model between Hugging Face, Orbax and GGUF formats."""

from __future__ import annotations

import argparse

from solarjax.commands._flags import add_json, add_model, add_out, add_progress, paths, report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints: hf-to-orbax, orbax-to-hf, gguf-to-hf, hf-to-gguf",
        description="Convert a checkpoint between formats. Writes are atomic: the output appears only "
        "when complete, and the source is never written to. --overwrite replaces only a directory solarjax "
        "wrote (never a source, a directory containing one, or one holding other files).",
    )
    kinds = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    to_orbax = kinds.add_parser("hf-to-orbax", help="HF directory (or any model: .gguf, training run) -> solarjax "
                                "Orbax params checkpoint")
    to_orbax.set_defaults(func=_hf_to_orbax)

    to_hf = kinds.add_parser("orbax-to-hf", help="solarjax Orbax params checkpoint or training run (its latest "
                             "checkpoint and tokenizer) -> HF directory transformers loads")
    to_hf.add_argument("--source-dir", help="HF directory to copy tokenizer files and extra config fields from "
                       "(default: the run's tokenizer, when there is one)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="split safetensors shards at this size (default 5GB)")
    to_hf.set_defaults(func=_orbax_to_hf)

    from_gguf = kinds.add_parser("gguf-to-hf", help="llama.cpp GGUF (Llama arch) -> HF directory, dequantized")
    from_gguf.set_defaults(func=_gguf_to_hf)

    to_gguf = kinds.add_parser("hf-to-gguf", help="any model (HF directory, .gguf, Orbax checkpoint, training run) "
                               "-> one llama.cpp GGUF file with its tokenizer and chat template")
    to_gguf.add_argument("--tokenizer", default=None, help="HF directory or tokenizer.json to take the tokenizer from "
                         "(default: the model's own)")
    to_gguf.set_defaults(func=_hf_to_gguf)

    for sub in (to_orbax, to_hf, from_gguf, to_gguf):  # 'convert DIRECTION SRC DST' (positional) still works
        add_model(sub, "source model", alias="src")
        out = "output .gguf file" if sub is to_gguf else "output directory"
        add_out(sub, f"{out} (must not exist unless --overwrite)", alias="dst")
        sub.add_argument("--dtype", default=None, help="GGUF type: f32 (default), f16, bf16, q8_0, q4_0, q4_1"
                         if sub is to_gguf else "cast weights, e.g. bfloat16 (default: keep; a GGUF dequantizes to "
                         "float32)")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace an existing output directory that solarjax wrote")
        add_progress(sub)
        add_json(sub)


def _paths(args: argparse.Namespace) -> argparse.Namespace:
    paths(args)
    args.src, args.dst = args.model, args.out
    return args


def _done(args: argparse.Namespace, cfg=None) -> None:
    facts = {"model": str(args.src), "out": str(args.dst)}
    if cfg is None:
        report(args, facts, f"wrote {args.dst}")
        return
    facts.update(arch=cfg.arch, layers=cfg.n_layers, params=cfg.num_params(), param_dtype=cfg.param_dtype)
    report(args, facts, f"wrote {args.dst}: {cfg.arch}, {cfg.n_layers} layers, {cfg.num_params():,} params, "
           f"{cfg.param_dtype}")


def _hf_to_orbax(args: argparse.Namespace) -> int:
    from solarjax import ckpt, loading
    from solarjax.outputs import check_destination

    _paths(args)
    source = loading.detect(args.src)  # a bad source is named first
    check_destination(args.dst, overwrite=args.overwrite, sources=(args.src,))  # before loading anything
    cfg, params, _ = loading.load(source, dtype=args.dtype, progress=not args.no_progress)
    ckpt.save_params(args.dst, params, cfg, overwrite=args.overwrite, sources=(args.src,), verb="convert hf-to-orbax",
                     beside=loading.tokenizer_copier(source))  # the whole tokenizer goes with the weights
    _done(args, cfg)
    return 0


def _orbax_to_hf(args: argparse.Namespace) -> int:
    from solarjax import hf, loading
    from solarjax.outputs import check_destination

    _paths(args)
    source = loading.detect(args.src)  # a bad source is named first
    source_dir = args.source_dir or source.tokenizer_dir
    sources = (args.src, source_dir)
    check_destination(args.dst, overwrite=args.overwrite, sources=sources)  # before loading anything
    cfg, params, _ = loading.load(source)
    hf.save_hf(params, cfg, args.dst, source_dir=source_dir, dtype=args.dtype, sources=sources,
               max_shard_size=args.max_shard_size, overwrite=args.overwrite, progress=not args.no_progress,
               verb="convert orbax-to-hf")
    _done(args, cfg)
    return 0


def _gguf_to_hf(args: argparse.Namespace) -> int:
    from solarjax import gguf

    _paths(args)
    gguf.gguf_to_hf(args.src, args.dst, overwrite=args.overwrite, dtype=args.dtype, progress=not args.no_progress)
    _done(args)
    return 0


def _hf_to_gguf(args: argparse.Namespace) -> int:
    from solarjax import gguf_export

    _paths(args)
    gguf_export.hf_to_gguf(args.src, args.dst, args.dtype, tokenizer=args.tokenizer, overwrite=args.overwrite,
                           progress=not args.no_progress)
    _done(args)
    return 0
