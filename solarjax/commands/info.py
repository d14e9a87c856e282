"""``solarjax info``: what a checkpoint is, read from its config without loading the weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show architecture, layers, parameter count and dtype of a checkpoint",
        description="Describe an HF directory, a solarjax Orbax checkpoint or a config preset name.",
    )
    parser.add_argument("path", help="HF model directory, Orbax checkpoint directory, or preset name (e.g. solar_10_7b)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def describe(path: str):
    """``(format, ModelConfig)`` for a checkpoint directory or preset name."""
    from solarjax import ckpt, config, hf

    p = Path(path)
    if (p / "config.json").is_file():
        raw = hf.read_hf_config(p)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return "huggingface", hf.config_from_hf(raw, param_dtype=dtype)
    if (p / ckpt.CONFIG_ITEM).is_dir():
        return "orbax", ckpt.read_config(p)
    if p.exists():
        raise ValueError(f"{path} is neither an HF model directory (config.json) nor a solarjax Orbax checkpoint")
    return "preset", config.preset(path)


def run(args: argparse.Namespace) -> int:
    fmt, cfg = describe(args.path)
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
        print(json.dumps(facts))
    else:
        width = max(map(len, facts))
        for key, value in facts.items():
            shown = f"{value:,} ({value / 1e9:.2f}B)" if key == "params" else value
            print(f"{key:<{width}}  {shown}")
    return 0
