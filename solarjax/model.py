"""A pure-functional decoder for every family in :mod:`solarjax.families` (Llama, Mistral, Qwen2/3, Gemma 3).

Params are a plain pytree of arrays. Every per-layer weight lives under ``params["layers"]``
stacked on axis 0, so the forward pass is one ``jax.lax.scan`` over layers and depth up-scaling
is array slicing. Which leaves exist (biases, q/k norms, sandwich norms) comes from the family's
spec; the forward applies whatever the layer holds. Weight layouts keep heads as their own axis (``wq: (L, d_model, n_heads,
head_dim)``) so sharding rules can name them; conversion to Hugging Face is a reshape and a
transpose, because RoPE here uses HF's rotate-half convention.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from solarjax import attention as attn
from solarjax import families, moe
from solarjax.config import REMAT_POLICIES, ModelConfig
from solarjax.families.spec import Family, Param
from solarjax.ffn import activation_fn, mlp
from solarjax.kernels import cpu_int8

Params = dict[str, Any]

def family(cfg: ModelConfig) -> Family:
    """The architecture spec of ``cfg`` (:mod:`solarjax.families`): its params and numerics."""
    return families.get(cfg.arch)


def _tree(cfg: ModelConfig, value: Callable[[Param, bool], Any]) -> Params:
    """A params-shaped tree with ``value(param, stacked)`` at every leaf, from the family spec."""
    layer, glob = family(cfg).params(cfg)
    tree: Params = {p.name: value(p, False) for p in glob}
    tree["layers"] = {p.name: value(p, True) for p in layer}
    return tree


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter, as a pytree of tuples mirroring ``init_params``."""
    return _tree(cfg, lambda p, stacked: ((cfg.n_layers,) if stacked else ()) + tuple(p.shape(cfg)))


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names for every parameter, same tree structure as the params."""
    return _tree(cfg, lambda p, stacked: (("layers",) if stacked else ()) + tuple(p.axes))


def param_specs(cfg: ModelConfig) -> Params:
    """The :class:`~solarjax.families.spec.Param` declaration of every leaf (init, decay, names)."""
    return _tree(cfg, lambda p, stacked: p)


def abstract_params(cfg: ModelConfig) -> Params:
    """``jax.ShapeDtypeStruct`` leaves: the params without allocating them (for AOT and restore)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, cfg.weight_dtype), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )


def init_params(key: jax.Array, cfg: ModelConfig, init_std: float = 0.02) -> Params:
    """Random init as HF does it: each leaf as its spec says (normal with ``initializer_range``,
    ones or zeros: norms at one, or zero where they scale by 1 + w, biases at zero)."""
    is_param = lambda x: isinstance(x, Param)  # noqa: E731
    specs, treedef = jax.tree_util.tree_flatten(param_specs(cfg), is_leaf=is_param)
    shapes = jax.tree.leaves(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(specs))

    def make(spec: Param, shape: tuple[int, ...], k: jax.Array) -> jax.Array:
        if spec.init == "normal":
            return (init_std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.weight_dtype)
        return (jnp.ones if spec.init == "ones" else jnp.zeros)(shape, cfg.weight_dtype)

    return jax.tree.unflatten(treedef, [make(p, s, k) for p, s, k in zip(specs, shapes, keys)])


def compute_params(params: Params, cfg: ModelConfig) -> Params:
    """Matmul weights cast to the compute dtype once, before the layer scan.

    Done per step rather than per matmul so remat's recomputation and FSDP's all-gathers move
    bf16 copies, not fp32 masters; gradients flow back to the fp32 masters through the cast.
    Norm scales (kept fp32: the norm runs in fp32), biases and the embedding table (a gather whose
    scatter-add gradient would lose precision in bf16) stay as they are: the spec's ``matmul``.
    """
    dtype = cfg.compute_dtype
    specs = param_specs(cfg)
    out = {top: jax.tree.map(lambda p, leaf: leaf.astype(dtype) if p.matmul else leaf, specs[top], params[top],
                             is_leaf=lambda x: isinstance(x, Param))
           for top in specs}
    return {**params, **out}


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm computed in float32, as HF does, then cast back; ``plus_one`` scales by (1 + w) (Gemma)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w32 = weight.astype(jnp.float32)
    return ((1.0 + w32 if plus_one else w32) * x32).astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The family's RMSNorm."""
    return rms_norm(x, weight, cfg.rms_eps, family(cfg).norm_plus_one)


def inv_frequencies(head_dim: int, theta: float, scaling: tuple | dict | None = None,
                    max_seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """RoPE inverse frequencies (float32, ``head_dim // 2``) and the cos/sin factor, for plain RoPE
    and the ``linear``, ``llama3`` and ``yarn`` scalings exactly as transformers'
    ``modeling_rope_utils`` computes them (float32 arithmetic)."""
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    inv_freq = (f32(1.0) / (f32(theta) ** exponents)).astype(f32)
    s = dict(scaling or {})
    kind = s.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / f32(s["factor"])).astype(f32), 1.0
    if kind == "llama3":
        factor, low, high = f32(s["factor"]), f32(s["low_freq_factor"]), f32(s["high_freq_factor"])
        old = f32(s["original_max_position_embeddings"])
        wavelen = f32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq).astype(f32)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(f32), 1.0
    if kind == "yarn":
        original = s.get("original_max_position_embeddings") or max_seq_len
        factor = s.get("factor") or max_seq_len / original

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = s.get("attention_factor")
        if attention_factor is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations):
            return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = f32(theta) ** exponents
        extrapolation, interpolation = f32(1.0) / pos_freqs, f32(1.0) / (f32(factor) * pos_freqs)
        ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
        extra = f32(1) - ramp
        return (interpolation * (1 - extra) + extrapolation * extra).astype(f32), float(attention_factor)
    raise ValueError(f"RoPE scaling {kind!r} is not supported")


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, scaling: tuple | dict | None = None,
                 max_seq_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape (batch, seq, head_dim) in HF's rotate-half layout."""
    inv_freq, factor = inv_frequencies(head_dim, theta, scaling, max_seq_len)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    if factor == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables for every attention kind of ``cfg``, stacked: (kinds, batch, seq, head_dim)."""
    tables = [rope_cos_sin(positions, cfg.head_dim, *cfg.kind_rope(k), cfg.max_seq_len) for k in range(cfg.n_kinds)]
    return jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])


def pick(stacked: jax.Array, kind: jax.Array | int) -> jax.Array:
    """One kind's entry of a per-kind stack (static when there is one kind)."""
    return stacked[0] if stacked.shape[0] == 1 else jax.lax.dynamic_index_in_dim(stacked, kind, keepdims=False)


def layer_kinds(cfg: ModelConfig) -> jax.Array:
    """(n_layers,) int32: each layer's attention kind, scanned beside the stacked weights."""
    return jnp.asarray(cfg.layer_kinds, jnp.int32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (batch, seq, heads, head_dim) by the tables; the rotation runs in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    sliding_window: int | None,
) -> jax.Array:
    """Boolean (batch, 1, q, kv) mask: causal by position, same segment, inside the window.

    Causality is by *position*, not index, so packed sequences and KV caches use the same rule.
    Within a segment positions increase, so this equals index causality there.
    """
    qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
    mask = kp <= qp
    if sliding_window is not None:
        mask &= qp - kp < sliding_window
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    return mask[:, None]


def attention_masks(q_positions, kv_positions, q_segments, kv_segments, cfg: ModelConfig) -> jax.Array:
    """:func:`attention_mask` for every attention kind of ``cfg``: (kinds, batch, 1, q, kv)."""
    return jnp.stack([attention_mask(q_positions, kv_positions, q_segments, kv_segments, cfg.kind_window(k))
                      for k in range(cfg.n_kinds)])


def project_heads(h: jax.Array, w: jax.Array) -> jax.Array:
    """(b, t, d) @ (d, heads, head_dim) -> (b, t, heads, head_dim) as one 2-D matmul.

    Written as a matmul on the flattened weight rather than an einsum over (d, n, h): the two
    are the same product, but for the einsum XLA:CPU copies the weight into another layout on
    every call (per layer per decode step: a third of CPU decode time), while the flattening
    reshape is free in the weight's row-major layout."""
    d, n, hd = w.shape
    return (h @ w.reshape(d, n * hd)).reshape(*h.shape[:-1], n, hd)


def qkv_projection(x: jax.Array, layer: Params, cos: jax.Array, sin: jax.Array, cfg: ModelConfig):
    """Normed input -> rotated queries and keys, and values (biases and q/k norms where the family has them)."""
    h = norm(x, layer["attn_norm"], cfg)
    if "wqkv" in layer:  # the decode layout's fused projection (solarjax.decode_layout)
        heads = np.cumsum([cfg.n_heads, cfg.n_kv_heads])
        fused = (h @ layer["wqkv"].astype(x.dtype)).reshape(*h.shape[:-1], -1, cfg.head_dim)
        q, k, v = jnp.split(fused, heads, axis=-2)
    else:
        q, k, v = (project_heads(h, layer[name].astype(x.dtype)) for name in ("wq", "wk", "wv"))
    if "bq" in layer:
        q, k, v = (t + layer[b].astype(t.dtype) for t, b in ((q, "bq"), (k, "bk"), (v, "bv")))
    if "q_norm" in layer:
        q, k = head_norm(q, layer["q_norm"], cfg), head_norm(k, layer["k_norm"], cfg)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")


def head_norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    """q/k RMSNorm on (batch, seq, heads, head_dim): per head for a (head_dim,) weight (Qwen3,
    Gemma 3), over all heads' projection at once for a (heads, head_dim) weight (OLMoE)."""
    if weight.ndim == 1:
        return norm(x, weight, cfg)
    flat = norm(x.reshape(*x.shape[:-2], -1), weight.reshape(-1), cfg)
    return flat.reshape(x.shape)


def finish_layer_with_stats(x: jax.Array, attn_out: jax.Array, layer: Params, cfg: ModelConfig,
                            valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Output projection, residual, then the MLP block with its residual (sandwich-normed where
    the family has post norms); also the router statistics of a Mixture-of-Experts layer (else
    None). ``valid`` (B, T) marks the tokens those statistics count."""
    attn_out = checkpoint_name(attn_out, "attn_out")
    wo = layer["wo"].astype(x.dtype)  # (heads, head_dim, d) flattened, as in project_heads
    out = attn_out.reshape(*attn_out.shape[:-2], -1) @ wo.reshape(-1, wo.shape[-1])
    if "post_attn_norm" in layer:
        out = norm(out, layer["post_attn_norm"], cfg)
    x = x + out
    h = norm(x, layer["mlp_norm"], cfg)
    stats = None
    if "w_router" in layer:
        out, stats = moe.moe_block(h, layer, cfg, activation_fn(family(cfg).activation), valid,
                                   _ACTIVATION_SHARDING.get())
    elif "w_gate_up" in layer:
        out = mlp(h, layer["w_gate_up"], None, layer["w_down"], family(cfg).activation)
    else:
        out = mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"], family(cfg).activation)
    if "post_mlp_norm" in layer:
        out = norm(out, layer["post_mlp_norm"], cfg)
    return x + out, stats


def attention_scale(cfg: ModelConfig) -> float | None:
    """The scores' scale when it is not ``1 / sqrt(head_dim)`` (Gemma's query_pre_attn_scalar), else None."""
    return None if cfg.query_pre_attn_scalar is None else cfg.attention_scale


def sequence_attention(cfg: ModelConfig, positions: jax.Array, segment_ids: jax.Array | None, *,
                       masked: bool = False) -> Attend:
    """The :data:`Attend` of a whole-sequence forward (training, eval): causal self-attention by the
    backend's kernel (:mod:`solarjax.attention`) for each layer's attention kind (its window); no cache.

    Fused kernels (splash on TPU, cuDNN on GPU) never build the (B, 1, T, T) mask; a mask-taking
    implementation, or any with ``masked=True`` (:func:`solarjax.attention.mask_path`: quantized
    eval), gets one mask per kind built here, once, that every layer reuses. With several kinds
    (Gemma 3's sliding and global layers) a scanned layer picks its kernel with ``lax.switch``
    (fused kernels need static windows, so each kind is its own kernel).
    """
    sharding = _ACTIVATION_SHARDING.get()
    if masked:
        impl = attn.mask_path(cfg.attention)
    else:
        impl = attn.resolve(cfg.attention, cfg.compute_dtype, attn.platform_of(sharding))
    scale = attention_scale(cfg)

    def kind_fn(kind: int) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        window = cfg.kind_window(kind)
        if attn.IMPLEMENTATIONS[impl].fused:
            return attn.fused_attention_fn(segment_ids, impl=impl, window=window, max_segments=cfg.max_segments,
                                           batch_sharding=sharding, scale=scale)
        mask = attention_mask(positions, positions, segment_ids, segment_ids, window)
        return lambda q, k, v: attn.masked_attention(q, k, v, mask, impl, scale)

    fns = [kind_fn(k) for k in range(cfg.n_kinds)]

    def attend(kind, layer_index, q, k, v, cache):
        if len(fns) == 1:
            return fns[0](q, k, v), cache
        if isinstance(kind, (int, np.integer)):  # the decode layout's Python loop: the kind is known
            return fns[kind](q, k, v), cache
        return jax.lax.switch(kind, fns, q, k, v), cache

    return attend


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a config name (None: do not remat); the names and what each
    keeps are :data:`solarjax.config.REMAT_POLICIES`."""
    return REMAT_POLICIES[name]


# ----------------------------------------------------------------------------- the layer loop

# ``attend(kind, layer_index, q, k, v, cache) -> (out, cache)``: a layer's attention given its rotated
# queries, keys and values; ``kind`` (the layer's attention kind: sliding or global) and
# ``layer_index`` are traced ints under the scan and Python ints in the decode layout. ``cache`` is
# whatever the caller threads through the layers (a KV cache, or None); it is carried, so a cache
# written with ``dynamic_update_slice`` is updated in place.
Attend = Callable[[Any, Any, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def dense_layer(layer: Params, dtype: Any) -> Params:
    """One layer's leaves as plain arrays: a weight-only quantized leaf (:class:`solarjax.quant.Quantized`,
    anything with ``.dense(dtype)``) becomes ``values * scale`` here, inside the loop body, so XLA
    fuses the dequantize into the matmul instead of materializing a float copy of the model. On CPU,
    the decode layout's int8 projections stay int8 for the FFI kernel (:mod:`solarjax.kernels.cpu_int8`)."""
    kept = cpu_int8.in_place_weights(layer, dtype)
    return {k: kept[k] if k in kept else v.dense(dtype) if hasattr(v, "dense") else v for k, v in layer.items()}


def run_layers(layers: Params | tuple[Params, ...], x: jax.Array, positions: jax.Array, cfg: ModelConfig,
               attend: Attend, cache: Any = None, *, valid: jax.Array | None = None, with_stats: bool = False,
               unroll: int | bool = 1) -> tuple[jax.Array, Any, Any]:
    """The decoder stack: every caller's one loop over layers (training, eval, quantized eval,
    KV-cache prefill and decode). Returns ``(x, cache, stats)``.

    ``layers`` is ``params["layers"]``: stacked on axis 0 (one ``lax.scan``, the body under the
    configured remat policy, ``unroll`` passed on) or the decode layout (a tuple of per-layer dicts,
    :func:`solarjax.decode_layout.unstack_layers`: the same body called once per layer in Python,
    so each matmul reads its weights in place). Each layer: dequantize (:func:`dense_layer`), norm
    and project (fused ``wqkv`` or not), RoPE of its attention kind, ``attend``, output projection
    and MLP or Mixture-of-Experts block. ``with_stats``: also the router statistics of every MoE
    layer, stacked on axis 0 (``valid`` (B, T) marks the tokens they count); else ``stats`` is None.
    """
    cos_all, sin_all = rope_tables(positions, cfg)  # per attention kind (Gemma 3: sliding / global)

    def layer_step(carry, layer, index, kind):
        x, cache = carry
        x = checkpoint_name(x, "layer_input")  # what remat's offload_input moves to host memory
        layer = dense_layer(layer, cfg.compute_dtype)
        q, k, v = qkv_projection(x, layer, pick(cos_all, kind), pick(sin_all, kind), cfg)
        out, cache = attend(kind, index, q, k, v, cache)
        x, stats = finish_layer_with_stats(x, out, layer, cfg, valid)
        return (constrain_activations(x), cache), (stats if with_stats else None)

    def remat(step):
        if cfg.remat == "none":
            return step
        return jax.checkpoint(step, policy=remat_policy(cfg.remat), prevent_cse=False)

    if isinstance(layers, (tuple, list)):  # index and kind stay Python ints: static slices of the cache
        carry, outs = (x, cache), []
        for index, (layer, kind) in enumerate(zip(layers, cfg.layer_kinds)):
            carry, out = remat(lambda c, w, i=index, k=kind: layer_step(c, w, i, k))(carry, layer)
            outs.append(out)
        stats = None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
        indices = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        carry, stats = jax.lax.scan(remat(lambda c, xs: layer_step(c, *xs)), (x, cache),
                                    (layers, indices, layer_kinds(cfg)), unroll=unroll)
    return carry[0], carry[1], stats


# Sharding of (batch, seq, d_model) activations while a step is traced; None: leave it to XLA.
_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(sharding: Any) -> Iterator[None]:
    """Pin the residual stream to ``sharding`` (e.g. batch over data+fsdp) in code traced inside.

    Without it XLA's sharding propagation can follow the FSDP-sharded weights (embed dim) into the
    activations and run every layer on the whole global batch, all-reducing full-batch logits:
    ``solarjax aot`` measured 4.35 GB instead of 0.29 GB of temporaries per v5p chip on 64 chips.
    """
    token = _ACTIVATION_SHARDING.set(sharding)
    try:
        yield
    finally:
        _ACTIVATION_SHARDING.reset(token)


def batch_shards() -> int:
    """How many ways the traced batch is split (1 outside a mesh): per-device sizes for tiling."""
    sharding = _ACTIVATION_SHARDING.get()
    if sharding is None or sharding.spec[0] is None:
        return 1
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def constrain_activations(x: jax.Array) -> jax.Array:
    sharding = _ACTIVATION_SHARDING.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def embed_multiplier(cfg: ModelConfig, dtype: Any) -> jax.Array | None:
    """sqrt(d_model) in the embedding's dtype for families that scale embeddings (Gemma), else None."""
    if not family(cfg).scale_embeddings:
        return None
    return jnp.asarray(math.sqrt(cfg.d_model), jnp.float32).astype(dtype)


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    rows = jnp.take(params["embed"], tokens, axis=0)
    scale = embed_multiplier(cfg, rows.dtype)
    return (rows if scale is None else rows * scale).astype(cfg.compute_dtype)


def head_matrix(params: Params, cfg: ModelConfig) -> jax.Array:
    """The ``(d_model, vocab)`` output projection: the embedding's transpose when tied."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def lm_head(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and vocabulary projection; fp32 logits."""
    x = norm(x, params["final_norm"], cfg)
    if cfg.tie_embeddings:  # contract the (vocab, d) table on d: XLA:CPU copies a transposed operand
        return jnp.einsum("btd,vd->btv", x, params["embed"].astype(x.dtype)).astype(jnp.float32)
    return jnp.einsum("btd,dv->btv", x, params["lm_head"].astype(x.dtype)).astype(jnp.float32)


def default_positions(tokens: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """0..T-1 per row, restarting at every segment boundary when segment ids are given."""
    batch, seq = tokens.shape
    idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if segment_ids is None:
        return idx
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


def hidden_states(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Run the stack and return the last hidden states (before the final norm)."""
    return hidden_states_and_aux(params, tokens, cfg, positions=positions, segment_ids=segment_ids)[0]


def hidden_states_and_aux(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`hidden_states` and, for a Mixture-of-Experts model, its auxiliary losses and expert
    metrics (:func:`solarjax.moe.aux_losses`; padding, segment 0, not counted); ``{}`` if dense."""
    if positions is None:
        positions = default_positions(tokens, segment_ids)
    x = constrain_activations(embed(params, tokens, cfg))
    valid = None if segment_ids is None else segment_ids != 0
    x, _, stats = run_layers(params["layers"], x, positions, cfg, sequence_attention(cfg, positions, segment_ids),
                             valid=valid, with_stats=True)
    if stats is None:
        return x, {}
    return x, moe.aux_losses(stats, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward_jit(params: Params, tokens: jax.Array, cfg: ModelConfig, positions=None, segment_ids=None) -> jax.Array:
    """``forward`` under jit, for callers that do not wrap it themselves."""
    return forward(params, tokens, cfg, positions=positions, segment_ids=segment_ids)


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: ModelConfig,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Tokens (batch, seq) -> float32 logits (batch, seq, vocab).

    ``segment_ids`` (batch, seq) keep packed documents from attending to each other (use 0 for
    padding); ``positions`` default to 0.. within each segment.
    """
    x = hidden_states(params, tokens, cfg, positions=positions, segment_ids=segment_ids)
    return lm_head(params, x, cfg)
