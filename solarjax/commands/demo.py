"""``solarjax demo``: the main job on an embedded default, no downloads, no flags."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo on embedded defaults (no download)",
        description="Build a small random Hugging Face Mistral model, import it, convert it to Orbax and back "
        "to Hugging Face, and report logit parity against transformers at every step.",
    )
    parser.add_argument("--out", default="runs/demo", help="where to write the report (default runs/demo)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import transformers

    from solarjax import ckpt, hf, model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, sliding_window=16, max_position_embeddings=256, tie_word_embeddings=False,
    )
    reference = transformers.MistralForCausalLM(config).eval()
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 48))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src, orbax_dir, back = Path(tmp) / "hf", Path(tmp) / "orbax", Path(tmp) / "hf_back"
        reference.save_pretrained(src, max_shard_size="200KB")
        cfg, params = hf.load_hf(src, progress=True)
        rows.append(("HF -> solarjax", np.abs(np.asarray(model.forward_jit(params, tokens, cfg)) - expected).max()))
        ckpt.save_params(orbax_dir, params, cfg)
        cfg2, params2 = ckpt.load_params(orbax_dir)
        rows.append(("Orbax round trip", np.abs(np.asarray(model.forward_jit(params2, tokens, cfg2)) - expected).max()))
        hf.save_hf(params2, cfg2, back, source_dir=src, max_shard_size="200KB", progress=True)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
        with torch.no_grad():
            rows.append(("solarjax -> HF (transformers)", np.abs(reloaded(torch.tensor(tokens)).logits.numpy() - expected).max()))
    lines = [
        f"# solarjax parity report\n\nModel: random MistralForCausalLM, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"GQA {cfg.n_heads}/{cfg.n_kv_heads}, sliding window {cfg.sliding_window}, {cfg.num_params():,} params; "
        f"tokens {tokens.shape} (longer than the window).\n",
        "| step | max abs logit error vs transformers |", "|---|---|",
        *[f"| {name} | {err:.2e} |" for name, err in rows],
    ]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    ok = all(err < 1e-4 for _, err in rows)
    print(f"parity {'OK' if ok else 'FAILED'}; report written to {out / 'report.md'}")
    return 0 if ok else 1
