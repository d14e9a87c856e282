"""Weight-only int8 (and int4) quantization with one scale per output channel.

Decoding one token reads every weight once, so at batch 1 its speed is set by weight bytes:
int8 weights are a quarter of fp32 and half of bf16. :func:`quantize_params` replaces each
matrix by a :class:`Quantized` leaf (integer values + a float scale per output channel, i.e.
max-abs over the contraction axes / 127); norms stay as they are. Nothing is dequantized ahead
of time: the model's one layer loop (:func:`solarjax.model.run_layers`, through
:func:`solarjax.model.dense_layer`) turns each layer's leaves back into compute-dtype arrays
*inside* its body, right before the layer's matmuls, so XLA sees ``convert * scale -> dot`` and
can fuse the dequantize into the matmul instead of materializing a float copy of the model.

:func:`hidden_states`, :func:`embed` and :func:`lm_head` here are the quantization-aware entry
points outside the layers (they fall through to the model's for unquantized params).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from solarjax import model as M
from solarjax.config import ModelConfig
from solarjax.model import Params

BITS = (8, 4)

# Contraction axes of every matrix (after the leading layer axis, for stacked ones): the scale is
# shared along these and separate for every output channel.
CONTRACTION_AXES: dict[str, tuple[int, ...]] = {
    "wq": (1,), "wk": (1,), "wv": (1,),  # (L, d, heads, hd)
    "wo": (1, 2),  # (L, heads, hd, d)
    "w_gate": (1,), "w_up": (1,),  # (L, d, ffn)
    "w_down": (1,),  # (L, ffn, d)
    "embed": (1,),  # (vocab, d): one scale per row, which is the head's output channel when tied
    "lm_head": (0,),  # (d, vocab)
}
# Mixture-of-Experts leaves (solarjax.moe) carry an experts axis after the layer axis: one scale per
# expert and output channel. The router (w_router) is not quantized: routing stays float32.
EXPERT_CONTRACTION_AXES: dict[str, tuple[int, ...]] = {
    "w_gate": (2,), "w_up": (2,),  # (L, E, d, f)
    "w_down": (2,),  # (L, E, f, d)
}


def contraction_axes(name: str, w: jax.Array) -> tuple[int, ...] | None:
    """The axes leaf ``name`` is contracted over (its scale is shared along them); None: not quantized."""
    if name in EXPERT_CONTRACTION_AXES and w.ndim == 4:
        return EXPERT_CONTRACTION_AXES[name]
    return CONTRACTION_AXES.get(name)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Quantized:
    """Integer weights and a broadcastable float scale: ``values * scale`` is the weight."""

    values: jax.Array  # int8 (or int4)
    scale: jax.Array  # float32, size 1 along the contraction axes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dense(self, dtype: Any) -> jax.Array:
        return self.values.astype(dtype) * self.scale.astype(dtype)


def quantize(w: jax.Array, axes: tuple[int, ...], bits: int = 8) -> Quantized:
    """Symmetric per-output-channel quantization of ``w`` (scale = max |w| over ``axes`` / qmax)."""
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / qmax
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    values = jnp.clip(jnp.round(w32 / scale), -qmax, qmax).astype(jnp.int8 if bits == 8 else jnp.int4)
    return Quantized(values, scale)


_quantize_jit = jax.jit(quantize, static_argnames=("axes", "bits"))


def quantize_params(params: Params, bits: int = 8) -> Params:
    """Every matrix (attention, MLP or experts, embedding, head) as a :class:`Quantized` leaf; norms
    and a Mixture-of-Experts router untouched.

    Leaves are converted one at a time, so peak memory is the model plus one float matrix.
    """
    if is_quantized(params):
        raise ValueError("params are already quantized")
    layers = {name: w if contraction_axes(name, w) is None else _quantize_jit(w, axes=contraction_axes(name, w),
                                                                                 bits=bits)
              for name, w in params["layers"].items()}
    out = {**params, "layers": layers}
    for name in ("embed", "lm_head"):
        if name in params:
            out[name] = _quantize_jit(params[name], axes=CONTRACTION_AXES[name], bits=bits)
    return out


def dequantize_params(params: Params, dtype: Any = jnp.float32) -> Params:
    """Plain params holding exactly the weights the quantized model computes with (an oracle's input)."""
    return jax.tree.map(lambda x: x.dense(dtype) if isinstance(x, Quantized) else x, params,
                        is_leaf=lambda x: isinstance(x, Quantized))


def is_quantized(params: Params) -> bool:
    return any(isinstance(leaf, Quantized) for leaf in
               jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Quantized)))


def param_bytes(params: Params) -> int:
    """Bytes the weights occupy (int4 counted as half a byte)."""
    total = 0
    for leaf in jax.tree.leaves(params):
        bits = 4 if leaf.dtype == jnp.int4 else leaf.dtype.itemsize * 8
        total += leaf.size * bits // 8
    return total


# ----------------------------------------------------------------------------- dequantizing entry points


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Token embeddings; a quantized table is gathered as integers and scaled per row."""
    table = params["embed"]
    if not isinstance(table, Quantized):
        return M.embed(params, tokens, cfg)
    rows = jnp.take(table.values, tokens, axis=0).astype(cfg.compute_dtype)
    rows = rows * jnp.take(table.scale, tokens, axis=0).astype(cfg.compute_dtype)
    multiplier = M.embed_multiplier(cfg, table.scale.dtype)  # Gemma scales embeddings by sqrt(d_model)
    return rows if multiplier is None else rows * multiplier.astype(rows.dtype)


def lm_head(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The model's final norm + head, with a quantized head matrix dequantized at the matmul."""
    head = {k: v.dense(cfg.compute_dtype) if isinstance(v, Quantized) else v
            for k, v in params.items() if k in ("embed", "lm_head", "final_norm")}
    return M.lm_head(head, x, cfg)


def hidden_states(params: Params, tokens: jax.Array, cfg: ModelConfig, *, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """:func:`solarjax.model.hidden_states` for quantized params (the model's own for plain ones):
    the same layer loop, attention on the mask path (:func:`solarjax.attention.mask_path`)."""
    if not is_quantized(params):
        return M.hidden_states(params, tokens, cfg, positions=positions, segment_ids=segment_ids)
    if positions is None:
        positions = M.default_positions(tokens, segment_ids)
    attend = M.sequence_attention(cfg, positions, segment_ids, masked=True)
    return M.run_layers(params["layers"], embed(params, tokens, cfg), positions, cfg, attend)[0]
