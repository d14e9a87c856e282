"""Benchmark ``solarjax upscale --m M`` against mergekit's passthrough merge and a plain copy.

Writes a random bf16 checkpoint with Mistral-7B layer shapes (``--layers 32`` is the full
14.5 GB model; use fewer layers when disk is short), then for each tool prints wall time, peak
RSS of the child process and output bytes/s, and the ratio to ``cp`` of the output's bytes.

    python bench/upscale.py --layers 32 --m 8 --workdir /mnt/scratch
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MISTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128)


def write_checkpoint(path: Path, n_layers: int, shard_bytes: int = 2 << 30) -> int:
    """A MistralForCausalLM directory of random bf16 weights (one random block, reused)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    h, f, v, kv = MISTRAL["hidden_size"], MISTRAL["intermediate_size"], MISTRAL["vocab_size"], 8 * 128
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    block = (np.random.default_rng(0).standard_normal(f * h, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    path.mkdir(parents=True)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if current and size + 2 * n > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = np.resize(block, n).reshape(shape) if n > h else np.ones(shape, ml_dtypes.bfloat16)
        size += 2 * n
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in shard}
        total += sum(a.nbytes for a in shard.values())
        shard.clear()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
              "num_hidden_layers": n_layers, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, **MISTRAL}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a command, measured by GNU time (so this process's own
    memory never counts, as it would through fork in ``wait4``'s rusage)."""
    with tempfile.NamedTemporaryFile("r") as rss_file:
        start = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        return seconds, int(rss_file.read().split()[-1]) * 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="source layers (32 = Mistral 7B, 14.5 GB)")
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="upscale-bench-", dir=args.workdir))
    try:
        src = work / "src"
        t = time.perf_counter()
        size = write_checkpoint(src, args.layers)
        print(f"source: Mistral-7B layer shapes, {args.layers} layers, bf16, {size / 1e9:.2f} GB "
              f"(written in {time.perf_counter() - t:.0f} s) in {work}")
        n_out = 2 * (args.layers - args.m)
        results = {}
        secs, rss = timed([sys.executable, "-m", "solarjax.cli", "upscale", str(src), str(work / "ours"),
                           "--m", str(args.m), "--no-progress"])
        out_bytes = dir_bytes(work / "ours")
        results["solarjax upscale"] = (secs, rss)
        secs, rss = timed(["cp", "-r", str(work / "ours"), str(work / "copy")])
        results["cp -r (output size)"] = (secs, rss)
        shutil.rmtree(work / "copy")
        if not args.skip_mergekit:
            recipe = work / "recipe.yml"
            recipe.write_text(
                "slices:\n"
                f"  - sources:\n    - model: {src}\n      layer_range: [0, {args.layers - args.m}]\n"
                f"  - sources:\n    - model: {src}\n      layer_range: [{args.m}, {args.layers}]\n"
                "merge_method: passthrough\ndtype: bfloat16\n")
            shutil.rmtree(work / "ours")
            results["mergekit-yaml"] = timed(["mergekit-yaml", str(recipe), str(work / "mergekit"), "--clone-tensors",
                                              "--no-copy-tokenizer", "--quiet"])
        copy_s = results["cp -r (output size)"][0]
        print(f"plan solar m={args.m}: {args.layers} -> {n_out} layers, output {out_bytes / 1e9:.2f} GB")
        for tool, (secs, rss) in results.items():
            print(f"{tool:22s} {secs:8.1f} s  peak RSS {rss / 2**30:6.2f} GiB  {out_bytes / 1e9 / secs:6.2f} GB/s  "
                  f"{secs / copy_s:5.2f}x copy")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
