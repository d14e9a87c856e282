"""Matrix-vector bandwidth: XLA (jax) vs torch on the shapes of a batch-1 decode step, side by side.

    python bench/matvec.py [--shape smollm2_135m] [--copies 60] [--dtypes float32,bfloat16,int8]

A batch-1 decode step is a chain of matrix-vector products, each weight read once, so its floor
is weight bytes / the bandwidth these products reach. Each figure runs ``--copies`` distinct
random matrices of one shape in one chain (one jitted program for XLA, one loop for torch; their
total exceeds the last-level cache, so the weights come from memory, as in decode) and prints one
JSON line: GB/s of weights each side reaches and ``ratio_vs_torch`` = ours / torch's GB/s.

XLA's ``bfloat16`` and ``int8`` rows feed the dot a low-precision weight (int8: converted and
scaled per output column, as :mod:`solarjax.quant` does); torch's rows are its ``nn.functional
.linear`` on the same bytes (int8: dequantized first, the way a user without a quantized kernel
would run it). Needs only jax, numpy and torch. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SHAPES = {  # (in, out) of each matrix a decode step reads, per layer (fused as in the decode layout)
    "smollm2_135m": {"wqkv": (576, 960), "wo": (576, 576), "w_gate_up": (576, 3072), "w_down": (1536, 576)},
}


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def xla_chain(k: int, n: int, copies: int, dtype: str, repeats: int) -> tuple[float, int]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    if dtype == "int8":
        weights = [(jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8), jnp.ones((1, n), jnp.float32))
                   for _ in range(copies)]
        product = lambda x, w: x @ (w[0].astype(jnp.float32) * w[1])  # noqa: E731
    else:
        weights = [jnp.asarray(rng.standard_normal((k, n)), dtype) for _ in range(copies)]
        product = lambda x, w: jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32)  # noqa: E731

    @jax.jit
    def chain(x, weights):
        total = jnp.float32(0)
        for w in weights:  # every product is used, so none is dropped
            total = total + product(x, w)[0, :8].sum()
        return total

    x = jnp.ones((1, k), jnp.float32)
    seconds = best_seconds(lambda: chain(x, weights).block_until_ready(), repeats)
    return seconds, sum(leaf.nbytes for leaf in jax.tree.leaves(weights))


def torch_chain(k: int, n: int, copies: int, dtype: str, repeats: int) -> tuple[float, int]:
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[dtype]
    if dtype == "int8":
        weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.ones(n, 1)) for _ in range(copies)]
        product = lambda x, w: torch.nn.functional.linear(x, w[0].float() * w[1])  # noqa: E731
        nbytes = sum(w.numel() + s.numel() * 4 for w, s in weights)
    else:
        weights = [torch.randn(n, k).to(torch_dtype) for _ in range(copies)]  # nn.Linear's (out, in)
        product = lambda x, w: torch.nn.functional.linear(x.to(w.dtype), w)  # noqa: E731
        nbytes = sum(w.numel() * w.element_size() for w in weights)
    x = torch.ones(1, k)

    def run():
        with torch.inference_mode():
            total = 0.0
            for w in weights:
                total = total + product(x, w)[0, :8].float().sum()
            return total

    return best_seconds(run, repeats), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2_135m", choices=sorted(SHAPES))
    parser.add_argument("--copies", type=int, default=60, help="distinct matrices per chain")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import jax
    import torch

    for dtype in args.dtypes.split(","):
        for name, (k, n) in SHAPES[args.shape].items():
            ours_s, ours_bytes = xla_chain(k, n, args.copies, dtype, args.repeats)
            theirs_s, theirs_bytes = torch_chain(k, n, args.copies, dtype, args.repeats)
            ours, theirs = ours_bytes / ours_s / 1e9, theirs_bytes / theirs_s / 1e9
            print(json.dumps({"figure": "matvec_GBps", "matrix": name, "shape": [k, n], "copies": args.copies,
                              "dtype": dtype, "xla": round(ours, 1), "torch": round(theirs, 1),
                              "ratio_vs_torch": round(ours / theirs, 2), "backend": jax.default_backend(),
                              "torch_threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
