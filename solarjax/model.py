"""A pure-functional Llama/Mistral decoder.

Params are a plain pytree of arrays. Every per-layer weight lives under ``params["layers"]``
stacked on axis 0, so the forward pass is one ``jax.lax.scan`` over layers and depth up-scaling
is array slicing. Weight layouts keep heads as their own axis (``wq: (L, d_model, n_heads,
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
from jax.ad_checkpoint import checkpoint_name

from solarjax import attention as attn
from solarjax.config import ModelConfig

Params = dict[str, Any]

# Logical axis names of every parameter dimension; sharding rules map these to mesh axes.
LAYER_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads", "head_dim"),
    "wk": ("layers", "embed", "kv_heads", "head_dim"),
    "wv": ("layers", "embed", "kv_heads", "head_dim"),
    "wo": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "embed"),
    "w_gate": ("layers", "embed", "mlp"),
    "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
}


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every parameter, as a pytree of tuples mirroring ``init_params``."""
    L, d, hd, f = cfg.n_layers, cfg.d_model, cfg.head_dim, cfg.ffn_dim
    layers = {
        "attn_norm": (L, d),
        "wq": (L, d, cfg.n_heads, hd),
        "wk": (L, d, cfg.n_kv_heads, hd),
        "wv": (L, d, cfg.n_kv_heads, hd),
        "wo": (L, cfg.n_heads, hd, d),
        "mlp_norm": (L, d),
        "w_gate": (L, d, f),
        "w_up": (L, d, f),
        "w_down": (L, f, d),
    }
    shapes: Params = {"embed": (cfg.vocab_size, d), "layers": layers, "final_norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names for every parameter, same tree structure as the params."""
    axes: Params = {"embed": ("vocab", "embed"), "layers": dict(LAYER_AXES), "final_norm": ("embed",)}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def abstract_params(cfg: ModelConfig) -> Params:
    """``jax.ShapeDtypeStruct`` leaves: the params without allocating them (for AOT and restore)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, cfg.weight_dtype), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )


def init_params(key: jax.Array, cfg: ModelConfig, init_std: float = 0.02) -> Params:
    """Random init as HF does it: norms at one, every matrix normal with ``initializer_range``."""
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    paths_shapes, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)
    keys = jax.random.split(key, len(paths_shapes))
    leaves = [
        jnp.ones(shape, cfg.weight_dtype)
        if "norm" in jax.tree_util.keystr(path)
        else (init_std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.weight_dtype)
        for (path, shape), k in zip(paths_shapes, keys)
    ]
    return jax.tree.unflatten(treedef, leaves)


def compute_params(params: Params, cfg: ModelConfig) -> Params:
    """Matmul weights cast to the compute dtype once, before the layer scan.

    Done per step rather than per matmul so remat's recomputation and FSDP's all-gathers move
    bf16 copies, not fp32 masters; gradients flow back to the fp32 masters through the cast.
    Norm scales (kept fp32: the norm runs in fp32) and the embedding table (a gather whose
    scatter-add gradient would lose precision in bf16) stay as they are.
    """
    dtype = cfg.compute_dtype
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    matrix = lambda axes: len([a for a in axes if a != "layers"]) >= 2  # noqa: E731

    def cast(axes, leaf, top):
        return leaf.astype(dtype) if matrix(axes) and top != "embed" else leaf

    axes = param_axes(cfg)
    out = {top: jax.tree.map(lambda a, leaf, top=top: cast(a, leaf, top), axes[top], params[top], is_leaf=is_axes)
           for top in axes}
    return {**params, **out}


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, as HF does, then cast back."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape (batch, seq, head_dim) in HF's rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


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


def _reference_attention(q, k, v, mask):
    """Plain einsum attention in float32: the readable oracle for the fused path."""
    groups = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores / jnp.sqrt(q.shape[-1]).astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v.astype(jnp.float32)).astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str) -> jax.Array:
    """Grouped-query attention over (batch, seq, heads, head_dim) tensors with an explicit mask.

    The mask path (KV-cache decoding, CPU training): ``auto`` and ``splash`` have no masked form,
    so they run XLA here; ``cudnn`` takes the mask as cuDNN's bias.
    """
    if impl == "reference":
        return _reference_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else "xla")


def mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU feed-forward."""
    gate = jnp.einsum("btd,df->btf", x, w_gate.astype(x.dtype))
    up = jnp.einsum("btd,df->btf", x, w_up.astype(x.dtype))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w_down.astype(x.dtype))


def qkv_projection(x: jax.Array, layer: Params, cos: jax.Array, sin: jax.Array, cfg: ModelConfig):
    """Normed input -> rotated queries and keys, and values."""
    h = rms_norm(x, layer["attn_norm"], cfg.rms_eps)
    q = jnp.einsum("btd,dnh->btnh", h, layer["wq"].astype(x.dtype))
    k = jnp.einsum("btd,dnh->btnh", h, layer["wk"].astype(x.dtype))
    v = jnp.einsum("btd,dnh->btnh", h, layer["wv"].astype(x.dtype))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")


def finish_layer(x: jax.Array, attn_out: jax.Array, layer: Params, cfg: ModelConfig) -> jax.Array:
    """Output projection, residual, then the MLP block with its residual."""
    attn_out = checkpoint_name(attn_out, "attn_out")
    x = x + jnp.einsum("btnh,nhd->btd", attn_out, layer["wo"].astype(x.dtype))
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_eps)
    return x + mlp(h, layer["w_gate"], layer["w_up"], layer["w_down"])


def decoder_layer(x: jax.Array, layer: Params, cos: jax.Array, sin: jax.Array, cfg: ModelConfig,
                  self_attention: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]):
    """One pre-norm decoder block on (batch, seq, d_model) activations."""
    q, k, v = qkv_projection(x, layer, cos, sin, cfg)
    return finish_layer(x, self_attention(q, k, v), layer, cfg)


def self_attention_fn(cfg: ModelConfig, positions: jax.Array, segment_ids: jax.Array | None):
    """``(q, k, v) -> out`` for a whole sequence, with the backend's kernel (:mod:`solarjax.attention`).

    Fused kernels (splash on TPU, cuDNN on GPU) never build the (B, 1, T, T) mask; the XLA and
    reference paths build it once here and every layer reuses it.
    """
    sharding = _ACTIVATION_SHARDING.get()
    impl = attn.resolve(cfg.attention, cfg.compute_dtype, attn.platform_of(sharding))
    if impl in attn.FUSED:
        return attn.fused_attention_fn(segment_ids, impl=impl, window=cfg.sliding_window,
                                       max_segments=cfg.max_segments, batch_sharding=sharding)
    mask = attention_mask(positions, positions, segment_ids, segment_ids, cfg.sliding_window)
    return lambda q, k, v: attend(q, k, v, mask, impl)


def remat_policy(name: str):
    """Map a config name to a ``jax.checkpoint`` policy (None means: do not remat).

    What each layer keeps for the backward pass (measured memory/speed: README, "Remat policies"):
    ``none`` everything (fastest, most memory); ``dots`` / ``dots_with_no_batch_dims`` every matmul
    output (little recompute, the MLP's wide activations dominate memory); ``save_qkv_attn`` the
    attention inputs, its output and the kernel's log-sum-exp, recomputing only the MLP (fused
    attention is never rerun); ``save_attn_out`` only the attention output; ``full`` nothing but
    the layer input (least memory, about one extra forward).
    """
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
        "save_qkv_attn": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out",
                                                                        "attn_lse"),
    }
    return policies[name]



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


def embed(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.compute_dtype)


def head_matrix(params: Params, cfg: ModelConfig) -> jax.Array:
    """The ``(d_model, vocab)`` output projection: the embedding's transpose when tied."""
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def lm_head(params: Params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm and vocabulary projection; fp32 logits."""
    x = rms_norm(x, params["final_norm"], cfg.rms_eps)
    return jnp.einsum("btd,dv->btv", x, head_matrix(params, cfg).astype(x.dtype)).astype(jnp.float32)


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
    if positions is None:
        positions = default_positions(tokens, segment_ids)
    x = constrain_activations(embed(params, tokens, cfg))
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    self_attention = self_attention_fn(cfg, positions, segment_ids)

    def body(carry, layer):
        return constrain_activations(decoder_layer(carry, layer, cos, sin, cfg, self_attention)), None

    policy = remat_policy(cfg.remat)
    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"])
    return x


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
