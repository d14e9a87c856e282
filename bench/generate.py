"""Generation latency: solarjax KV-cache decode vs transformers ``generate``, side by side.

    python bench/generate.py [--prompt-len 512] [--new-tokens 64] [--dtype float32|bfloat16]

Builds one random model of SmolLM2-135M shape (or ``--shape tiny``), saves it as an HF directory,
then measures each framework in its own subprocess (so peak memory is each one's own) and prints
one JSON line per figure: prefill ms (a one-token ``generate``, batch 1, prompt-len tokens),
decode ms/token and peak memory, with ``ratio = transformers / ours`` (above 1: we are faster or
leaner). Both sides are timed through their public ``generate``. Peak memory is device memory
on a GPU and the process's peak RSS on CPU. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}


def build_model(path: str, shape: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2))
    model.save_pretrained(path)


def _measure(generate_n, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill ms, decode ms/token) from back-to-back ``generate`` calls of 1 and N new tokens.

    Prefill is the best time of a one-token generate; decode is the median over repeats of
    (time(N) - time(1)) / (N - 1), pairing the two calls so that load from other processes on a
    shared machine hits both halves of each estimate alike.
    """
    generate_n(1), generate_n(new_tokens)  # compile / warm up
    firsts, per_token = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generate_n(1)
        middle = time.perf_counter()
        generate_n(new_tokens)
        end = time.perf_counter()
        firsts.append(middle - start)
        per_token.append(((end - middle) - (middle - start)) / (new_tokens - 1))
    return min(firsts) * 1e3, statistics.median(per_token) * 1e3


def bench_ours(path: str, prompt_len: int, new_tokens: int, dtype: str, repeats: int) -> dict:
    import jax
    import numpy as np

    from solarjax import generate as G

    cfg, params, _ = G.load_model(path, dtype=dtype)
    cfg = cfg.replace(dtype=dtype)
    prompt = [np.random.default_rng(0).integers(3, cfg.vocab_size, prompt_len).tolist()]
    # generate() returns host lists, so each call is synchronous
    prefill_ms, decode_ms = _measure(lambda n: G.generate(params, cfg, prompt, max_new_tokens=n), new_tokens, repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "peak_memory_mb": peak / 2**20,
            "device": device.device_kind}


def bench_transformers(path: str, prompt_len: int, new_tokens: int, dtype: str, repeats: int,
                       threads: int | None = None) -> dict:
    import numpy as np
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(dev).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(3, model.config.vocab_size, (1, prompt_len)), device=dev)

    @torch.no_grad()
    def generate_n(n: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prefill_ms, decode_ms = _measure(generate_n, new_tokens, repeats)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "peak_memory_mb": peak / 2**20,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (on a shared CPU, 1 avoids "
                        "spin-waiting slowdowns; default: torch's own)")
    parser.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one framework, one JSON object
        common = (args.model_dir, args.prompt_len, args.new_tokens, args.dtype, args.repeats)
        result = bench_ours(*common) if args.side == "ours" else bench_transformers(*common, args.torch_threads)
        print(json.dumps(result))
        return
    if args.dtype is None:
        import torch

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp, args.shape)
        results = {}
        for side in ("ours", "transformers"):
            cmd = [sys.executable, __file__, "--side", side, "--model-dir", tmp, "--prompt-len", str(args.prompt_len),
                   "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--repeats", str(args.repeats),
                   *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
            results[side] = json.loads(out.strip().splitlines()[-1])
    common = {"shape": args.shape, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "dtype": args.dtype, "device": results["ours"]["device"], "torch_threads": args.torch_threads}
    for figure in ("prefill_ms", "decode_ms_per_token", "peak_memory_mb"):
        ours, theirs = results["ours"][figure], results["transformers"][figure]
        print(json.dumps({"figure": figure, "ours": round(ours, 3), "transformers": round(theirs, 3),
                          "ratio": round(theirs / ours, 3), **common}))


if __name__ == "__main__":
    main()
