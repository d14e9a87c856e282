"""The backend's fused attention against the einsum reference, on whatever device this runs.

On a GPU this checks cuDNN (``auto``) for causal, sliding-window and packed batches, outputs and
gradients, in bf16 against the fp32 reference; on CPU the same code checks splash in interpret
mode. One JSON line per case with the max abs errors (bf16 tolerance: ~2e-2).

    python bench/attention_check.py
"""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    from solarjax import attention as A
    from solarjax import model as M

    backend = jax.default_backend()
    impl = A.resolve("auto", jnp.bfloat16, backend)
    if impl == "xla":
        impl = "splash"
    B, T, H, K, D = 2, 384, 8, 2, 64
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, K, D)),
               jax.random.normal(ks[2], (B, T, K, D)))
    cot = jax.random.normal(ks[3], (B, T, H, D))
    packed = jnp.asarray(np.array([[1] * 100 + [2] * 200 + [3] * 84, [1] * 384], np.int32))
    cases = {"causal": (None, None), "causal_packed": (packed, None), "window_packed": (packed, 65),
             "window": (None, 65)}
    for name, (segments, window) in cases.items():
        positions = M.default_positions(jnp.zeros((B, T), jnp.int32), segments)
        mask = M.attention_mask(positions, positions, segments, segments, window)

        def fused(q, k, v):
            out = A.fused_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                    segments, impl=impl, window=window, max_segments=8)
            return out.astype(jnp.float32)

        ref = lambda q, k, v: A.reference_attention(q, k, v, mask)  # noqa: E731
        loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * cot))  # noqa: E731
        try:
            with A.kernels_interpreted() if backend == "cpu" else contextlib.nullcontext():
                out = jax.jit(fused)(q, k, v)
                grads = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
            ref_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
            scale = [float(jnp.abs(g).max()) for g in ref_grads]
            line = {"case": name, "impl": impl, "backend": backend,
                    "out_max_err": float(jnp.abs(out - ref(q, k, v)).max()),
                    "grad_max_rel_err": [float(jnp.abs(a - b).max()) / s for a, b, s in zip(grads, ref_grads, scale)]}
            line["ok"] = line["out_max_err"] < 3e-2 and max(line["grad_max_rel_err"]) < 3e-2
        except Exception as err:  # noqa: BLE001 - report the case and go on with the others
            line = {"case": name, "impl": impl, "backend": backend, "ok": False, "error": str(err)[:500]}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
