"""Weight-only quantization against NumPy: the per-channel formula, and matmul error within its bound."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_matmul_within_quantization_error_of_numpy(bits):
    import jax.numpy as jnp

    from solarjax.quant import quantize

    rng = np.random.default_rng(0)
    w = rng.normal(size=(96, 40)).astype(np.float32)  # (d_in, d_out): contraction axis 0
    w[:, 3] = 0.0  # an all-zero output channel stays exactly zero
    x = rng.normal(size=(5, 96)).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax  # NumPy reference: one scale per output channel
    scale[scale == 0] = 1.0
    ref_values = np.clip(np.rint(w / scale), -qmax, qmax)

    q = quantize(jnp.asarray(w), (0,), bits)
    np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
    assert np.abs(np.asarray(q.values).astype(np.int32) - ref_values).max() <= 1  # rounding ties only
    dense = np.asarray(q.dense(jnp.float32))
    assert np.all(np.abs(dense - w) <= scale / 2 + 1e-6)  # each weight within half a step
    got = np.asarray(jnp.asarray(x) @ q.dense(jnp.float32))
    bound = np.abs(x) @ np.broadcast_to(scale / 2, w.shape) + 1e-4  # sum_i |x_i| * step_j / 2
    exact = x @ w
    assert np.all(np.abs(got - exact) <= bound)
    np.testing.assert_allclose(got, x @ (ref_values * scale), atol=2e-4 * (1 if bits == 8 else 4))


def test_quantize_params_covers_every_matrix(tmp_path):
    import jax

    from solarjax import model as M
    from solarjax.config import ModelConfig
    from solarjax.quant import Quantized, param_bytes, quantize_params

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
    params = M.init_params(jax.random.key(0), cfg)
    q = quantize_params(params)
    matrices = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert {k for k, v in q["layers"].items() if isinstance(v, Quantized)} == matrices
    assert isinstance(q["embed"], Quantized) and isinstance(q["lm_head"], Quantized)
    assert q["layers"]["wo"].scale.shape == (2, 1, 1, 32) and q["lm_head"].scale.shape == (1, 64)
    assert param_bytes(q) < 0.3 * param_bytes(params)  # int8 + one fp32 scale per channel vs fp32
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(q)


def test_moe_experts_quantize_per_expert_and_output_channel():
    """Mixtral-style leaves (L, E, d, f) / (L, E, f, d): a NumPy scale per layer, expert and output
    channel; the router stays float32; the quantized model computes with exactly the dequantized
    weights (model.forward on them as the oracle), close to the float model."""
    import jax
    import jax.numpy as jnp

    from solarjax import model as M
    from solarjax.config import ModelConfig
    from solarjax.quant import Quantized, dequantize_params, hidden_states, lm_head, quantize_params

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, arch="mixtral",
                      n_experts=3, experts_per_token=2)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s)).astype(np.float32), M.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    q = quantize_params(params)
    assert not isinstance(q["layers"]["w_router"], Quantized) and q["layers"]["w_router"].dtype == np.float32
    for name, (contracted, out) in {"w_gate": (32, 24), "w_up": (32, 24), "w_down": (24, 32)}.items():
        leaf, w = q["layers"][name], params["layers"][name]
        assert isinstance(leaf, Quantized) and leaf.scale.shape == (2, 3, 1, out), name
        np.testing.assert_allclose(np.asarray(leaf.scale), np.abs(w).max(axis=2, keepdims=True) / 127, rtol=1e-6)
        assert np.all(np.abs(np.asarray(leaf.dense(jnp.float32)) - w) <= np.asarray(leaf.scale) / 2 + 1e-7), name
    tokens = jnp.asarray(rng.integers(0, 64, (2, 9)))
    quantized = jax.jit(lambda p, t: lm_head(p, hidden_states(p, t, cfg), cfg))(q, tokens)
    oracle = M.forward_jit(dequantize_params(q), tokens, cfg)
    np.testing.assert_allclose(quantized, oracle, atol=1e-5)
    np.testing.assert_allclose(quantized, M.forward_jit(params, tokens, cfg), atol=2e-2)
