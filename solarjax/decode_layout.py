"""The decode layout: each layer's weights in their own arrays, the same-input matmuls fused.

A decode step reads every weight once, so its speed is memory traffic and, on a GPU, the number
of small kernels per token. Two things in the training layout cost a decode step:

- Scanning over the layer-stacked arrays makes XLA:CPU copy each layer's weights out of the
  stack on every step (a dynamic slice feeding a matmul is not fused there): a second pass over
  all weights per token. With each layer in its own arrays, the layer loop
  (``model.run_layers``) unrolls the layers in Python and the matmuls read the weights in place.
- ``wq``/``wk``/``wv`` all multiply the same normed input, and so do ``w_gate``/``w_up``: five
  matrix-vector products per layer become two (``wqkv``, ``w_gate_up``), columns concatenated.
  Each output column is the same dot product as before, so the numbers do not change; the
  weights are read once either way, and each token launches three fewer kernels per layer.

The one layer loop (``model.run_layers``: training forward, quantized eval, prefill, decode) and
its layer functions (``model.qkv_projection``, ``model.finish_layer_with_stats``) accept either form.
Training keeps the stacked, unfused layout (one compiled layer, FSDP over the stack, per-matrix
sharding). Measured in docs/performance.md, "Inference".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from solarjax.model import Params
from solarjax.quant import Quantized

FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}  # fused leaf: the leaves it replaces


def unstack_layers(params: Params, *, consume: bool = False) -> Params:
    """``params`` with ``layers`` as a tuple of per-layer dicts, projections fused: the decode layout.

    ``consume=True`` frees each stacked leaf once it is fused or split, so peak memory stays near
    one copy of the model (plus the largest fused group); the caller's params are unusable
    afterwards. Quantized leaves fuse and split too (their scales are per output column, so they
    concatenate with the columns).
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    layers = fuse_projections(layers, consume=consume)
    n_layers = jax.tree.leaves(layers)[0].shape[0]
    split: dict[str, list] = {}
    for name, leaf in layers.items():
        split[name] = [jax.tree.map(lambda a, i=i: a[i], leaf) for i in range(n_layers)]
        jax.block_until_ready(split[name])
        if consume or name in FUSED:  # a fused leaf is ours either way
            _delete(leaf)
    return {**params, "layers": tuple({name: split[name][i] for name in layers} for i in range(n_layers))}


def fuse_projections(layers: Params, *, consume: bool = False) -> Params:
    """Stacked ``wq/wk/wv`` as ``wqkv (L, d, (H + 2·KV)·hd)`` and a dense MLP's ``w_gate/w_up`` as
    ``w_gate_up (L, d, 2·ffn)``; other leaves (norms, biases, ``wo``, experts) as they are.

    Fused on the stacked arrays, before the split into layers: per-layer pieces freed one by one
    would fragment the host heap (hundreds of MB of resident memory that is never reused).
    """
    out = dict(layers)
    for fused, names in FUSED.items():
        if not all(name in layers for name in names):
            continue
        if fused == "w_gate_up" and len(layers["w_gate"].shape) == 4:  # experts (L, E, d, f) stay apart
            continue
        out[fused] = _concat_columns([out.pop(name) for name in names], consume)
    return out


def _concat_columns(weights: list, consume: bool) -> jax.Array | Quantized:
    """``(L, d, *out_axes)`` matrices flattened to ``(L, d, out)`` and concatenated along the output."""
    def flat(a: jax.Array) -> jax.Array:
        return a.reshape(*a.shape[:2], -1)

    quantized = [isinstance(w, Quantized) for w in weights]
    if any(quantized) and not all(quantized):
        raise ValueError("cannot fuse quantized and float projections of one layer: quantize all of them or none")
    if all(quantized):
        fused = Quantized(jnp.concatenate([flat(w.values) for w in weights], axis=2),
                          jnp.concatenate([flat(w.scale) for w in weights], axis=2))
    else:
        fused = jnp.concatenate([flat(w) for w in weights], axis=2)
    jax.block_until_ready(fused)
    if consume:
        for w in weights:
            _delete(w)
    return fused


def _delete(leaf) -> None:
    for array in jax.tree.leaves(leaf):
        array.delete()
