"""The decoder's own invariants that do not need transformers (HF parity lives in test_hf.py), and
attention against the formula written out in NumPy: ``softmax(q k^T / sqrt(d) + mask) v`` with the
mask causal by index inside each packed segment and inside the sliding window, K/V heads shared by
groups of query heads (GQA)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solarjax import attention, model
from solarjax.config import preset

B, T, H, KV, HD = 2, 128, 4, 2, 16  # 128: one tile of the splash kernel
SEGMENTS = np.array([[1] * 40 + [2] * 60 + [3] * 28, [0] * 8 + [1] * 120], np.int32)


def numpy_attention(q, k, v, segments, window):
    """Attention from its definition, float64, one (batch, head) at a time."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    out = np.zeros_like(q)
    for b in range(B):
        allowed = (j <= i) & (segments[b][:, None] == segments[b][None, :])
        if window is not None:
            allowed &= i - j < window
        for h in range(H):
            kv_head = h // (H // KV)
            scores = np.where(allowed, q[b, :, h] @ k[b, :, kv_head].T / np.sqrt(HD), -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (weights / weights.sum(-1, keepdims=True)) @ v[b, :, kv_head]
    return out


@pytest.fixture(scope="module")
def qkv():
    ks = jax.random.split(jax.random.key(7), 3)
    return (jax.random.normal(ks[0], (B, T, H, HD)), jax.random.normal(ks[1], (B, T, KV, HD)),
            jax.random.normal(ks[2], (B, T, KV, HD)))


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("window", [None, 24])
def test_masked_attention_equals_numpy_formula(qkv, impl, window):
    segments = jnp.asarray(SEGMENTS)
    positions = model.default_positions(jnp.zeros((B, T), jnp.int32), segments)
    mask = model.attention_mask(positions, positions, segments, segments, window)
    out = attention.masked_attention(*qkv, mask, impl)
    np.testing.assert_allclose(out, numpy_attention(*qkv, SEGMENTS, window), atol=2e-5)


def test_fused_splash_kernel_equals_numpy_formula(qkv):
    """The fused TPU kernel itself (Pallas splash, interpreted on CPU) on packed segments with a window."""
    with attention.kernels_interpreted():
        out = attention.splash_attention(*qkv, jnp.asarray(SEGMENTS), 24)
    np.testing.assert_allclose(out, numpy_attention(*qkv, SEGMENTS, 24), atol=2e-5)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny_mistral", remat="none")
    return cfg, model.init_params(jax.random.key(0), cfg)


def test_params_are_stacked_on_axis_zero(tiny):
    cfg, params = tiny
    for name, leaf in params["layers"].items():
        assert leaf.shape[0] == cfg.n_layers, name
    assert params["layers"]["wq"].shape == (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim)
    assert "lm_head" not in params  # tied
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    axes = model.param_axes(cfg)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)


def test_forward_on_the_default_attention_matches_the_einsum_reference_forward(tiny):
    """The whole decoder with ``attention="auto"`` (XLA on CPU, a fused kernel on TPU/GPU) against the same
    decoder on the einsum reference attention; both attentions meet the NumPy formula above."""
    cfg, params = tiny
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    segments = jnp.array([[1] * 12 + [2] * 8, [0] * 5 + [1] * 15])
    fused = model.forward(params, tokens, cfg, segment_ids=segments)
    ref = model.forward(params, tokens, cfg.replace(attention="reference"), segment_ids=segments)
    np.testing.assert_allclose(fused, ref, atol=2e-5)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims", "save_attn_out"])
def test_remat_policies_keep_gradients(tiny, policy):
    cfg, params = tiny
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(model.forward(p, tokens, c))[..., 0])

    base = jax.grad(loss)(params, cfg)
    remat = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_stays_close_to_fp32(tiny):
    cfg, params = tiny
    tokens = jax.random.randint(jax.random.key(3), (1, 16), 0, cfg.vocab_size)
    fp32 = model.forward(params, tokens, cfg)
    bf16 = model.forward(params, tokens, cfg.replace(dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(fp32, bf16, atol=5e-2)
