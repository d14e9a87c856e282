"""Config presets and validation."""

import pytest

from solarjax.config import ConfigError, ModelConfig, apply_overrides, load_config, preset


@pytest.mark.parametrize("name, billions", [("mistral_7b", 7.24), ("solar_10_7b", 10.73)])
def test_param_counts_match_published_sizes(name, billions):
    assert preset(name).num_params() == pytest.approx(billions * 1e9, rel=5e-3)


# Published sizes: Llama-3.2-1B 1.24B, Qwen2.5-0.5B 0.49B, Qwen3-0.6B 0.6B, Gemma-3-1B 1B (model cards)
@pytest.mark.parametrize("name, billions, rel", [("llama3_2_1b", 1.24, 5e-3), ("qwen2_5_0_5b", 0.49, 1e-2),
                                                 ("qwen3_0_6b", 0.60, 1e-2), ("gemma3_1b", 1.0, 5e-3)])
def test_family_presets_match_published_sizes_and_grow_by_their_plan(name, billions, rel):
    from solarjax.growth import dus, plans

    cfg = preset(name)
    assert cfg.num_params() == pytest.approx(billions * 1e9, rel=rel)
    grown_config = load_config(f"{name}_solar")
    plan = plans.parse_plan_spec(grown_config.init.upscale, cfg.n_layers)
    grown = dus.plan_config(cfg, plan)
    assert grown.n_layers == len(plans.plan_layers(plan)) > cfg.n_layers
    embed = cfg.vocab_size * cfg.d_model  # tied: one table; every layer has the same size
    per_layer = (cfg.num_params() - embed - cfg.d_model) // cfg.n_layers
    assert grown.num_params() == cfg.num_params() + (grown.n_layers - cfg.n_layers) * per_layer
    if cfg.layer_types is not None:  # Gemma: every copied layer keeps its type (5 sliding : 1 full)
        assert grown.layer_types == tuple(cfg.layer_types[i] for i in plans.plan_layers(plan))
        assert grown.layer_types.count("full_attention") == sum(i % 6 == 5 for i in plans.plan_layers(plan))


def test_presets_describe_the_published_architectures():
    mistral, solar, smol = preset("mistral_7b"), preset("solar_10_7b"), preset("smollm2_135m")
    assert (mistral.sliding_window, mistral.n_kv_heads, mistral.vocab_size, mistral.tie_embeddings) == (4096, 8, 32000, False)
    assert (solar.n_layers, solar.sliding_window, solar.max_seq_len, solar.arch) == (48, None, 4096, "llama")
    assert smol.tie_embeddings and smol.n_heads == 9 and smol.n_kv_heads == 3
    for name in ("llama2_7b", "tinyllama_1_1b", "tiny", "tiny_mistral"):
        assert preset(name).n_layers > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
        (dict(d_model=66, n_heads=4), "not divisible by n_heads"),
        (dict(remat="sometimes"), "remat"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(n_layers=0), "n_layers"),
        (dict(dtype="float33"), "dtype"),
    ],
)
def test_invalid_configs_raise_named_errors(changes, message):
    values = dict(vocab_size=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32)
    values.update(changes)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**values)


def test_overrides_parse_literals_and_reject_unknown_keys():
    config = load_config("tiny")
    apply_overrides(config, ["--config.model.n_layers=6", "model.sliding_window=None", "model.dtype=bfloat16"])
    assert (config.model.n_layers, config.model.sliding_window, config.model.dtype) == (6, None, "bfloat16")
    with pytest.raises(ConfigError, match="no config field"):
        apply_overrides(config, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match="presets"):
        load_config("no_such_preset")
