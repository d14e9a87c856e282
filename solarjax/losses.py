"""Cross-entropy over the vocabulary without materialising the (B, T, V) fp32 logits.

The output projection of a 32k–150k vocabulary is the largest activation of a small model: fp32
logits for 4 × 2048 tokens and 32k entries are 1 GiB, and autodiff keeps them plus their
gradient. :func:`chunked_cross_entropy` walks the sequence in chunks inside a ``lax.scan`` with
its own VJP (as Levanter's and MaxText's blockwise losses do): the forward keeps only the
log-normaliser per token; the backward recomputes each chunk's logits, forms
``softmax - onehot`` and accumulates the head's gradient in fp32. Peak memory is one chunk of
logits. Matmuls run in the compute dtype with fp32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
