"""The decoder's own invariants that do not need transformers (HF parity lives in test_hf.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solarjax import model
from solarjax.config import preset


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


def test_fused_attention_matches_einsum_reference(tiny):
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
