"""Sparse upcycling (solarjax.growth.upcycle), checked against transformers and NumPy.

The identity: with identical experts an upcycled model computes the dense model's function, so the
exported Mixtral, loaded by transformers, must give the logits transformers gives the dense source
(alone, after DUS, before DUS). Noise and re-initialisation are measured on the arrays in NumPy.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from solarjax import growth, hf, model
from solarjax.growth import dus, upcycle
from solarjax.cli import main
from solarjax.config import ConfigError, ModelConfig

TOKENS = np.random.RandomState(0).randint(0, 256, size=(2, 12))


def hf_logits(path, cls=transformers.AutoModelForCausalLM):
    net = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return net(torch.tensor(TOKENS)).logits.numpy(), net


@pytest.mark.parametrize("fixture,spec,dense_plan", [
    ("hf_llama_dir", "upcycle:experts=3,k=2,router=0.5", None),
    ("hf_llama_tied_sharded_dir", "upcycle:experts=5,k=3+solar:m=1", "solar:m=1"),  # upcycle, then DUS
], ids=["upcycle", "upcycle-then-dus"])
def test_upcycled_mixtral_equals_the_dense_model_in_transformers(fixture, spec, dense_plan, request, tmp_path):
    src = request.getfixturevalue(fixture)
    dense_dir = src if dense_plan is None else dus.upscale_hf(src, tmp_path / "dense", dense_plan)
    expected, dense_net = hf_logits(dense_dir, transformers.LlamaForCausalLM)
    cfg, params = hf.load_hf(src)
    grown, moe_cfg = growth.grow(params, cfg, spec)
    out = hf.save_hf(grown, moe_cfg, tmp_path / "moe", source_dir=src)
    got, net = hf_logits(out, transformers.MixtralForCausalLM)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # parameter counts: total as transformers counts it; active from the dense arrays (k MLP copies + router)
    assert moe_cfg.num_params() == net.num_parameters()
    dense_total = dense_net.num_parameters()
    mlp = sum(np.size(params["layers"][k]) for k in upcycle.EXPERT_LEAVES) // cfg.n_layers
    router = cfg.d_model * moe_cfg.n_experts
    assert moe_cfg.num_params(active=True) == dense_total + moe_cfg.n_layers * ((moe_cfg.experts_per_token - 1) * mlp
                                                                                 + router)


def test_dus_then_upcycle_from_the_cli_equals_the_dus_model_in_transformers(hf_llama_dir, tmp_path, capsys):
    dense_dir = dus.upscale_hf(hf_llama_dir, tmp_path / "dense", "solar:m=1")
    out = tmp_path / "moe"
    assert main(["upscale", "--model", str(hf_llama_dir), "--out", str(out), "--m", "1",
                 "--upcycle", "experts=4,k=2", "--json", "--no-progress"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["layers_out"], facts["experts"], facts["plan"]) == (6, 4, "solar:m=1+upcycle:experts=4,k=2")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    got, _ = hf_logits(out)
    np.testing.assert_allclose(got, hf_logits(dense_dir)[0], atol=1e-5)
    # a fine-grained layout cannot be a MixtralForCausalLM: refused before anything is written
    assert main(["upscale", "--model", str(hf_llama_dir), "--out", str(tmp_path / "fine"),
                 "--upcycle", "experts=4,k=2,split=2"]) == 1
    assert "moe_ffn_dim" in capsys.readouterr().err and not (tmp_path / "fine").exists()


def test_fine_grained_experts_with_a_zero_router_equal_the_dense_model(hf_llama_dir):
    """Slices of ffn/split units, expert e = slice e mod split, down x split: a zero router picks one copy
    of every slice (top-k ties go to the lowest indices) with weight 1/split each."""
    cfg, params = hf.load_hf(hf_llama_dir)
    moe_cfg, moe = upcycle.upcycle(cfg, params, 8, 4, split=4, router_std=0.0)
    assert moe_cfg.expert_ffn_dim == cfg.ffn_dim // 4
    expected, _ = hf_logits(hf_llama_dir, transformers.LlamaForCausalLM)
    np.testing.assert_allclose(model.forward_jit(moe, jnp.asarray(TOKENS), moe_cfg), expected, atol=1e-5)


@pytest.fixture(scope="module")
def dense():
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)
    rng = np.random.default_rng(3)  # std 0.14: not the init's 0.02
    params = jax.tree.map(lambda shape: rng.normal(0, 0.14, shape).astype(np.float32), model.param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    return cfg, params


@pytest.mark.parametrize("kind", ["mult", "add"])
def test_noise_changes_every_expert_by_the_requested_amount(dense, kind):
    cfg, params = dense
    _, moe = upcycle.upcycle(cfg, params, 4, 2, noise=0.05, noise_kind=kind, key=jax.random.key(1))
    for name in upcycle.EXPERT_LEAVES:
        w = np.asarray(params["layers"][name])[:, None]  # (L, 1, ...) against (L, E, ...)
        experts = np.asarray(moe["layers"][name])
        eps = (experts / w - 1) / 0.05 if kind == "mult" else (experts - w) / 0.05
        assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03, (name, eps.mean(), eps.std())
        # independent draws per expert
        assert abs(np.corrcoef(eps[:, 0].ravel(), eps[:, 1].ravel())[0, 1]) < 0.05


def test_reinit_redraws_exactly_the_requested_hidden_units(dense):
    cfg, params = dense
    _, moe = upcycle.upcycle(cfg, params, 3, 1, reinit_fraction=0.25, key=jax.random.key(2))
    gate, up, down = (np.asarray(moe["layers"][k]) for k in upcycle.EXPERT_LEAVES)
    d_gate, d_up, d_down = (np.asarray(params["layers"][k]) for k in upcycle.EXPERT_LEAVES)
    for layer in range(cfg.n_layers):
        masks = []
        for e in range(3):
            kept = np.all(gate[layer, e] == d_gate[layer], axis=0)  # per hidden unit (column)
            assert kept.sum() == cfg.ffn_dim - 16  # round(0.25 * 64) re-drawn
            np.testing.assert_array_equal(np.all(up[layer, e] == d_up[layer], axis=0), kept)
            np.testing.assert_array_equal(np.all(down[layer, e] == d_down[layer], axis=1), kept)
            assert not np.any(gate[layer, e][:, ~kept] == d_gate[layer][:, ~kept])
            masks.append(kept)
            fresh = gate[layer, e][:, ~kept]
            assert abs(fresh.std() / d_gate[layer].std() - 1) < 0.15  # drawn at the dense matrix's scale
        assert not (np.array_equal(masks[0], masks[1]) and np.array_equal(masks[1], masks[2]))  # per expert


def test_upcycling_keeps_the_devices_of_sharded_params(dense):
    from solarjax import sharding as shd

    cfg, params = dense
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(params, shd.param_shardings(cfg, mesh))
    moe_cfg, moe = upcycle.upcycle(cfg, placed, 4, 2)
    for name, leaf in moe["layers"].items():
        assert leaf.sharding.mesh == mesh, name
        dense_leaf = np.asarray(params["layers"][name if name != "w_router" else "w_gate"])
        if name in upcycle.EXPERT_LEAVES:  # every expert a copy
            np.testing.assert_array_equal(np.asarray(leaf), np.repeat(dense_leaf[:, None], 4, axis=1))
        elif name != "w_router":
            np.testing.assert_array_equal(np.asarray(leaf), dense_leaf)
    assert moe["layers"]["w_gate"].sharding.spec[2:] == placed["layers"]["w_gate"].sharding.spec[1:]


@pytest.mark.parametrize("arch,extra,message", [
    ("qwen2", {}, "biases"), ("qwen3", {}, "q/k norms"), ("gemma3", {}, "GeGLU"),
    ("mixtral", {"n_experts": 2}, "already a Mixture"),
])
def test_families_mixtral_cannot_express_are_refused_in_one_line(arch, extra, message):
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64, arch=arch, **extra)
    with pytest.raises(ConfigError, match=message) as err:
        growth.grown_config(cfg, "upcycle:experts=4,k=2")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec,message", [
    ("upcycle:experts=4", "needs experts= and k="), ("upcycle:experts=4,k=5", "k=5"),
    ("upcycle:experts=4,k=2,split=3", "split=3"), ("upcycle:experts=4,k=2,reinit=2", "reinit"),
    ("upcycle:experts=4,k=2,bogus=1", "bad argument"), ("solar:m=1+", "empty step"),
])
def test_bad_growth_specs_are_one_line(dense, spec, message):
    with pytest.raises(ConfigError, match=message):
        growth.grown_config(dense[0], spec)


def test_training_init_takes_a_growth_spec():
    """``init.upscale`` grows the initial model by DUS then upcycling before training: at step 0 the
    Mixtral computes what the DUS-only dense model computes (the identity the tests above check
    against transformers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from solarjax import model, sharding, train
    from solarjax.config import load_config

    config = load_config("tiny")
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    config.init.upscale = "solar:m=1"
    dense_cfg, dense = train.init_model(config, mesh, None)
    config.init.upscale = "solar:m=1+upcycle:experts=3,k=2"
    cfg, params = train.init_model(config, mesh, None)
    assert (cfg.arch, cfg.n_layers, cfg.n_experts, cfg.experts_per_token) == ("mixtral", dense_cfg.n_layers, 3, 2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    np.testing.assert_allclose(model.forward_jit(params, tokens, cfg), model.forward_jit(dense, tokens, dense_cfg),
                               atol=1e-5)
