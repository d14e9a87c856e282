"""The CPU int8 matrix-vector kernel (solarjax.kernels.cpu_int8) against NumPy, and decode with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solarjax.kernels import cpu_int8
from solarjax.quant import quantize

needs_kernel = pytest.mark.skipif(not cpu_int8.available() or jax.default_backend() != "cpu",
                                  reason="the C++ int8 kernel is not built (no compiler at install) or not on CPU")


def _case(rows: tuple[int, ...], k_dim: int, n_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*rows, k_dim)).astype(np.float32)
    q = quantize(jnp.asarray(rng.normal(size=(k_dim, n_dim)).astype(np.float32)), (0,))
    # NumPy's x @ (w_int8 * scale) in float64: the oracle
    oracle = x.astype(np.float64) @ (np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64))
    return x, q, oracle


# odd sizes: no multiple of 4 rows, 8 or 16 columns; batch 1 and 3; a (1, 1, K) decode step
SHAPES = [((1,), 37, 53), ((3,), 37, 53), ((1,), 64, 16), ((3,), 130, 1000), ((1, 1), 577, 963), ((2, 3), 5, 7)]


@needs_kernel
@pytest.mark.parametrize("rows,k_dim,n_dim", SHAPES)
def test_kernel_matches_numpy(rows, k_dim, n_dim):
    x, q, oracle = _case(rows, k_dim, n_dim, seed=k_dim + n_dim)
    got = np.asarray(jax.jit(cpu_int8.int8_matmul)(jnp.asarray(x), q))
    assert got.shape == oracle.shape
    np.testing.assert_allclose(got, oracle, rtol=1e-5, atol=1e-5 * np.sqrt(k_dim))
    hlo = jax.jit(cpu_int8.int8_matmul).lower(jnp.asarray(x), q).as_text()
    assert cpu_int8.TARGET in hlo  # the kernel ran, not the fallback


@pytest.mark.parametrize("rows,k_dim,n_dim", [((3,), 37, 53), ((16,), 40, 24)])
def test_fallback_matches_numpy(rows, k_dim, n_dim, monkeypatch):
    """Without the kernel (and always above MAX_ROWS rows) the pure-JAX dequantize-and-dot runs."""
    monkeypatch.setenv(cpu_int8.DISABLE_ENV, "0")
    jax.clear_caches()  # the switch is read at trace time
    x, q, oracle = _case(rows, k_dim, n_dim, seed=1)
    hlo = jax.jit(cpu_int8.int8_matmul).lower(jnp.asarray(x), q).as_text()
    assert cpu_int8.TARGET not in hlo
    np.testing.assert_allclose(np.asarray(cpu_int8.int8_matmul(jnp.asarray(x), q)), oracle, rtol=1e-5, atol=1e-4)
    jax.clear_caches()


@needs_kernel
def test_int8_greedy_decode_same_with_kernel_and_fallback(monkeypatch):
    from solarjax import generate as G
    from solarjax import model as M
    from solarjax.config import ModelConfig
    from solarjax.decode_layout import unstack_layers
    from solarjax.quant import quantize_params

    cfg = ModelConfig(vocab_size=97, d_model=40, n_layers=2, n_heads=5, n_kv_heads=1, head_dim=8, ffn_dim=72,
                      max_seq_len=64)
    params = unstack_layers(quantize_params(M.init_params(jax.random.key(0), cfg, init_std=0.3)))
    prompts = [[5, 17, 33, 2, 9], [40, 41, 42]]
    with_kernel = G.generate(params, cfg, prompts, max_new_tokens=12)
    hlo_layer = jax.jit(lambda p, h: h @ M.dense_layer(p, jnp.float32)["wqkv"]).lower(
        params["layers"][0], jnp.ones((1, 1, cfg.d_model))).as_text()
    assert cpu_int8.TARGET in hlo_layer  # the decode layout's projections go through the kernel
    jax.clear_caches()
    monkeypatch.setenv(cpu_int8.DISABLE_ENV, "0")
    without = G.generate(params, cfg, prompts, max_new_tokens=12)
    jax.clear_caches()
    assert with_kernel == without
    assert len(set(with_kernel[0])) > 1  # not a degenerate constant output
