"""Attention by backend and the chunked loss: oracles are the einsum reference attention, NumPy
and optax on full logits.

Splash attention runs here as the real Pallas TPU kernel in interpret mode; sequences are 160
tokens so the kernel's 128-wide tiles and the padding of a ragged length are both exercised.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from solarjax import attention as A
from solarjax import model as M
from solarjax import sharding as shd
from solarjax.config import ConfigError, preset
from solarjax.losses import chunk_length, chunked_cross_entropy
from solarjax.losses import next_token_loss

B, T, H, K, D = 2, 160, 4, 2, 16
SEGMENTS = np.array([[1] * 50 + [2] * 70 + [3] * 40, [1] * 160], np.int32)


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (B, T, H, D)), jax.random.normal(ks[1], (B, T, K, D)),
            jax.random.normal(ks[2], (B, T, K, D)))


@pytest.mark.parametrize("window,packed", [(None, False), (None, True), (37, True)])
def test_splash_equals_reference_attention_and_gradients(qkv, window, packed):
    segments = jnp.asarray(SEGMENTS) if packed else None
    positions = M.default_positions(jnp.zeros((B, T), jnp.int32), segments)
    mask = M.attention_mask(positions, positions, segments, segments, window)
    cotangent = jax.random.normal(jax.random.key(1), (B, T, H, D))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    with A.kernels_interpreted():
        splash = lambda q, k, v: A.splash_attention(q, k, v, segments, window)  # noqa: E731
        out = splash(*qkv)
        grads = jax.grad(loss(splash), argnums=(0, 1, 2))(*qkv)
    reference = lambda q, k, v: A.reference_attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(out, reference(*qkv), atol=2e-5)
    for ours, ref in zip(grads, jax.grad(loss(reference), argnums=(0, 1, 2))(*qkv)):
        np.testing.assert_allclose(ours, ref, atol=5e-5)


def test_splash_in_a_mesh_runs_per_shard(qkv):
    """Under the trainer's activation sharding splash runs in shard_map (batch split over data)."""
    mesh = shd.make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, None))
    segments = jnp.asarray(SEGMENTS)
    positions = M.default_positions(segments, segments)
    mask = M.attention_mask(positions, positions, segments, segments, None)
    with A.kernels_interpreted():
        out = jax.jit(lambda q, k, v, s: A.splash_attention(q, k, v, s, None, sharding))(*qkv, segments)
    np.testing.assert_allclose(out, A.reference_attention(*qkv, mask), atol=2e-5)


def test_model_with_splash_equals_reference_model():
    cfg = preset("tiny").replace(sliding_window=24)
    params = M.init_params(jax.random.key(2), cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 40), 0, cfg.vocab_size)
    segments = jnp.asarray([[1] * 15 + [2] * 25, [1] * 40], jnp.int32)
    with A.kernels_interpreted():
        ours = M.forward(params, tokens, cfg.replace(attention="splash"), segment_ids=segments)
    ref = M.forward(params, tokens, cfg.replace(attention="reference"), segment_ids=segments)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_packed_layout_matches_runs_counted_in_numpy():
    segments = np.array([[1, 1, 2, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 5, 5, 6, 6]], np.int32)
    lengths, offsets, count = jax.device_get(A.packed_layout(jnp.asarray(segments), 6))
    for row, l_row, o_row, n in zip(segments, lengths, offsets, count):
        runs = [len(list(g)) for _, g in itertools.groupby(row)]
        starts = np.cumsum([0] + runs[:-1])
        assert n == len(runs)
        np.testing.assert_array_equal(l_row, runs + [-1] * (6 - len(runs)))
        np.testing.assert_array_equal(o_row, list(starts) + [-1] * (7 - len(runs)))


def test_backend_resolution_and_refusals():
    assert A.resolve("auto", jnp.bfloat16, "tpu") == "splash"
    assert A.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert A.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN flash has no fp32 kernel
    assert A.resolve("auto", jnp.float32, "cpu") == "xla"
    with pytest.raises(ConfigError, match="splash.*TPU kernel"):
        A.resolve("splash", jnp.bfloat16, "cpu")
    with pytest.raises(ConfigError, match="cudnn.*NVIDIA GPU"):
        A.resolve("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(ConfigError, match="bf16/fp16"):
        A.resolve("cudnn", jnp.float32, "gpu")
    with pytest.raises(ConfigError, match="attention="):
        preset("tiny", attention="flash")


@pytest.mark.parametrize("chunk, recompute", [(1, True), (5, True), (20, True), (5, False)])
def test_chunked_cross_entropy_equals_optax(chunk, recompute):
    ks = jax.random.split(jax.random.key(4), 4)
    x, head = jax.random.normal(ks[0], (3, 20, 8)), jax.random.normal(ks[1], (8, 50))
    targets, weights = jax.random.randint(ks[2], (3, 20), 0, 50), jax.random.normal(ks[3], (3, 20))
    full = lambda x, w: optax.softmax_cross_entropy_with_integer_labels(x @ w, targets)  # noqa: E731
    ours = lambda x, w: chunked_cross_entropy(x, w, targets, chunk, recompute)  # noqa: E731
    np.testing.assert_allclose(ours(x, head), full(x, head), atol=1e-5)
    g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) * weights), argnums=(0, 1))(x, head)
    g_full = jax.grad(lambda x, w: jnp.sum(full(x, w) * weights), argnums=(0, 1))(x, head)
    for a, b in zip(g_ours, g_full):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert chunk_length(4, 2048) == 1024 and chunk_length(3, 7) == 7


def test_train_loss_equals_optax_on_full_logits():
    """The trainer's loss (compute casts, chunked CE, masking) against the plain formula."""
    cfg = preset("tiny")
    params = M.init_params(jax.random.key(5), cfg)
    tokens = jax.random.randint(jax.random.key(6), (2, 17), 0, cfg.vocab_size)
    segments = jnp.asarray([[1] * 9 + [2] * 7 + [0], [1] * 17], jnp.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments[:, :-1],
             "positions": M.default_positions(tokens[:, :-1], segments[:, :-1]),
             "loss_mask": (segments[:, 1:] > 0).astype(jnp.int32)}

    def plain(p):
        logits = M.forward(p, batch["tokens"], cfg, positions=batch["positions"], segment_ids=batch["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    ours, grads = jax.value_and_grad(lambda p: next_token_loss(p, batch, cfg)[0])(params)
    ref, ref_grads = jax.value_and_grad(plain)(params)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_compute_params_casts_matmul_weights_only():
    cfg = preset("tiny", dtype="bfloat16")
    cast = M.compute_params(M.init_params(jax.random.key(7), cfg), cfg)
    assert cast["layers"]["wq"].dtype == jnp.bfloat16 and cast["layers"]["w_down"].dtype == jnp.bfloat16
    assert cast["layers"]["attn_norm"].dtype == jnp.float32 and cast["final_norm"].dtype == jnp.float32
    assert cast["embed"].dtype == jnp.float32
