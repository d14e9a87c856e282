"""Cross-entropy over the vocabulary without materialising the (B, T, V) fp32 logits.

The output projection of a 32k–150k vocabulary is the largest activation of a small model: fp32
logits for 4 × 2048 tokens and 32k entries are 1 GiB, and autodiff keeps them plus their
gradient. :func:`chunked_cross_entropy` walks the sequence in chunks inside a ``lax.scan`` with
its own VJP (as Levanter's and MaxText's blockwise losses do): the forward keeps only the
log-normaliser per token; the backward recomputes each chunk's logits, forms
``softmax - onehot`` and accumulates the head's gradient in fp32. Peak memory is one chunk of
logits. Matmuls run in the compute dtype with fp32 accumulation.

Every training loss has one shape, :class:`LossFn` ``(params, batch, cfg) -> (loss, metrics)``:
what the train step differentiates. :func:`next_token_loss` (pretraining and SFT, through
:func:`default_loss`) and :func:`make_dpo_loss_fn` (DPO) are the two; a new objective is one more
function of that shape here, plugged in by a ``Task``'s ``loss_fn``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from solarjax import moe
from solarjax import sharding as shd
from solarjax.config import ConfigError, ModelConfig
from solarjax.model import Params, batch_shards, compute_params, head_matrix, hidden_states_and_aux, lm_head, norm

Batch = dict[str, jax.Array]
DPO_LOSS_TYPES = ("sigmoid", "ipo")


class LossFn(Protocol):
    """A training loss: the scalar the step differentiates and the metrics it logs (``loss``, ...)."""

    def __call__(self, params: Params, batch: Batch, cfg: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]: ...

# Tokens (batch rows x positions) per chunk: ~0.5 GiB of fp32 logits at a 32k vocabulary.
CHUNK_TOKENS = 4096


def chunk_length(batch: int, seq: int, target_tokens: int = CHUNK_TOKENS) -> int:
    """The largest divisor of ``seq`` with ``batch * chunk <= target_tokens`` (at least 1)."""
    limit = max(1, target_tokens // max(batch, 1))
    return max(c for c in range(1, min(seq, limit) + 1) if seq % c == 0)


def _chunks(x: jax.Array, n: int) -> jax.Array:
    """(B, T, ...) -> (n, B, T/n, ...): the scan axis first, rows keep their sharding."""
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(b, n, t // n, *x.shape[2:]), 0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
    n, b, c = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _logits(x: jax.Array, head: jax.Array) -> jax.Array:
    return jnp.einsum("btd,dv->btv", x, head, preferred_element_type=jnp.float32)


def _forward(x, head, targets, n_chunks, keep: bool = False):
    """Per-token cross-entropy and log-normaliser, chunk by chunk; ``keep``: instead of the
    log-normaliser, every chunk's ``softmax - onehot`` in the compute dtype (chunked layout)."""
    def body(_, chunk):
        xc, tc = chunk
        logits = _logits(xc, head)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        if not keep:
            return None, (lse - target_logit, lse)
        onehot = jax.nn.one_hot(tc, head.shape[1], dtype=logits.dtype)
        return None, (lse - target_logit, (jnp.exp(logits - lse[..., None]) - onehot).astype(x.dtype))

    _, (ce, extra) = jax.lax.scan(body, None, (_chunks(x, n_chunks), _chunks(targets, n_chunks)))
    return _unchunk(ce), (extra if keep else _unchunk(extra))


def _head_step(d_head, xc, d_logits, head):
    """One chunk of the backward: the head's gradient accumulated in fp32, and the chunk's ``dx``."""
    dx = jnp.einsum("btv,dv->btd", d_logits, head, preferred_element_type=jnp.float32).astype(xc.dtype)
    return d_head + jnp.einsum("btd,btv->dv", xc, d_logits, preferred_element_type=jnp.float32), dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_ce(x, head, targets, n_chunks):
    return _forward(x, head, targets, n_chunks)[0]


def _chunked_ce_fwd(x, head, targets, n_chunks):
    ce, lse = _forward(x, head, targets, n_chunks)
    return ce, (x, head, targets, lse)


def _chunked_ce_bwd(n_chunks, residuals, g):
    x, head, targets, lse = residuals

    def body(d_head, chunk):
        xc, tc, lc, gc = chunk
        probs = jnp.exp(_logits(xc, head) - lc[..., None])
        onehot = jax.nn.one_hot(tc, head.shape[1], dtype=probs.dtype)
        d_logits = ((probs - onehot) * gc[..., None]).astype(x.dtype)
        return _head_step(d_head, xc, d_logits, head)

    chunks = tuple(_chunks(a, n_chunks) for a in (x, targets, lse, g))
    d_head, dx = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), chunks)
    return _unchunk(dx), d_head.astype(head.dtype), None


_chunked_ce.defvjp(_chunked_ce_fwd, _chunked_ce_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kept_ce(x, head, targets, n_chunks):
    return _forward(x, head, targets, n_chunks)[0]


def _kept_ce_fwd(x, head, targets, n_chunks):
    ce, residual = _forward(x, head, targets, n_chunks, keep=True)
    return ce, (x, head, residual)


def _kept_ce_bwd(n_chunks, residuals, g):
    x, head, residual = residuals

    def body(d_head, chunk):
        xc, rc, gc = chunk
        d_logits = (rc.astype(jnp.float32) * gc[..., None]).astype(x.dtype)
        return _head_step(d_head, xc, d_logits, head)

    chunks = (_chunks(x, n_chunks), residual, _chunks(g, n_chunks))
    d_head, dx = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), chunks)
    return _unchunk(dx), d_head.astype(head.dtype), None


_kept_ce.defvjp(_kept_ce_fwd, _kept_ce_bwd)


def chunked_cross_entropy(x: jax.Array, head: jax.Array, targets: jax.Array,
                          chunk: int | None = None, recompute_logits: bool = True) -> jax.Array:
    """Per-token cross-entropy ``(B, T)`` (fp32) of ``softmax(x @ head)`` against ``targets``.

    ``x``: final-normed hidden states ``(B, T, d)``; ``head``: ``(d, V)`` in the compute dtype;
    ``chunk``: positions per chunk (default :func:`chunk_length`), must divide ``T``.
    ``recompute_logits=False``: the forward keeps ``softmax - onehot`` in the compute dtype (the
    dtype the backward's matmuls take anyway), one ``(B, T, V)`` tensor, and the backward skips
    the head matmul it would redo: 2 d V FLOPs per token fewer (what a TPU pod step trades).
    """
    batch, seq = targets.shape
    chunk = chunk or chunk_length(batch, seq)
    if seq % chunk:
        raise ValueError(f"loss chunk {chunk} does not divide the sequence length {seq}")
    return (_chunked_ce if recompute_logits else _kept_ce)(x, head, targets.astype(jnp.int32), seq // chunk)


# ----------------------------------------------------------------------------- next-token loss


def next_token_loss(params: Params, batch: Batch, cfg: ModelConfig, *, mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None, recompute_logits: bool = True,
                    chunk_tokens: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of ``targets`` over tokens where ``loss_mask`` is set.

    Weights are cast to the compute dtype once (:func:`solarjax.model.compute_params`) and the
    (B, T, V) fp32 logits never exist: the cross-entropy is chunked over positions with its own
    VJP (:func:`chunked_cross_entropy`). Given a ``mesh`` (and rules) that split
    the vocabulary, it runs vocab-parallel in ``shard_map`` instead
    (:func:`solarjax.sharding.vocab_parallel_cross_entropy`); :func:`default_loss` picks.
    """
    params = compute_params(params, cfg)
    x, aux = hidden_states_and_aux(params, batch["tokens"], cfg, positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
    x = norm(x, params["final_norm"], cfg)  # the family's norm (Gemma scales by 1 + w)
    head = head_matrix(params, cfg).astype(x.dtype)
    if mesh is None:
        batch_size, seq_len = batch["targets"].shape
        chunk = chunk_length(batch_size // batch_shards(), seq_len, chunk_tokens or CHUNK_TOKENS)  # per device
        ce = chunked_cross_entropy(x, head, batch["targets"], chunk, recompute_logits)
    else:
        ce = shd.vocab_parallel_cross_entropy(x, head, batch["targets"], mesh, rules)
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    loss = jnp.sum(jnp.where(mask > 0, ce, 0.0)) / jnp.maximum(tokens, 1.0)
    if not aux:
        return loss, {"loss": loss, "tokens": tokens}
    return loss + moe.weighted_aux_loss(aux, cfg), {"loss": loss, "tokens": tokens, **moe.scalar_metrics(aux, cfg)}


def default_loss(mesh: Mesh, rules: Mapping[str, Any] | None = None, recompute_logits: bool = True,
                 chunk_tokens: int | None = None) -> LossFn:
    """``next_token_loss``, vocab-parallel when the rules put the vocabulary on a mesh axis of size > 1;
    ``recompute_logits`` (``train.loss_recompute_logits``): see :func:`chunked_cross_entropy`;
    ``chunk_tokens`` (``train.loss_chunk_tokens``): tokens per loss chunk on each device (None: the default)."""
    if shd.logical_to_spec(("vocab",), shd.rules_from_config(rules), mesh)[0] is None:
        if recompute_logits and chunk_tokens is None:
            return next_token_loss
        return functools.partial(next_token_loss, recompute_logits=recompute_logits, chunk_tokens=chunk_tokens)
    return functools.partial(next_token_loss, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------- DPO


def sequence_logps(params: Params, batch: Mapping[str, jax.Array], cfg: ModelConfig,
                   average: bool = False, with_aux: bool = False):
    """Per row: the sum (or mean) of ``log p(target)`` over ``loss_mask`` tokens, fp32; with
    ``with_aux`` also the Mixture-of-Experts router losses of the same forward (``{}`` if dense)."""
    x, aux = hidden_states_and_aux(params, batch["tokens"], cfg, positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
    logp = -optax.softmax_cross_entropy_with_integer_labels(lm_head(params, x, cfg), batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    total = jnp.sum(logp * mask, axis=-1)
    total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0) if average else total
    return (total, aux) if with_aux else total


def dpo_loss(policy_logps: jax.Array, ref_logps: jax.Array, pair: jax.Array, *, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean DPO loss over the pairs in the rows, and its metrics; rows are matched by signed ``pair`` ids."""
    partner = (pair[:, None] == -pair[None, :]).astype(jnp.float32)  # chosen row i -> its rejected row
    ref_logps = jax.lax.stop_gradient(ref_logps)
    chosen = (pair > 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(chosen), 1.0)
    pc, pr = policy_logps, partner @ policy_logps
    rc, rr = ref_logps, partner @ ref_logps
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"dpo loss_type={loss_type!r} is not one of {DPO_LOSS_TYPES}")
    mean = lambda x: jnp.sum(chosen * x) / n  # noqa: E731
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    loss = mean(losses)
    return loss, {"loss": loss, "reward_accuracy": mean((chosen_reward > rejected_reward).astype(jnp.float32)),
                  "reward_margin": mean(chosen_reward - rejected_reward), "chosen_reward": mean(chosen_reward),
                  "rejected_reward": mean(rejected_reward), "chosen_logp": mean(pc), "rejected_logp": mean(pr)}


def make_dpo_loss_fn(beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """A trainer ``loss_fn(params, batch, cfg)``; the batch carries ``pair`` and ``ref_logps``."""
    def loss_fn(params, batch, cfg):
        logps, aux = sequence_logps(params, batch, cfg, average=loss_type == "ipo", with_aux=True)
        loss, metrics = dpo_loss(logps, batch["ref_logps"], batch["pair"], beta=beta,
                                 label_smoothing=label_smoothing, loss_type=loss_type)
        if not aux:
            return loss, metrics
        # an MoE policy keeps its router balanced while it is tuned, as in pretraining
        return loss + moe.weighted_aux_loss(aux, cfg), {**metrics, **moe.scalar_metrics(aux, cfg)}

    return loss_fn
