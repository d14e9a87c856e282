"""Generation latency: solarjax vs transformers (static cache + torch.compile, and eager), side by side.

GPU: python3 bench/generate.py --shape smollm2_135m --prompt-len 512 --new-tokens 64 --repeats 3 --dtype bfloat16 --side-timeout 150

(about 2.5 minutes on one H100 including torch.compile, all four sides; run from the repository root.)

    python bench/generate.py [--shape smollm2_135m|tiny] [--prompt-len 512] [--new-tokens 64]
                             [--dtype float32|bfloat16] [--sides ours,ours_int8,hf_compiled,hf_eager]

Builds one random Llama of SmolLM2-135M shape (or ``--shape tiny``, which runs in seconds on a
CPU), saves it as an HF directory, then measures each side in its own subprocess with its own
timeout (``--side-timeout``; peak memory is each one's own) and prints one JSON line per figure:
prefill ms (a one-token ``generate``, batch 1, prompt-len tokens), decode ms/token and peak memory,
each side's value and ``ratio_vs_X = X / ours`` (above 1: we are faster or leaner).

CPU against llama.cpp (the small-model survey's table, one command; needs ``pip install llama-cpp-python``):

    python bench/generate.py --shape smollm2_135m --prompt-len 512 --new-tokens 64 --threads 1 \
        --sides ours,ours_int8,llama_cpp_f32,llama_cpp_f16,llama_cpp_q8_0,llama_cpp_q4_1,hf_eager

Sides: ``ours`` (solarjax ``generate``: prefill and the whole decode loop one compiled program),
``ours_int8`` (the same with weight-only int8, :mod:`solarjax.quant`; on CPU its decode projections
run the C++ int8 kernel, :mod:`solarjax.kernels.cpu_int8`, when it is built: the ``int8_kernel``
line says which code path), ``ours_int8_xla`` (int8 with that kernel off: XLA's convert + dot), ``hf_compiled``
(transformers ``generate`` with ``cache_implementation="static"`` and a ``CompileConfig``:
its decode step under ``torch.compile``, CUDA graphs on a GPU via mode ``reduce-overhead``) and
``hf_eager`` (transformers ``generate``, dynamic cache, eager). All are timed through their
public ``generate`` with greedy decoding and no stop token. A side that fails or runs out of time
prints ``null`` with the reason. Peak memory is device memory on a GPU and peak RSS on CPU.
``llama_cpp_<type>`` sides run the same model exported by ``solarjax convert hf-to-gguf`` at that type
(f32, f16, q8_0, q4_1) through llama-cpp-python, same random prompt ids, greedy.
bf16 is the GPU default, fp32 the CPU default. Needs only jax, torch, transformers, safetensors
and tokenizers (no gguf, grain or ml_collections). Not a test.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # solarjax from this checkout, installed or not

SHAPES = {
    "smollm2_135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}
LLAMA_CPP_TYPES = ("f32", "f16", "q8_0", "q4_1")
SIDES = ("ours", "ours_int8", "ours_int8_xla", "hf_compiled", "hf_eager", *(f"llama_cpp_{t}" for t in LLAMA_CPP_TYPES))


def build_model(path: str, shape: str) -> None:
    """A random Llama of ``shape`` saved as an HF directory, with a tokenizer of its vocabulary size
    (SmolLM2's real one for the SmolLM2 shape; 256 byte tokens for ``tiny``) so it exports to GGUF."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2))
    model.save_pretrained(path)
    if SHAPES[shape]["vocab_size"] == 49152:
        from solarjax import gguf, loading

        loading.copy_tokenizer(gguf.default_gguf_path(), Path(path))
    else:
        from solarjax.llama_cpp_peer import placeholder_tokenizer

        placeholder_tokenizer(Path(path))


def export_gguf(model_dir: str, qtype: str) -> str:
    """The model as a GGUF of ``qtype``, written by solarjax's exporter (``convert hf-to-gguf``)."""
    from solarjax import gguf_export

    out = Path(model_dir).parent / "gguf" / f"model.{qtype}.gguf"  # beside the model: never inside a source
    if not out.exists():
        gguf_export.hf_to_gguf(model_dir, out, qtype)
    return str(out)


def _measure(generate_n, new_tokens: int, repeats: int, warmups: int = 1) -> tuple[float, float]:
    """(prefill ms, decode ms/token) from back-to-back ``generate`` calls of 1 and N new tokens.

    Prefill is the best time of a one-token generate; decode is the median over repeats of
    (time(N) - time(1)) / (N - 1), pairing the two calls so that load from other processes on a
    shared machine hits both halves of each estimate alike.
    """
    for _ in range(warmups):  # compile / record CUDA graphs
        generate_n(1), generate_n(new_tokens)
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


def bench_llama_cpp(path: str, prompt_len: int, new_tokens: int, repeats: int, threads: int | None) -> dict:
    """llama.cpp through llama-cpp-python, timed as ``solarjax bench latency`` times it
    (:mod:`solarjax.llama_cpp_peer`: prefill one ``eval``, decode greedy ``generate``)."""
    from solarjax import llama_cpp_peer

    start = time.perf_counter()
    llama_cpp_peer.load(path, n_ctx=64, threads=threads)
    first_s = time.perf_counter() - start
    prefill, decode_ms = llama_cpp_peer.measure(path, [prompt_len], new_tokens, repeats, threads)
    return {"prefill_ms": prefill[prompt_len], "decode_ms_per_token": decode_ms, "first_call_s": first_s,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "weight_mb": os.path.getsize(path) / 2**20, "device": "cpu",
            "threads": threads or len(os.sched_getaffinity(0))}


def bench_ours(path: str, prompt_len: int, new_tokens: int, dtype: str, repeats: int, int8: bool = False,
               unroll: str = "auto") -> dict:
    import jax
    import numpy as np

    from solarjax import generate as G
    from solarjax import quant
    from solarjax.decode_layout import unstack_layers
    from solarjax.kernels import cpu_int8

    cfg, params, _ = G.load_model(path, dtype=dtype)
    cfg = cfg.replace(dtype=dtype)
    if int8:
        params = quant.quantize_params(params)
    params = unstack_layers(params, consume=True)  # the decode layout `solarjax generate` uses
    prompt = [np.random.default_rng(0).integers(3, cfg.vocab_size, prompt_len).tolist()]
    start = time.perf_counter()
    options = {} if unroll == "auto" else {"unroll": True if unroll == "full" else int(unroll)}
    G.generate(params, cfg, prompt, max_new_tokens=2, **options)
    compile_s = time.perf_counter() - start
    # generate() returns host lists, so each call is synchronous
    prefill_ms, decode_ms = _measure(lambda n: G.generate(params, cfg, prompt, max_new_tokens=n, **options),
                                     new_tokens, repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "peak_memory_mb": peak / 2**20,
            "weight_mb": quant.param_bytes(params) / 2**20, "first_call_s": compile_s, "device": device.device_kind,
            "int8_kernel": (cpu_int8.isa() if int8 and cpu_int8.available() else "off")}


def bench_transformers(path: str, prompt_len: int, new_tokens: int, dtype: str, repeats: int, compiled: bool,
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
    options = {}
    if compiled:
        config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead" if cuda else "default")
        config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        options = dict(cache_implementation="static", compile_config=config)

    @torch.no_grad()
    def generate_n(n: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=0, **options)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    generate_n(2)
    compile_s = time.perf_counter() - start
    prefill_ms, decode_ms = _measure(generate_n, new_tokens, repeats, warmups=2 if compiled else 1)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": decode_ms, "peak_memory_mb": peak / 2**20,
            "first_call_s": compile_s, "device": torch.cuda.get_device_name() if cuda else "cpu"}


def _pin(threads: int | None):
    """A ``preexec_fn`` pinning a side to the first ``threads`` CPUs it may use (None: no pinning),
    so every side, XLA's thread pool, torch's and llama.cpp's alike, gets the same cores."""
    if not threads:
        return None
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    return lambda: os.sched_setaffinity(0, cpus)


def run_side(side: str, args: argparse.Namespace, model_dir: str) -> dict:
    """One side in a subprocess; ``{"error": ...}`` when it fails or exceeds ``--side-timeout``."""
    if side.startswith("llama_cpp_"):
        try:
            model_dir = export_gguf(model_dir, side.removeprefix("llama_cpp_"))
        except Exception as err:  # noqa: BLE001 - a side that cannot run prints its reason
            return {"error": f"GGUF export failed: {err}"}
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model-dir", model_dir,
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--ours-unroll", args.ours_unroll,
           *(["--torch-threads", str(args.torch_threads)] if args.torch_threads else []),
           *(["--threads", str(args.threads)] if args.threads else [])]
    env = os.environ.copy()
    if side == "ours_int8_xla":
        env["SOLARJAX_CPU_INT8_KERNEL"] = "0"  # solarjax.kernels.cpu_int8.DISABLE_ENV
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.side_timeout,
                              preexec_fn=_pin(args.threads))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.side_timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2_135m")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    parser.add_argument("--side-timeout", type=float, default=600, help="seconds each side may take (default 600)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (on a shared CPU, 1 avoids "
                        "spin-waiting slowdowns; default: torch's own)")
    parser.add_argument("--threads", type=int, help="pin every side to this many CPUs (XLA, torch and llama.cpp "
                        "then use that many threads); default: no pinning")
    parser.add_argument("--ours-unroll", default="auto", help="layer-scan unroll of our decode step: auto (full "
                        "on accelerators), full, or a number")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # child process: one side, one JSON object
        common = (args.model_dir, args.prompt_len, args.new_tokens, args.dtype, args.repeats)
        if args.side.startswith("ours"):
            result = bench_ours(*common, int8=args.side.startswith("ours_int8"), unroll=args.ours_unroll)
        elif args.side.startswith("llama_cpp_"):
            result = bench_llama_cpp(args.model_dir, args.prompt_len, args.new_tokens, args.repeats, args.threads)
        else:
            result = bench_transformers(*common, compiled=args.side == "hf_compiled",
                                        threads=args.torch_threads or args.threads)
        print(json.dumps(result))
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not sides:
        parser.error(f"--sides: unknown {unknown}; choose from {','.join(SIDES)}")
    if args.dtype is None:
        import torch

        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        build_model(model_dir, args.shape)
        results = {side: run_side(side, args, model_dir) for side in sides}
    device = next((r["device"] for r in results.values() if "device" in r), None)
    common = {"shape": args.shape, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "dtype": args.dtype, "device": device, "torch_threads": args.torch_threads, "threads": args.threads}
    for side, result in results.items():
        if "error" in result:
            print(json.dumps({"figure": "error", "side": side, "error": result["error"], **common}))
    kernels = {side: r["int8_kernel"] for side, r in results.items() if "int8_kernel" in r}
    if kernels:
        print(json.dumps({"figure": "int8_kernel", **kernels, **common}))
    for figure in ("prefill_ms", "decode_ms_per_token", "peak_memory_mb", "first_call_s"):
        values = {side: (round(r[figure], 3) if figure in r else None) for side, r in results.items()}
        ours = values.get("ours")
        ratios = {f"ratio_vs_{side}": round(v / ours, 3) for side, v in values.items()
                  if side != "ours" and v is not None and ours}
        print(json.dumps({"figure": figure, **values, **ratios, **common}))


if __name__ == "__main__":
    main()
