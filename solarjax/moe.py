"""Mixture-of-Experts MLP: top-k routing, dropless dispatch, auxiliary losses and expert metrics.

The alternative SOLAR argues against (Mixtral, OLMoE), in the same stacked-layer model: a layer
whose ``params["layers"]`` hold ``w_router (L, d, E)`` and expert weights ``w_gate/w_up (L, E, d, f)``
and ``w_down (L, E, f, d)`` runs this block instead of the dense gated MLP.

Routing is softmax over all experts, then the top k (``norm_topk_prob`` renormalises those k
weights: Mixtral does, OLMoE does not), computed in float32. Dispatch is *dropless*: every token
reaches its k experts, no capacity factor.

- ``ragged`` (``auto`` on GPU): the N*k assignments are sorted by expert and each expert's
  contiguous group goes through ``jax.lax.ragged_dot`` (grouped matmuls). FLOPs are those of the
  k chosen experts only, where the backend has a grouped kernel (on GPU: not yet measured).
- ``blocked`` (``auto`` on CPU): the sorted groups padded to whole row blocks, one plain GEMM per
  block in a ``lax.scan`` with that block's expert weights. XLA:CPU lowers ``ragged_dot`` to a
  masked dense matmul over every expert (35 ms where a GEMM of the same FLOPs takes 4 ms, d 256,
  8 experts, 2048 rows); blocks waste at most one partial block per expert.
- ``megablox`` (``auto`` on TPU): the same sorted dispatch through JAX's Pallas TPU grouped
  matmul (``jax.experimental.pallas.ops.tpu.megablox``, MaxText's kernel). libtpu 0.10.2 fails
  to compile ``lax.ragged_dot`` inside the sharded training step (an internal RET_CHECK,
  reproduced with ``solarjax aot``), and the kernel is the tuned path anyway.
- ``dense``: every expert on every token, combined with the (mostly zero) routing weights;
  E/k times the FLOPs, kept as the readable reference the ragged path is tested against.

Sharding (``experts`` logical axis, default rule ``experts -> fsdp``): experts are sharded like
FSDP, not expert-parallel. At rest each device holds E/fsdp experts; the block runs in
``shard_map`` over the batch axes with the expert weights gathered whole, so every device routes
and sorts only its own tokens (a global sort would gather the batch). We chose this over
all-to-all expert parallelism because dropless dispatch sends a data-dependent number of tokens to
each device, which all-to-all can only do with capacity buffers (dropping tokens) or ragged
all-to-all; at the scales solarjax upcycles (≤ a few B parameters) the gathered experts of one
layer fit easily. A mesh that does not divide the experts is a ``ShardingError`` before compiling.

Auxiliary losses, per layer then averaged over layers (padding, ``segment_ids == 0``, excluded):
- load balancing (Switch Transformer eq. 4 with top-k, as transformers' Mixtral/OLMoE):
  ``E * sum_i f_i * P_i`` with ``f_i = count_i / N`` (assignments to expert i per token) and
  ``P_i`` the mean router probability of expert i; k at perfect balance. transformers pools the
  counts of all layers before multiplying; per layer is the paper's form (equal for one layer).
- router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``.
Metrics: each expert's share of the assignments (``expert_load``, sums to 1 per layer) and the
mean router entropy.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from solarjax import families
from solarjax.config import ConfigError, ModelConfig
from solarjax.ffn import mlp


class Routing(NamedTuple):
    weights: jax.Array  # (N, k) float32: each chosen expert's weight
    experts: jax.Array  # (N, k) int32: the chosen experts
    logits: jax.Array  # (N, E) float32 router logits
    probs: jax.Array  # (N, E) float32 softmax of the logits


def route(h: jax.Array, w_router: jax.Array, cfg: ModelConfig) -> Routing:
    """Softmax over the experts, then top-k (renormalised when ``cfg.norm_topk_prob``), in float32."""
    logits = jnp.einsum("nd,de->ne", h.astype(jnp.float32), w_router.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), logits, probs)


# ----------------------------------------------------------------------------- dispatch

def ragged_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, activation: Callable) -> jax.Array:
    """Dropless dispatch: sort the N*k assignments by expert, grouped matmuls, unsort, weight, sum.

    ``x`` (N, d); ``weights``/``experts`` (N, k); expert weights (E, d, f) and (E, f, d).
    """
    return _sorted_experts(x, weights, experts, w_gate, w_up, w_down, activation, jax.lax.ragged_dot)


def _sorted_experts(x, weights, experts, w_gate, w_up, w_down, activation, grouped_matmul) -> jax.Array:
    """Sort the assignments by expert, run ``grouped_matmul(rows, (E, a, b) weights, group sizes)``."""
    n, k = experts.shape
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = jnp.take(x, order // k, axis=0)  # (N*k, d), grouped by expert
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    gate = grouped_matmul(rows, w_gate.astype(x.dtype), sizes)
    up = grouped_matmul(rows, w_up.astype(x.dtype), sizes)
    out = grouped_matmul(activation(gate) * up, w_down.astype(x.dtype), sizes)  # (N*k, d)
    out = jnp.take(out, jnp.argsort(order), axis=0).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out.astype(jnp.float32), weights).astype(x.dtype)


MEGABLOX_TILE = 128


def megablox_matmul(rows: jax.Array, w: jax.Array, sizes: jax.Array, interpret: bool = False) -> jax.Array:
    """Pallas TPU grouped matmul; rows padded to whole tiles (the padding belongs to no group)."""
    from jax.experimental.pallas.ops.tpu.megablox import ops

    m = rows.shape[0]
    padded = -(-m // MEGABLOX_TILE) * MEGABLOX_TILE
    rows = jnp.pad(rows, ((0, padded - m), (0, 0)))
    tiling = (MEGABLOX_TILE,) * 3  # the backward reuses it with k and n swapped
    out = ops.gmm(rows, w, sizes, rows.dtype, tiling, None, None, False, interpret)
    return out[:m]


def megablox_experts(x, weights, experts, w_gate, w_up, w_down, activation, interpret: bool = False) -> jax.Array:
    """:func:`ragged_experts` with the Megablox kernel (``interpret``: on CPU, for tests)."""
    matmul = functools.partial(megablox_matmul, interpret=interpret)
    return _sorted_experts(x, weights, experts, w_gate, w_up, w_down, activation, matmul)


def dense_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, activation: Callable) -> jax.Array:
    """Every expert on every token, combined with the routing weights (zero for experts not chosen)."""
    num_experts = w_gate.shape[0]
    gate = jnp.einsum("nd,edf->nef", x, w_gate.astype(x.dtype))
    up = jnp.einsum("nd,edf->nef", x, w_up.astype(x.dtype))
    out = jnp.einsum("nef,efd->ned", activation(gate) * up, w_down.astype(x.dtype))
    combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, num_experts, dtype=jnp.float32))
    return jnp.einsum("ned,ne->nd", out.astype(jnp.float32), combine).astype(x.dtype)


def block_rows(rows: int, num_experts: int, largest: int = 128) -> int:
    """Rows per block: ``largest``, or a power of two near rows/expert when there are few rows
    (decoding one token must not compute E blocks of 128 rows)."""
    per_expert = max(1, rows // num_experts)
    return min(largest, 1 << (per_expert.bit_length() - 1))


def blocked_experts(x, weights, experts, w_gate, w_up, w_down, activation, block: int | None = None) -> jax.Array:
    """Dropless dispatch as one GEMM per block: assignments sorted by expert, each expert's group
    padded to whole blocks of ``block`` rows (default :func:`block_rows`), a ``lax.scan`` over the
    blocks (a static upper bound: ``(N k + E (block - 1)) / block``; trailing blocks are zeros)."""
    n, k = experts.shape
    num_experts, d = w_gate.shape[0], x.shape[1]
    m = n * k
    block = block or block_rows(m, num_experts)
    n_blocks = (m + num_experts * (block - 1)) // block
    flat = experts.reshape(-1)
    sizes = jnp.bincount(flat, length=num_experts)
    starts = jnp.cumsum(sizes) - sizes
    padded_ends = jnp.cumsum(-(-sizes // block) * block)
    padded_starts = padded_ends - -(-sizes // block) * block
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    slots_sorted = padded_starts[sorted_experts] + jnp.arange(m) - starts[sorted_experts]
    slots = jnp.zeros((m,), jnp.int32).at[order].set(slots_sorted.astype(jnp.int32))  # each assignment's row
    padded = jnp.zeros((n_blocks * block, d), x.dtype).at[slots].set(jnp.repeat(x, k, axis=0))
    block_expert = jnp.searchsorted(padded_ends, jnp.arange(n_blocks) * block, side="right")
    block_expert = jnp.minimum(block_expert, num_experts - 1)  # trailing all-zero blocks: any expert
    w_gate, w_up, w_down = (w.astype(x.dtype) for w in (w_gate, w_up, w_down))

    def one_block(_, xs):
        rows, e = xs
        return None, (activation(rows @ w_gate[e]) * (rows @ w_up[e])) @ w_down[e]

    _, out = jax.lax.scan(one_block, None, (padded.reshape(n_blocks, block, d), block_expert))
    out = jnp.take(out.reshape(n_blocks * block, d), slots, axis=0).reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", out.astype(jnp.float32), weights).astype(x.dtype)


DISPATCH = {"ragged": ragged_experts, "blocked": blocked_experts, "megablox": megablox_experts,
            "dense": dense_experts}


def dispatch_fn(cfg: ModelConfig, platform: str) -> Callable:
    """The dispatch for ``cfg.moe_dispatch`` on ``platform`` (``auto``: megablox on TPU, blocked on
    CPU, ragged on GPU).
    Megablox off TPU runs interpreted, but only inside :func:`solarjax.attention.kernels_interpreted`
    (tests); otherwise asking for it is a ConfigError."""
    from solarjax.attention import interpreting

    name = cfg.moe_dispatch
    if name == "auto":
        name = {"tpu": "megablox", "cpu": "blocked"}.get(platform, "ragged")
    if name == "megablox" and (cfg.d_model % MEGABLOX_TILE or cfg.expert_ffn_dim % MEGABLOX_TILE):
        raise ConfigError(f"moe_dispatch={cfg.moe_dispatch!r} uses Megablox on TPU, whose tiles need d_model "
                          f"({cfg.d_model}) and the experts' hidden size ({cfg.expert_ffn_dim}) to be multiples of "
                          f"{MEGABLOX_TILE}")
    if name == "megablox" and platform != "tpu":
        if not interpreting():
            raise ConfigError(f"moe_dispatch='megablox' is a TPU kernel and the backend is {platform!r}; "
                              "use moe_dispatch='auto' (or 'ragged')")
        return functools.partial(megablox_experts, interpret=True)
    return DISPATCH[name]


# ----------------------------------------------------------------------------- the block

def router_stats(routing: Routing, valid: jax.Array, num_experts: int) -> dict[str, jax.Array]:
    """Sums over the valid tokens of one layer (global: reductions over the sharded batch), from
    which :func:`aux_losses` forms the losses and metrics."""
    assigned = jnp.sum(jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32), axis=1)  # (N, E)
    log_probs = jax.nn.log_softmax(routing.logits, axis=-1)
    entropy = -jnp.sum(routing.probs * log_probs, axis=-1)
    z = jnp.square(jax.nn.logsumexp(routing.logits, axis=-1))
    return {
        "assignments": jnp.einsum("ne,n->e", assigned, valid),
        "prob_sum": jnp.einsum("ne,n->e", routing.probs, valid),
        "z_sum": jnp.sum(z * valid),
        "entropy_sum": jnp.sum(entropy * valid),
        "tokens": jnp.sum(valid),
    }


def moe_block(h: jax.Array, layer: dict[str, Any], cfg: ModelConfig, activation: Callable,
              valid: jax.Array | None = None, batch_sharding: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The MoE MLP on normed activations ``h`` (B, T, d) -> (output, router stats).

    ``valid`` (B, T) marks real tokens for the statistics (None: all). ``batch_sharding`` (the
    activations' ``NamedSharding``, inside a mesh) runs the dispatch per device in ``shard_map``.
    """
    batch, seq, d = h.shape
    routing = route(h.reshape(-1, d), layer["w_router"], cfg)
    valid = jnp.ones((batch * seq,), jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
    stats = router_stats(routing, valid, cfg.n_experts)
    weights = routing.weights.reshape(batch, seq, -1)
    experts = routing.experts.reshape(batch, seq, -1)
    from solarjax.attention import platform_of

    dispatch = dispatch_fn(cfg, platform_of(batch_sharding))

    def local(h, weights, experts, w_gate, w_up, w_down):
        b, t, _ = h.shape
        out = dispatch(h.reshape(-1, d), weights.reshape(b * t, -1), experts.reshape(b * t, -1), w_gate, w_up, w_down,
                       activation)
        return out.reshape(b, t, d)

    args = (h, weights, experts, layer["w_gate"], layer["w_up"], layer["w_down"])
    shared = shared_expert(h, layer, cfg) if "w_shared_gate" in layer else 0
    if batch_sharding is None or batch_sharding.spec[0] is None:
        return local(*args) + shared, stats
    rows = P(batch_sharding.spec[0], None, None)
    out = jax.shard_map(local, mesh=batch_sharding.mesh, in_specs=(rows, rows, rows, P(), P(), P()),
                        out_specs=rows, check_vma=False)(*args)  # Pallas outputs carry no varying-axes type
    return out + shared, stats


def shared_expert(h: jax.Array, layer: dict[str, Any], cfg: ModelConfig) -> jax.Array:
    """Qwen2-MoE's shared expert: the family's gated MLP on every token, scaled by
    ``sigmoid(h @ w_shared_router)``."""
    out = mlp(h, layer["w_shared_gate"], layer["w_shared_up"], layer["w_shared_down"], families.get(cfg.arch).activation)
    scale = jax.nn.sigmoid(jnp.einsum("btd,do->bto", h.astype(jnp.float32), layer["w_shared_router"].astype(jnp.float32)))
    return (out.astype(jnp.float32) * scale).astype(h.dtype)


def aux_losses(stats: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """Per-layer router stats (leading layer axis) -> the losses (averaged over layers) and metrics."""
    tokens = jnp.maximum(stats["tokens"], 1.0)[:, None]
    f = stats["assignments"] / tokens  # (L, E): assignments per token
    p = stats["prob_sum"] / tokens  # (L, E): mean router probability
    balance = cfg.n_experts * jnp.sum(f * p, axis=-1)
    return {
        "moe_balance_loss": jnp.mean(balance),
        "moe_z_loss": jnp.mean(stats["z_sum"] / tokens[:, 0]),
        "router_entropy": jnp.mean(stats["entropy_sum"] / tokens[:, 0]),
        "expert_load": f / cfg.experts_per_token,  # (L, E): each expert's share of the assignments
    }


def weighted_aux_loss(aux: dict[str, jax.Array], cfg: ModelConfig) -> jax.Array:
    """The term the training loss adds: ``router_aux_loss_coef * balance + router_z_loss_coef * z``."""
    return cfg.router_aux_loss_coef * aux["moe_balance_loss"] + cfg.router_z_loss_coef * aux["moe_z_loss"]


def scalar_metrics(aux: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """The training log's MoE figures: both losses, router entropy, each expert's load relative to
    perfect balance averaged over layers (``expert_load``, 1.0 = 1/E of the assignments) and the
    busiest and idlest expert of any layer."""
    load = aux["expert_load"] * cfg.n_experts
    return {"moe_balance_loss": aux["moe_balance_loss"], "moe_z_loss": aux["moe_z_loss"],
            "router_entropy": aux["router_entropy"], "expert_load": jnp.mean(load, axis=0),
            "expert_load_max": jnp.max(load), "expert_load_min": jnp.min(load)}
