"""Shared fixtures: 8 emulated CPU devices and tiny random HF checkpoints built by transformers.

Fixtures are session-scoped so each tiny model is built and saved once for the whole suite.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A random tiny transformers model: kind is 'llama' or 'mistral'."""
    import torch
    import transformers

    torch.manual_seed(seed)
    values = {**TINY_SHAPE, **overrides}
    if kind == "mistral":
        values.setdefault("sliding_window", 8)  # shorter than the test sequences
        config = transformers.MistralConfig(**values)
        return transformers.MistralForCausalLM(config).eval()
    config = transformers.LlamaConfig(**values)
    return transformers.LlamaForCausalLM(config).eval()


def save_hf_model(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compile cache for the whole run: ``train()``, ``generate`` and the eval
    scorers build fresh closures per call, so identical programs would otherwise recompile."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    yield
    cc.reset_cache()


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """Untied Llama, GQA 4/2, one safetensors file."""
    return save_hf_model(make_hf_model("llama", tie_word_embeddings=False), tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def hf_llama_tied_sharded_dir(tmp_path_factory):
    """Tied Llama saved in many small shards with an index."""
    model = make_hf_model("llama", seed=1, tie_word_embeddings=True, num_key_value_heads=1)
    return save_hf_model(model, tmp_path_factory.mktemp("hf") / "llama_tied", max_shard_size="40KB")


@pytest.fixture(scope="session")
def hf_mistral_dir(tmp_path_factory):
    """Untied Mistral with sliding window 8, GQA 4/2."""
    return save_hf_model(make_hf_model("mistral", seed=2, tie_word_embeddings=False),
                         tmp_path_factory.mktemp("hf") / "mistral")
