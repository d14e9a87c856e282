"""solarjax.nnx: every family as a Flax NNX module, against transformers, NumPy, Qwix and Tunix.

Tiny random transformers models (the fixtures of tests/test_families.py and tests/test_moe.py):
the NNX model's logits equal the pure-functional model's and transformers' (with Tunix's causal
mask too); params -> NNX -> split/merge -> pure dict -> params is bit-exact; an up-scaled model
(``dus.apply_plan``) agrees with transformers on its export; Qwix PTQ int8 equals the model with
its projections fake-quantized per output channel in NumPy, int4 with group-wise scales stays near
float; a few Tunix LoRA SFT steps lower the loss, and the merged LoRA exported to HF loads in
transformers with the LoRA model's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("flax.nnx")
from flax import nnx  # noqa: E402

from solarjax import hf, model  # noqa: E402
from solarjax.growth import dus  # noqa: E402
from solarjax import nnx as snnx  # noqa: E402
from test_families import SHAPE, Case, _configs, logits_of, randomise_norms_and_biases  # noqa: E402
from test_moe import CASES as MOE_CASES  # noqa: E402
from test_moe import SHAPE as MOE_SHAPE  # noqa: E402

TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 13)).astype(np.int32)
FAMILIES = ["llama3", "qwen2", "qwen3", "gemma3", "mixtral_e5_k3"]


def build(name: str):
    """(torch model, HF directory's params and config) of one tiny random family."""
    torch.manual_seed(0)
    if name in MOE_CASES:
        config_name, model_name, extra = MOE_CASES[name]
        net = getattr(transformers, model_name)(getattr(transformers, config_name)(**MOE_SHAPE, **extra)).eval()
    else:
        config_cls, model_cls, extra = _configs()[name]
        net = model_cls(config_cls(**{**SHAPE, **extra})).eval()
    randomise_norms_and_biases(net)
    return net


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    net = build(request.param)
    path = tmp_path_factory.mktemp("nnx") / request.param
    net.save_pretrained(path)
    return Case(request.param, path, net)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    net = build("llama3")
    path = tmp_path_factory.mktemp("nnx") / "llama3"
    net.save_pretrained(path)
    return Case("llama3", path, net)


def causal_mask(tokens: np.ndarray) -> jax.Array:
    """Tunix's attention mask for unpadded rows (tunix.sft.utils.make_causal_attn_mask, spelled out)."""
    t = tokens.shape[1]
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))


@nnx.jit
def call(net, *args):
    return net(*args)


def test_logits_equal_the_pure_model_and_transformers(case):
    net = snnx.from_params(case.params, case.cfg)
    logits, cache = call(net, jnp.asarray(TOKENS))
    assert cache is None and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, model.forward_jit(case.params, jnp.asarray(TOKENS), case.cfg), atol=1e-5)
    np.testing.assert_allclose(logits, logits_of(case.net, TOKENS), atol=1e-5)
    positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)
    masked, _ = call(net, jnp.asarray(TOKENS), positions, None, causal_mask(TOKENS))  # Tunix's call
    np.testing.assert_allclose(masked, logits, atol=1e-5)


def test_params_round_trip_bit_exact_through_split_merge_and_pure_dict(case):
    net = snnx.from_params(case.params, case.cfg)
    graphdef, state = nnx.split(net)
    again = snnx.params_from_pure_dict(nnx.to_pure_dict(state), case.cfg)
    merged = snnx.to_params(nnx.merge(graphdef, state))
    for back in (again, merged):
        assert jax.tree.structure(back) == jax.tree.structure(case.params)
        for ours, theirs in zip(jax.tree.leaves(back), jax.tree.leaves(case.params)):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_submodules_carry_the_hf_names(llama):
    pure = nnx.to_pure_dict(nnx.state(snnx.from_params(llama.params, llama.cfg)))
    layer = pure["model"]["layers"][3]
    assert set(layer) == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    # kernel (in, out): HF's weight transposed
    hf_q = llama.net.model.layers[3].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(layer["self_attn"]["q_proj"]["kernel"], hf_q.T)
    assert "lm_head" not in pure and len(pure["model"]["layers"]) == llama.cfg.n_layers  # tied head


def test_an_upscaled_model_agrees_with_transformers_on_its_export(llama, tmp_path):
    grown, grown_cfg = dus.apply_plan(llama.params, llama.cfg, [(0, 3), (1, 4)])
    net = snnx.from_params(grown, grown_cfg)
    assert len(net.model.layers) == 6
    logits, _ = call(net, jnp.asarray(TOKENS))
    out = hf.save_hf(grown, grown_cfg, tmp_path / "grown", source_dir=llama.path)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(logits, logits_of(again, TOKENS), atol=1e-5)


def check_quantized(quantized, params, cfg, bits: int, group: int | None) -> None:
    """Check every projection's Qwix integers and scales against NumPy.

    NumPy's scheme: one absmax scale per output column (per ``group`` inputs, if given) mapping the
    absmax to qmax + 0.5 (Qwix's symmetric bound, numerics.get_symmetric_bound); each integer is a
    nearest integer of ``w / scale`` (ties either way) in [-qmax - 1, qmax]."""
    qmax = 2 ** (bits - 1) - 1
    out = jax.tree.map(np.asarray, params)
    for where in snnx.places(cfg)[0]:
        if not where.linear:
            continue
        n_in, n_out = snnx.kernel_shape(where.param, cfg)
        g = group or n_in
        for i, layer in enumerate(quantized.model.layers):
            array = snnx.find(layer, where).kernel.array
            k = out["layers"][where.param.name][i].reshape(n_in // g, g, n_out)
            scale = np.abs(k).max(axis=1, keepdims=True) / (qmax + 0.5)
            np.testing.assert_allclose(np.asarray(array.scale).reshape(scale.shape), scale, rtol=1e-6)
            ints = np.asarray(array.qvalue, np.float32).reshape(k.shape)
            assert np.abs(ints - k / scale).max() <= 0.5 + 1e-4 and ints.min() >= -qmax - 1 and ints.max() <= qmax


def test_qwix_ptq_int8_and_grouped_int4_of_every_projection(llama):
    qwix = pytest.importorskip("qwix")
    net = snnx.from_params(llama.params, llama.cfg)
    tokens = jnp.asarray(TOKENS)
    floats, _ = net(tokens)
    rel = lambda x: float(jnp.linalg.norm(x - floats) / jnp.linalg.norm(floats))  # noqa: E731
    errors = {}
    for qtype, bits, group in (("int8", 8, None), ("int4", 4, 24)):  # int4: one scale per 24 inputs
        rules = [qwix.QuantizationRule(module_path=r".*_proj", weight_qtype=qtype, tile_size=group)]
        quantized = qwix.quantize_model(net, qwix.PtqProvider(rules), tokens)
        assert quantized.model.layers[0].mlp.down_proj.kernel.array.qvalue.dtype == jnp.dtype(qtype)
        logits, _ = quantized(tokens)
        check_quantized(quantized, llama.params, llama.cfg, bits, group)
        dequantized = snnx.dequantized_params(quantized)
        np.testing.assert_allclose(logits, model.forward_jit(dequantized, tokens, llama.cfg), atol=1e-4)
        errors[qtype] = rel(logits)
    assert 1e-4 < errors["int8"] < 0.02 < errors["int4"] < 0.3, errors


def test_tunix_lora_sft_lowers_the_loss_and_the_merged_export_loads_in_transformers(llama, tmp_path):
    qwix = pytest.importorskip("qwix")
    peft_trainer = pytest.importorskip("tunix.sft.peft_trainer")
    from tunix.sft import utils as tunix_utils
    import optax

    alpha, tokens = 8.0, jnp.asarray(TOKENS)
    lora = qwix.apply_lora_to_model(snnx.from_params(llama.params, llama.cfg),
                                    qwix.LoraProvider([qwix.LoraRule(module_path=r".*_proj", rank=4, alpha=alpha)]),
                                    tokens, rngs=nnx.Rngs(0))

    def loss(m):
        logits, _ = m(tokens)
        return float(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean())

    def model_inputs(x):
        mask = jnp.ones_like(x.input_tokens, bool)
        return dict(input_tokens=x.input_tokens, input_mask=x.input_mask,
                    positions=tunix_utils.build_positions_from_mask(mask),
                    attention_mask=tunix_utils.make_causal_attn_mask(mask))

    before = loss(lora)
    config = peft_trainer.TrainingConfig(eval_every_n_steps=1000, max_steps=6, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(lora, optax.adam(3e-2), config).with_gen_model_input_fn(model_inputs)
    trainer.train([peft_trainer.TrainingInput(input_tokens=TOKENS, input_mask=np.ones_like(TOKENS, bool))] * 6)
    after = loss(lora)
    assert after < 0.8 * before
    base = snnx.to_params(lora)  # the frozen base is untouched by LoRA training
    for ours, theirs in zip(jax.tree.leaves(base), jax.tree.leaves(llama.params)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    out = hf.save_hf(snnx.merge_lora(lora, alpha), llama.cfg, tmp_path / "merged", source_dir=llama.path)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    trained, _ = lora(tokens)
    np.testing.assert_allclose(logits_of(again, TOKENS), trained, atol=2e-5)
