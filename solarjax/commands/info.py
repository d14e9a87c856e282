"""``solarjax info``: what a checkpoint is, read from its config without loading the weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from solarjax.commands._flags import add_json, add_model, paths, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show architecture, layers, parameter count and dtype of a checkpoint",
        description="Describe an HF directory, a .gguf file, a solarjax Orbax checkpoint, a training run "
        "(its latest checkpoint), a config file or a preset name.",
    )
    add_model(parser, "model path (HF dir, .gguf, Orbax checkpoint, training run), config .py file, or preset "
              "name (e.g. solar_10_7b); 'solarjax info PATH' (positional) still works", alias="path")
    add_json(parser)
    parser.set_defaults(func=run)


def describe(path: str):
    """``(format, ModelConfig)`` for a model path, a config file or a preset name."""
    from solarjax import config, loading

    p = Path(path)
    if p.suffix == ".py" or (not p.exists() and not p.suffix and len(p.parts) == 1):
        return "preset", config.preset(path)  # an unknown name lists the presets
    source = loading.detect(p)  # a missing path is reported as missing
    fmt = {"hf": "huggingface"}.get(source.kind, source.kind)
    cfg = loading.read_config(source)  # sizes beyond solarjax.config.SIZE_LIMITS are refused here
    loading.check_weights(source, cfg)  # and sizes the weights' headers do not hold, here
    return fmt + (f" (step {source.step}: {source.weights})" if source.kind == "run" else ""), cfg


def run(args: argparse.Namespace) -> int:
    fmt, cfg = describe(paths(args).model)
    facts = {
        "format": fmt,
        "architecture": cfg.arch,
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_heads} query / {cfg.n_kv_heads} kv x {cfg.head_dim}",
        "ffn_dim": cfg.ffn_dim,
        "vocab": cfg.vocab_size,
        "sliding_window": cfg.sliding_window,
        "tied_embeddings": cfg.tie_embeddings,
        "params": cfg.num_params(),
        "param_dtype": cfg.param_dtype,
    }
    if args.json:
        print_json(facts)
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            shown = f"{value:,} ({value / 1e9:.2f}B)" if key == "params" else value
            print(f"{key:<{width}}  {shown}")
    return 0
