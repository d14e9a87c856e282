"""Every family through every verb, against transformers (numerics) and mergekit (up-scaling).

One random tiny transformers model per family, with odd shapes and randomised norms and biases
(so a norm applied as w instead of 1 + w, or a bias left out, changes the logits): import
logits, export -> ``from_pretrained``, greedy generation, SOLAR up-scaling on disk (mergekit's
passthrough) and in memory (transformers on the export). RoPE scalings are checked against
transformers' own inverse-frequency functions.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from solarjax import hf, model
from solarjax.growth import dus, plans
from solarjax.config import ConfigError

SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _configs():
    T = transformers
    return {
        "llama3": (T.LlamaConfig, T.LlamaForCausalLM, dict(
            tie_word_embeddings=True, rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
        "mistral_nemo": (T.MistralConfig, T.MistralForCausalLM, dict(head_dim=16, sliding_window=7)),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(
            num_attention_heads=6, tie_word_embeddings=True, rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(
            head_dim=10, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(
            head_dim=16, sliding_window=5, layer_types=GEMMA_TYPES, query_pre_attn_scalar=20,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    }


FAMILIES = ["llama3", "mistral_nemo", "qwen2", "qwen3", "gemma3"]
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 19))  # longer than the sliding windows
PROMPTS = [[5, 17, 60, 3, 20], [7, 8, 9, 10, 11, 12, 13, 14], [42, 43]]


def randomise_norms_and_biases(net: torch.nn.Module) -> None:
    """Normal noise on every norm scale and bias, so each one matters to the logits."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))


def logits_of(net, tokens) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor(np.asarray(tokens))).logits.float().numpy()


class Case:
    def __init__(self, name, path, net):
        self.name, self.path, self.net = name, path, net
        self.cfg, self.params = hf.load_hf(path)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    config_cls, model_cls, extra = _configs()[request.param]
    torch.manual_seed(0)
    config = config_cls(**{**SHAPE, **extra})
    net = model_cls(config).eval()
    randomise_norms_and_biases(net)
    path = tmp_path_factory.mktemp("families") / request.param
    net.save_pretrained(path)
    return Case(request.param, path, net)


def test_import_matches_transformers_logits(case):
    ours = model.forward_jit(case.params, jnp.asarray(TOKENS), case.cfg)
    np.testing.assert_allclose(ours, logits_of(case.net, TOKENS), atol=1e-5)


def test_export_loads_in_transformers_with_the_same_logits(case, tmp_path):
    out = hf.save_hf(case.params, case.cfg, tmp_path / "export", source_dir=case.path)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(case.net)
    np.testing.assert_allclose(logits_of(again, TOKENS), logits_of(case.net, TOKENS), atol=1e-5)
    assert hf.config_from_hf(json.loads((out / "config.json").read_text()), param_dtype="float32") == case.cfg


def test_training_loss_matches_transformers(case):
    """The training loss (chunked cross-entropy after the family's final norm) is transformers'
    loss with labels: catches a final norm applied as w instead of 1 + w (Gemma)."""
    from solarjax.train import next_token_loss

    tokens = np.asarray(TOKENS)
    batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones_like(tokens[:, 1:], np.float32),
                 segment_ids=np.ones_like(tokens[:, 1:]), positions=np.broadcast_to(np.arange(18), (2, 18)))
    ours, _ = jax.jit(next_token_loss, static_argnums=2)(case.params, jax.tree.map(jnp.asarray, batch), case.cfg)
    with torch.no_grad():
        theirs = case.net(torch.tensor(tokens), labels=torch.tensor(tokens)).loss.item()
    assert float(ours) == pytest.approx(theirs, abs=1e-5)


def test_greedy_generation_matches_transformers(case):
    """Stacked, and in the decode layout (per-layer arrays, fused qkv and gate/up): biases, q/k
    norms and head_dim != d/heads all go through the fused projections."""
    from solarjax.decode_layout import unstack_layers
    from solarjax.generate import generate

    net = case.net
    net.generation_config.eos_token_id = None  # compare full length
    net.generation_config.pad_token_id = 0
    length = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(PROMPTS):
        ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    with torch.no_grad():
        expected = net.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    assert generate(case.params, case.cfg, PROMPTS, max_new_tokens=12) == expected[:, length:].tolist()
    assert generate(unstack_layers(case.params), case.cfg, PROMPTS, max_new_tokens=12) == expected[:, length:].tolist()


def test_solar_upscale_equals_mergekit_and_transformers_agrees(case, tmp_path):
    from safetensors.torch import load_file

    from test_dus import mergekit_passthrough

    plan = plans.parse_plan_spec("solar:m=1", case.cfg.n_layers)  # layers 0..2 then 1..3
    ours_dir = dus.upscale_hf(case.path, tmp_path / "ours", plan)
    theirs_dir = tmp_path / "mergekit"
    try:
        mergekit_passthrough(case.path, theirs_dir, [(0, 3), (1, 4)])
    except Exception as err:  # noqa: BLE001 - mergekit writes the tensors, then fails to save a config whose
        assert "layer_types" in str(err)  # layer_types it does not re-index (transformers 5 checks)
    ours_t = {k: v for f in hf.safetensors_files(ours_dir) for k, v in load_file(f).items()}
    theirs_t = {k: v for f in hf.safetensors_files(theirs_dir) for k, v in load_file(f).items()}
    assert sorted(ours_t) == sorted(theirs_t)
    assert all(torch.equal(ours_t[k], theirs_t[k]) for k in theirs_t)

    grown, cfg = dus.upscale_params(case.params, case.cfg, plan)
    exported = hf.save_hf(grown, cfg, tmp_path / "in_memory", source_dir=case.path)
    for directory in (ours_dir, exported):
        written = json.loads((directory / "config.json").read_text())
        assert written["num_hidden_layers"] == 6
        if case.name == "gemma3":  # each copied layer keeps its type
            assert written["layer_types"] == [GEMMA_TYPES[i] for i in (0, 1, 2, 1, 2, 3)]
            assert cfg.layer_types == tuple(written["layer_types"])
    ours = np.asarray(model.forward_jit(grown, jnp.asarray(TOKENS), cfg))
    for directory in (ours_dir, exported):
        net = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        np.testing.assert_allclose(ours, logits_of(net, TOKENS), atol=1e-5)


# ----------------------------------------------------------------------------- spec-level checks


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2,
     "mscale": 0.7, "mscale_all_dim": 1.0, "truncate": False},
])
def test_rope_scalings_match_transformers(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim = 500000.0, 64
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=32768,
                                      rope_parameters={"rope_theta": theta, **scaling})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours, our_factor = model.inv_frequencies(head_dim, theta, scaling, 32768)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(factor, rel=1e-6)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_unsupported_rope_type_is_one_line_naming_it(hf_llama_dir, rope_type):
    raw = {**hf.read_hf_config(hf_llama_dir), "rope_parameters": {"rope_type": rope_type, "factor": 2.0}}
    with pytest.raises(ConfigError, match=rope_type) as err:
        hf.config_from_hf(raw)
    assert "\n" not in str(err.value)


def test_biases_start_at_zero_and_never_decay():
    from solarjax.config import preset
    from solarjax.optim import weight_decay_mask

    cfg = preset("tiny", arch="qwen2")
    params = model.init_params(jax.random.key(0), cfg)
    assert not np.any(np.asarray(params["layers"]["bq"]))
    mask = weight_decay_mask(params)
    assert not any(mask["layers"][k] for k in ("bq", "bk", "bv", "attn_norm", "mlp_norm"))
    assert mask["layers"]["wq"] and not mask["embed"] and not mask["final_norm"]
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    assert cfg.num_params() - preset("tiny").num_params() == cfg.n_layers * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim


# llama.cpp's tensor names (convert_hf_to_gguf.py), written out literally: HF suffix -> GGUF suffix
LLAMA_CPP_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
LLAMA_CPP_NORMS = {
    "qwen3": {"post_attention_layernorm": "ffn_norm"},
    "gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
}


def test_gguf_of_the_family_loads_with_the_same_logits(case, tmp_path):
    """The family's model written as llama.cpp writes it (no Q/K permutation outside 'llama';
    Gemma's norms stored as 1 + w), read back by ``solarjax.gguf`` (Qwen3 and Gemma 3 here; Llama's
    GGUFs are tested in test_gguf.py)."""
    import gguf

    from solarjax import gguf as sg

    arch, cfg = case.name, case.cfg
    if arch not in LLAMA_CPP_NORMS:
        pytest.skip("GGUF checked for qwen3 and gemma3 here")
    writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    if arch == "qwen3":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(2.0)
    else:
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(cfg.vocab_size - 3)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([2, 3, 3] + [1] * (cfg.vocab_size - 3))
    names = {**LLAMA_CPP_NAMES, **LLAMA_CPP_NORMS[arch]}
    for name, w in case.net.state_dict().items():
        w = w.numpy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            stem, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{names[stem]}.{kind}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
            if gname == "output.weight" and cfg.tie_embeddings:
                continue
        if arch == "gemma3" and "norm" in gname:
            w = w + 1.0  # llama.cpp's Gemma converter stores 1 + w
        writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # GGUF carries neither Gemma's layer pattern of this toy model nor query_pre_attn_scalar
    overrides = dict(layer_types=cfg.layer_types, query_pre_attn_scalar=cfg.query_pre_attn_scalar) \
        if arch == "gemma3" else {}
    got_cfg, params, _ = sg.load_gguf(tmp_path / f"{arch}.gguf", **overrides)
    assert got_cfg.arch == arch and got_cfg.rope_scaling == cfg.rope_scaling
    ours = model.forward_jit(params, jnp.asarray(TOKENS), got_cfg)
    np.testing.assert_allclose(ours, logits_of(case.net, TOKENS), atol=1e-5)
