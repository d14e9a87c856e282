"""Checkpoints in transformers 5's fused Mixture-of-Experts layout (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``, router ``mlp.gate.weight``), as ``model.state_dict()`` holds them and
mergekit writes them, read by every solarjax reader against transformers' own logits.

Tiny random ``MixtralForCausalLM`` / ``OlmoeForCausalLM`` are written fused with
``safetensors.torch.save_file`` (``save_pretrained`` would write per-expert names): ``hf.load_hf``
and ``loading.load`` give transformers' logits; a linear merge of two fused Mixtrals by mergekit
loads with transformers' logits, and solarjax's merge of the same inputs (fused read per expert)
gives the same model; the streaming depth up-scaler passes fused tensors through; a fused tensor
of the wrong shape is one line naming it.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from solarjax import hf, loading, model
from solarjax.safetensors_io import CheckpointError

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
CASES = {  # name: (config class, model class, extra config)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=3, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=3, num_experts_per_tok=2)),
}
TOKENS = np.random.RandomState(0).randint(0, 61, size=(2, 9))


def tiny(name: str, seed: int = 0):
    config_name, model_name, extra = CASES[name]
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**SHAPE, **extra)).eval()


def save_fused(net, path):
    """The in-memory (fused) state dict as it is, and transformers' own config.json."""
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), sorted(state)  # fused, as promised
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    net.config.architectures = [type(net).__name__]  # as the model's save_pretrained sets it
    net.config.save_pretrained(path)
    return path


def logits_of(net, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor(tokens)).logits.float().numpy()


def our_logits(cfg, params) -> np.ndarray:
    return np.asarray(model.forward_jit(params, jnp.asarray(TOKENS), cfg))


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {name: (net, save_fused(net, root / name)) for name in CASES for net in [tiny(name)]}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_checkpoints_load_with_transformers_logits(name, fused):
    net, path = fused[name]
    cfg, params = hf.load_hf(path)
    np.testing.assert_allclose(our_logits(cfg, params), logits_of(net), atol=1e-5)
    cfg, params, _ = loading.load(path)
    np.testing.assert_allclose(our_logits(cfg, params), logits_of(net), atol=1e-5)
    assert hf.fused_layout(cfg) and not hf.fused_layout(cfg.replace(arch="llama", n_experts=0))


def test_the_streaming_upscaler_passes_fused_experts_through(fused, tmp_path):
    from solarjax.growth import dus, plans

    net, path = fused["mixtral"]
    out = dus.upscale_hf(path, tmp_path / "grown", plans.make_plan([(0, 2), (1, 2)], 2))
    grown = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert grown.config.num_hidden_layers == 3
    cfg, params = hf.load_hf(out)
    np.testing.assert_allclose(our_logits(cfg, params), logits_of(grown), atol=1e-5)


def test_a_fused_tensor_of_the_wrong_shape_is_one_line(fused, tmp_path):
    net, _ = fused["mixtral"]
    bad = save_fused(net, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 12  # the fused tensors hold 24
    (bad / "config.json").write_text(json.dumps(config))
    wrong = r"mlp\.experts\.down_proj' has shape \(3, 32, 24\).* implies \(3, 32, 12\)"  # first in the file
    with pytest.raises(CheckpointError, match=wrong):
        hf.load_hf(bad)
    with pytest.raises(CheckpointError, match=wrong):
        loading.open_tensors(bad)  # merge's reader: the header check


def test_mergekit_linear_merge_of_fused_mixtrals(fused, tmp_path):
    """mergekit's output is fused; solarjax's merge of the same inputs reads them per expert and
    writes per-expert names; both load to the merged model transformers computes."""
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from solarjax.merge import merge_checkpoints

    _, first = fused["mixtral"]
    other = tiny("mixtral", seed=1)
    second = save_fused(other, tmp_path / "second")
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(first), "parameters": {"weight": 0.7}},
                         {"model": str(second), "parameters": {"weight": 0.3}}]}
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mk").eval()
    expected = logits_of(theirs)
    cfg, params = hf.load_hf(tmp_path / "mk")
    np.testing.assert_allclose(our_logits(cfg, params), expected, atol=1e-5)

    (tmp_path / "recipe.yml").write_text(json.dumps(recipe))
    ours = merge_checkpoints(tmp_path / "recipe.yml", tmp_path / "ours")
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in hf.st.Reader(ours).shapes  # per expert
    cfg, params = hf.load_hf(ours)
    np.testing.assert_allclose(our_logits(cfg, params), expected, atol=1e-5)

    other.save_pretrained(tmp_path / "per_expert")  # one fused input and one per-expert input merge alike
    recipe["models"][1]["model"] = str(tmp_path / "per_expert")
    (tmp_path / "mixed.yml").write_text(json.dumps(recipe))
    cfg, params = hf.load_hf(merge_checkpoints(tmp_path / "mixed.yml", tmp_path / "mixed"))
    np.testing.assert_allclose(our_logits(cfg, params), expected, atol=1e-5)
