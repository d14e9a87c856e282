"""chunked_cross_entropy against cross-entropy and its gradient written out in NumPy (float64):
``ce = logsumexp(x W) - (x W)[target]``, ``d logits = (softmax - onehot) * g``; and against central
finite differences of the NumPy loss. (tests/test_attention.py also checks it against optax.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solarjax.losses import chunk_length, chunked_cross_entropy

B, T, D, V = 2, 12, 6, 40


def numpy_ce(x, head, targets):
    logits = np.asarray(x, np.float64) @ np.asarray(head, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0], logits, lse


def numpy_grads(x, head, targets, g):
    _, logits, lse = numpy_ce(x, head, targets)
    d_logits = (np.exp(logits - lse[..., None]) - np.eye(V)[targets]) * g[..., None]
    x64, head64 = np.asarray(x, np.float64), np.asarray(head, np.float64)
    return d_logits @ head64.T, np.einsum("btd,btv->dv", x64, d_logits)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((B, T, D)).astype(np.float32), rng.standard_normal((D, V)).astype(np.float32),
            rng.integers(0, V, (B, T)), rng.standard_normal((B, T)).astype(np.float32))


@pytest.mark.parametrize("chunk, recompute", [(None, True), (3, True), (1, False), (4, False)])
def test_value_and_gradient_equal_numpy(inputs, chunk, recompute):
    x, head, targets, g = inputs
    loss = lambda x, w: jnp.sum(chunked_cross_entropy(x, w, jnp.asarray(targets), chunk, recompute) * g)  # noqa: E731
    np.testing.assert_allclose(chunked_cross_entropy(x, head, jnp.asarray(targets), chunk, recompute),
                               numpy_ce(x, head, targets)[0], rtol=1e-5, atol=1e-5)
    dx, d_head = jax.grad(loss, argnums=(0, 1))(x, head)
    want_dx, want_head = numpy_grads(x, head, targets, g)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_head, want_head, rtol=1e-4, atol=1e-5)


def test_gradient_equals_finite_differences(inputs):
    """A few entries of d loss / d head and d loss / d x by central differences of the float64 NumPy loss."""
    x, head, targets, g = inputs
    dx, d_head = jax.grad(lambda x, w: jnp.sum(chunked_cross_entropy(x, w, jnp.asarray(targets), 4) * g),
                          argnums=(0, 1))(x, head)
    value = lambda x, w: float(np.sum(numpy_ce(x, w, targets)[0] * g))  # noqa: E731
    eps = 1e-5
    for i, j in [(0, 0), (3, 17), (5, 39)]:
        up, down = head.astype(np.float64), head.astype(np.float64)
        up[i, j] += eps
        down[i, j] -= eps
        assert d_head[i, j] == pytest.approx((value(x, up) - value(x, down)) / (2 * eps), rel=1e-3, abs=1e-4)
    for b, t, d in [(0, 0, 0), (1, 11, 5)]:
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[b, t, d] += eps
        down[b, t, d] -= eps
        assert dx[b, t, d] == pytest.approx((value(up, head) - value(down, head)) / (2 * eps), rel=1e-3, abs=1e-4)


def test_bf16_inputs_stay_close_and_keep_dtypes(inputs):
    x, head, targets, g = inputs
    xb, hb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(head, jnp.bfloat16)
    ce = chunked_cross_entropy(xb, hb, jnp.asarray(targets), 3)
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(ce, numpy_ce(np.asarray(xb, np.float32), np.asarray(hb, np.float32), targets)[0],
                               atol=5e-2)
    dx, d_head = jax.grad(lambda x, w: jnp.sum(chunked_cross_entropy(x, w, jnp.asarray(targets), 3) * g),
                          argnums=(0, 1))(xb, hb)
    assert dx.dtype == d_head.dtype == jnp.bfloat16


def test_chunk_length_and_refusal(inputs):
    for batch, seq, target in [(4, 2048, 4096), (3, 7, 4096), (2, 12, 8), (8, 10, 4), (1, 97, 50)]:
        c = chunk_length(batch, seq, target)
        best = max(k for k in range(1, seq + 1) if seq % k == 0 and (batch * k <= target or k == 1))
        assert c == best, (batch, seq, target)
    x, head, targets, _ = inputs
    with pytest.raises(ValueError, match="loss chunk 5 does not divide the sequence length 12"):
        chunked_cross_entropy(x, head, jnp.asarray(targets), 5)
