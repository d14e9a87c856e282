"""The one layer loop (``model.run_layers``) behind every caller, against transformers' logits.

A tiny random Gemma 3 (sliding and global layers: per-layer attention kinds, windows and RoPE)
and a tiny Mixtral (Mixture-of-Experts layers) run through every caller of the loop, stacked and
in the decode layout (per-layer arrays, fused ``wqkv`` / ``w_gate_up``): the training forward,
KV-cache prefill followed by one-token decode steps, and the int8 model's eval forward and
decode (oracle: transformers holding the dequantized weights). Every path must give
transformers' logits, and each caller is seen to go through ``run_layers``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from solarjax import generate as G
from solarjax import hf, model
from solarjax import quant as Q
from solarjax.decode_layout import unstack_layers

SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, initializer_range=0.1)
CASES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_hidden_layers=2, num_local_experts=3,
                                                           num_experts_per_tok=2)),
}
TOKENS = np.random.RandomState(1).randint(3, 97, size=(2, 11))  # longer than Gemma's window of 4
PREFILL = 6  # columns prefilled; the rest are decoded one at a time


def torch_logits(net, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_name, model_name, extra = CASES[request.param]
    torch.manual_seed(0)
    net = getattr(transformers, model_name)(getattr(transformers, config_name)(**SHAPE, **extra)).eval()
    with torch.no_grad():  # random norms, so a norm applied as w instead of 1 + w shows
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("layer_loop") / request.param
    net.save_pretrained(path)
    cfg, params = hf.load_hf(path)
    return net, cfg, params, path


@pytest.fixture
def loop_calls(monkeypatch):
    """Every call of ``model.run_layers``, by layout: 'stacked' or 'decode_layout'."""
    calls: list[str] = []
    real = model.run_layers

    def spy(layers, *args, **kwargs):
        calls.append("decode_layout" if isinstance(layers, tuple) else "stacked")
        return real(layers, *args, **kwargs)

    monkeypatch.setattr(model, "run_layers", spy)
    return calls


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params, tokens, cfg):
    return model.forward(params, tokens, cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def quantized_forward(params, tokens, cfg):
    return Q.lm_head(params, Q.hidden_states(params, tokens, cfg), cfg)


cached = jax.jit(G.forward_cached, static_argnames=("cfg", "fresh"))


def prefill_then_decode(params, cfg) -> np.ndarray:
    """Logits of every column of ``TOKENS``: a fresh prefill of ``PREFILL`` columns, then one-token steps."""
    batch, length = TOKENS.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    segments = np.ones((batch, length), np.int32)
    cache = G.init_cache(cfg, batch, 16)
    logits, cache = cached(params, cache, TOKENS[:, :PREFILL], positions[:, :PREFILL], segments[:, :PREFILL], 0, cfg,
                           fresh=True)
    out = [np.asarray(logits)]
    for col in range(PREFILL, length):
        logits, cache = cached(params, cache, TOKENS[:, col:col + 1], positions[:, col:col + 1],
                               segments[:, col:col + 1], col, cfg)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


def test_forward_and_cached_decode_in_both_layouts_give_transformers_logits(case, loop_calls):
    net, cfg, params, _ = case
    expected = torch_logits(net)
    layout = unstack_layers(params)
    assert isinstance(layout["layers"], tuple) and "wqkv" in layout["layers"][0]
    for p in (params, layout):
        np.testing.assert_allclose(forward(p, TOKENS, cfg), expected, atol=2e-5)
        np.testing.assert_allclose(prefill_then_decode(p, cfg), expected, atol=2e-5)
    # the forward, the prefill and the decode step, each traced once per layout
    assert loop_calls == ["stacked"] * 3 + ["decode_layout"] * 3


def test_int8_eval_and_decode_give_transformers_logits_on_the_dequantized_weights(case, loop_calls, tmp_path):
    """The quantized model is the one whose weights are values * scale: transformers holding those
    weights is the oracle, for the eval forward and for prefill + decode in the decode layout."""
    net, cfg, params, path = case
    qparams = Q.quantize_params(params)
    out = hf.save_hf(Q.dequantize_params(qparams), cfg, tmp_path / "dequantized", source_dir=path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = torch_logits(ref)
    assert np.abs(expected - torch_logits(net)).max() > 1e-4  # int8 changed the model: the oracle is the right one
    np.testing.assert_allclose(quantized_forward(qparams, jnp.asarray(TOKENS), cfg), expected, atol=2e-5)
    np.testing.assert_allclose(prefill_then_decode(unstack_layers(qparams), cfg), expected, atol=2e-5)
    assert loop_calls == ["stacked"] + ["decode_layout"] * 2
