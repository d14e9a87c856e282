"""Mixture-of-Experts (solarjax.moe; the MoE families) against transformers and NumPy.

Random tiny ``MixtralForCausalLM``, ``OlmoeForCausalLM``, ``Qwen3MoeForCausalLM`` and
``Qwen2MoeForCausalLM`` (its shared expert) with odd expert counts and k (and OLMoE with and without renormalised top-k weights): import logits, packed segments, export round
trip, greedy generation; the router's losses from transformers' router logits in NumPy (and
transformers' own ``load_balancing_loss_func`` per layer); every dispatch (ragged, blocked,
Megablox interpreted) against a per-token NumPy loop and the dense reference, forward and
gradients (an idle expert included); 1 device against an 8-device mesh with the experts sharded; config and mesh errors; parameter and FLOP
counts from the torch model's own parameters; ``solarjax train`` on the ``tiny_moe`` preset;
depth up-scaling of a Mixtral on disk and in memory.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from solarjax import hf, model, moe
from solarjax import sharding as shd
from solarjax.config import ConfigError, ModelConfig

SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
CASES = {  # name: (config class, model class, extra config)
    "mixtral_e5_k3": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=5, num_experts_per_tok=3)),
    "olmoe_e3_k1": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=3, num_experts_per_tok=1,
                                                              norm_topk_prob=False)),
    "olmoe_e3_k2_norm": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=3, num_experts_per_tok=2,
                                                                   norm_topk_prob=True)),
    "qwen3_moe_e4_k2": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2,
                                                                       moe_intermediate_size=24, head_dim=10,
                                                                       norm_topk_prob=True)),
    "qwen2_moe_e3_k2_shared": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=20)),
}
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 13))
PROMPTS = [[5, 17, 60, 3, 20], [7, 8, 9, 10, 11, 12, 13, 14], [42, 43]]


def logits_of(net, tokens, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return net(torch.tensor(np.asarray(tokens)), **kwargs).logits.float().numpy()


class Case:
    def __init__(self, name, path, net):
        self.name, self.path, self.net = name, path, net
        self.cfg, self.params = hf.load_hf(path)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_name, model_name, extra = CASES[request.param]
    torch.manual_seed(0)
    net = getattr(transformers, model_name)(getattr(transformers, config_name)(**SHAPE, **extra)).eval()
    with torch.no_grad():  # random norms (OLMoE's whole-projection q/k norms) and biases, so each one matters
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("moe") / request.param
    net.save_pretrained(path)
    return Case(request.param, path, net)


# ----------------------------------------------------------------------------- checkpoints


def test_import_matches_transformers_logits(case):
    cfg = case.cfg
    hf_config = case.net.config
    assert cfg.n_experts == getattr(hf_config, "num_local_experts", getattr(hf_config, "num_experts", None))
    assert cfg.experts_per_token == case.net.config.num_experts_per_tok
    ours = model.forward_jit(case.params, jnp.asarray(TOKENS), cfg)
    np.testing.assert_allclose(ours, logits_of(case.net, TOKENS), atol=1e-5)


def test_packed_segments_equal_separate_documents(case):
    """Two documents packed in one row (segment ids 1, 2; positions restart) and a padded tail."""
    if case.name != "mixtral_e5_k3":
        pytest.skip("checked once")
    doc_a, doc_b = TOKENS[0, :6], TOKENS[1, :5]
    row = np.concatenate([doc_a, doc_b, [0, 0]])[None]
    segments = np.array([[1] * 6 + [2] * 5 + [0, 0]])
    ours = np.asarray(model.forward_jit(case.params, jnp.asarray(row), case.cfg, segment_ids=jnp.asarray(segments)))
    np.testing.assert_allclose(ours[0, :6], logits_of(case.net, doc_a[None])[0], atol=1e-5)
    np.testing.assert_allclose(ours[0, 6:11], logits_of(case.net, doc_b[None])[0], atol=1e-5)


def test_export_round_trip(case, tmp_path):
    out = hf.save_hf(case.params, case.cfg, tmp_path / "export", source_dir=case.path)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(again) is type(case.net)
    np.testing.assert_allclose(logits_of(again, TOKENS), logits_of(case.net, TOKENS), atol=1e-5)
    cfg2, params2 = hf.load_hf(out)
    assert cfg2 == case.cfg
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), case.params, params2)
    assert all(jax.tree.leaves(same))


def test_greedy_generation_matches_transformers(case):
    """Stacked, and in the decode layout (per-layer arrays, fused qkv; experts stay apart)."""
    from solarjax.decode_layout import unstack_layers
    from solarjax.generate import generate

    if case.name == "olmoe_e3_k2_norm":
        pytest.skip("one OLMoE is enough (the renormalised router is checked on logits)")
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
        expected = net.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert generate(case.params, case.cfg, PROMPTS, max_new_tokens=10) == expected[:, length:].tolist()
    assert generate(unstack_layers(case.params), case.cfg, PROMPTS, max_new_tokens=10) == expected[:, length:].tolist()


# ----------------------------------------------------------------------------- auxiliary losses


def numpy_router_losses(layer_logits: list[np.ndarray], valid: np.ndarray, k: int) -> dict[str, float]:
    """Switch load balancing (E * sum_i f_i P_i, top-k counts) and the ST-MoE z-loss
    (mean logsumexp^2), per layer over the valid tokens, averaged over layers; router entropy."""
    balance, z, entropy = [], [], []
    for logits in layer_logits:
        logits = logits.astype(np.float64)[valid]
        num_experts = logits.shape[-1]
        lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
        probs = np.exp(logits - lse[:, None])
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        counts = np.zeros(num_experts)
        np.add.at(counts, top.reshape(-1), 1.0)
        f, p = counts / len(logits), probs.mean(0)
        balance.append(num_experts * np.sum(f * p))
        z.append(np.mean(lse ** 2))
        entropy.append(np.mean(-np.sum(probs * np.log(probs), -1)))
    return {"moe_balance_loss": np.mean(balance), "moe_z_loss": np.mean(z), "router_entropy": np.mean(entropy)}


def test_aux_losses_equal_the_published_formulas(case):
    """Left-padded batch: router logits of the valid tokens from transformers, losses in NumPy;
    and transformers' load_balancing_loss_func layer by layer (it pools layers; we average)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = case.cfg
    tokens = TOKENS.copy()
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # row 1 left-padded
    tokens[1, :4] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = case.net(torch.tensor(tokens), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions),
                       output_router_logits=True)
    layer_logits = [t.float().numpy() for t in out.router_logits]
    assert len(layer_logits) == cfg.n_layers
    valid = mask.reshape(-1).astype(bool)
    expected = numpy_router_losses(layer_logits, valid, cfg.experts_per_token)

    run = jax.jit(lambda p, t, s, pos: model.hidden_states_and_aux(p, t, cfg, positions=pos, segment_ids=s)[1])
    aux = run(case.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions))
    for name, value in expected.items():
        np.testing.assert_allclose(float(aux[name]), value, rtol=2e-5, err_msg=name)
    hf_balance = np.mean([float(load_balancing_loss_func((torch.tensor(lg),), cfg.n_experts, cfg.experts_per_token,
                                                         torch.tensor(mask))) for lg in layer_logits])
    np.testing.assert_allclose(float(aux["moe_balance_loss"]), hf_balance, rtol=2e-5)
    load = np.asarray(aux["expert_load"])
    assert load.shape == (cfg.n_layers, cfg.n_experts)
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)

    # padding is excluded: the same losses with the padded positions' tokens changed
    other = tokens.copy()
    other[1, :4] = 50
    aux2 = run(case.params, jnp.asarray(other), jnp.asarray(mask), jnp.asarray(positions))
    for name in expected:
        np.testing.assert_allclose(float(aux2[name]), float(aux[name]), rtol=1e-6, err_msg=name)


def test_training_loss_adds_the_weighted_aux_losses(case):
    from solarjax.train import next_token_loss

    if case.name != "olmoe_e3_k2_norm":
        pytest.skip("checked once")
    cfg = case.cfg.replace(router_aux_loss_coef=0.03, router_z_loss_coef=0.002)
    batch = train_batch(TOKENS)
    loss, metrics = jax.jit(lambda p, b: next_token_loss(p, b, cfg))(case.params, batch)
    logits = logits_of(case.net, TOKENS)[:, :-1].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = np.mean(lse - np.take_along_axis(logits, TOKENS[:, 1:, None], -1)[..., 0])
    np.testing.assert_allclose(float(metrics["loss"]), ce, rtol=1e-5)
    expected = ce + 0.03 * float(metrics["moe_balance_loss"]) + 0.002 * float(metrics["moe_z_loss"])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert {"moe_balance_loss", "moe_z_loss", "router_entropy", "expert_load_max", "expert_load_min"} <= set(metrics)


def train_batch(tokens: np.ndarray) -> dict[str, jax.Array]:
    """Next-token batch over ``tokens`` (the last position has no target)."""
    batch, seq = tokens.shape
    mask = np.ones((batch, seq), np.float32)
    mask[:, -1] = 0
    return {"tokens": jnp.asarray(tokens, jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, 1), jnp.int32),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones((batch, seq), jnp.int32),
            "positions": jnp.asarray(np.tile(np.arange(seq, dtype=np.int32), (batch, 1)))}


# ----------------------------------------------------------------------------- dispatch


def numpy_experts(x, weights, experts, w_gate, w_up, w_down) -> np.ndarray:
    """Token by token, each of its k experts' SwiGLU MLP times its routing weight (float64)."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(np.asarray(weights[n]), np.asarray(experts[n])):
            gate, up = x[n] @ w_gate[e], x[n] @ w_up[e]
            out[n] += w * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


def test_every_dispatch_equals_a_numpy_loop_and_the_dense_reference():
    """ragged, blocked (two block sizes: several blocks per expert, and one row per block) and
    Megablox (the Pallas TPU kernel, interpreted): outputs and the gradients of every input
    (router included), with every expert used and with one expert no token chooses (an empty group)."""
    import functools

    from solarjax.attention import kernels_interpreted

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=12, arch="mixtral",
                      n_experts=5, experts_per_token=3, norm_topk_prob=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 16)).astype(np.float32)
    x[:, 0] = 1.0  # a constant feature, so a router column can rule an expert out for every token
    x = jnp.asarray(x)
    w_router = rng.standard_normal((16, 5)).astype(np.float32)
    w_gate, w_up = (jnp.asarray(0.3 * rng.standard_normal((5, 16, 12)), jnp.float32) for _ in range(2))
    w_down = jnp.asarray(0.3 * rng.standard_normal((5, 12, 16)), jnp.float32)

    def compiled(dispatch):  # the output and the grads of sum(sin(out)), one program per dispatch
        def out_and_loss(x, w_router, w_gate, w_up, w_down):
            r = moe.route(x, w_router, cfg)
            out = dispatch(x, r.weights, r.experts, w_gate, w_up, w_down, jax.nn.silu)
            return jnp.sum(jnp.sin(out)), out
        return jax.jit(jax.value_and_grad(out_and_loss, argnums=range(5), has_aux=True))

    dense_fn = compiled(moe.dense_experts)
    with kernels_interpreted():
        others = {"ragged": compiled(moe.ragged_experts), "blocked4": compiled(functools.partial(moe.blocked_experts, block=4)),
                  "blocked1": compiled(functools.partial(moe.blocked_experts, block=1)),
                  "megablox": compiled(functools.partial(moe.megablox_experts, interpret=True))}
    unused = w_router.copy()
    unused[:, 4] = 0
    unused[0, 4] = -50  # expert 4's logit is -50 for every token
    for router, idle in ((w_router, 0), (unused, 1)):
        routing = moe.route(x, jnp.asarray(router), cfg)
        assert (np.bincount(np.asarray(routing.experts).reshape(-1), minlength=5) == 0).sum() == idle
        expected = numpy_experts(x, routing.weights, routing.experts, w_gate, w_up, w_down)
        args = (x, jnp.asarray(router), w_gate, w_up, w_down)
        (_, dense), g_dense = dense_fn(*args)
        np.testing.assert_allclose(dense, expected, atol=1e-5)
        assert float(jnp.abs(g_dense[1]).max()) > 0  # the router is trained through the weights
        for dispatch, fn in others.items():
            (_, out), grads = fn(*args)
            np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=dispatch)
            for name, a, b in zip(("x", "w_router", "w_gate", "w_up", "w_down"), grads, g_dense):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{dispatch}: {name}")


# ----------------------------------------------------------------------------- sharding


def mesh_cfg(**overrides) -> ModelConfig:
    values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, arch="mixtral",
                  n_experts=4, experts_per_token=2, router_z_loss_coef=0.001)
    return ModelConfig(**{**values, **overrides})


def test_one_device_equals_eight_with_the_experts_sharded():
    """Training loss, MoE metrics and gradients on 1 device and on a data=2 x fsdp=4 mesh with the
    experts sharded over fsdp (ragged dispatch per device in shard_map)."""
    from solarjax.train import next_token_loss
    from train_fixtures import numpy_params

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (emulated) devices")
    cfg = mesh_cfg()
    params = numpy_params(cfg, seed=1)
    tokens = np.random.RandomState(1).randint(0, 64, (8, 12))
    batch = train_batch(tokens)
    batch["segment_ids"] = batch["segment_ids"].at[3, :5].set(0)  # some padding
    grad_fn = jax.value_and_grad(lambda p, b: next_token_loss(p, b, cfg), has_aux=True)
    (l1, m1), g1 = jax.jit(grad_fn)(params, batch)

    mesh = shd.make_mesh(data=2, fsdp=4)
    p_sh, b_sh = shd.param_shardings(cfg, mesh), shd.batch_sharding(mesh)
    assert p_sh["layers"]["w_gate"].spec[1] == "fsdp"  # (layers, experts, embed, mlp): experts over fsdp
    params8, batch8 = jax.device_put(params, p_sh), jax.device_put(batch, b_sh)
    (l8, m8), g8 = jax.jit(shd.with_activation_sharding(grad_fn, b_sh["tokens"]))(params8, batch8)
    assert params8["layers"]["w_up"].addressable_shards[0].data.shape[1] == 1  # 4 experts / fsdp 4
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6)
    for name in m1:
        np.testing.assert_allclose(np.asarray(m8[name]), np.asarray(m1[name]), rtol=1e-5, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


def test_a_mesh_that_does_not_divide_the_experts_is_a_sharding_error():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (emulated) devices")
    mesh = shd.make_mesh(data=-1, fsdp=4)
    with pytest.raises(shd.ShardingError, match="experts") as err:
        shd.param_shardings(mesh_cfg(n_experts=3), mesh)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch, n_experts, needle", [("llama", 4, "dense"), ("mixtral", 0, "Mixture-of-Experts"),
                                                      ("olmoe", 0, "n_experts")])
def test_moe_fields_must_match_the_family(arch, n_experts, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        mesh_cfg(arch=arch, n_experts=n_experts)
    assert "\n" not in str(err.value)


def test_experts_per_token_must_fit_the_experts():
    with pytest.raises(ConfigError, match="experts_per_token"):
        mesh_cfg(n_experts=3, experts_per_token=4)


# ----------------------------------------------------------------------------- counts


def test_parameter_and_flop_counts_match_the_torch_model(case):
    cfg = case.cfg
    counts = {name: p.numel() for name, p in case.net.named_parameters()}
    total = sum(counts.values())
    experts = sum(n for name, n in counts.items() if ".experts." in name)
    embedding = counts["model.embed_tokens.weight"]
    active = total - experts + experts * cfg.experts_per_token / cfg.n_experts
    assert cfg.num_params() == total
    assert cfg.num_params(active=True) == int(active)
    assert cfg.num_params(include_embeddings=False, active=True) == int(active - embedding)
    seq = 32
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq  # 12 L h d T
    assert cfg.flops_per_token(seq) == pytest.approx(6 * (active - embedding) + attention)
    assert sum(np.asarray(x).size for x in jax.tree.leaves(case.params)) == total


def test_export_config_keeps_the_router_fields(case, tmp_path):
    out = hf.save_hf(case.params, case.cfg.replace(router_aux_loss_coef=0.02), tmp_path / "cfg", source_dir=case.path)
    written = json.loads((out / "config.json").read_text())
    assert written["num_experts_per_tok"] == case.cfg.experts_per_token
    assert math.isclose(written["router_aux_loss_coef"], 0.02)
    if written["model_type"] == "olmoe":
        assert written["norm_topk_prob"] == case.cfg.norm_topk_prob


# ----------------------------------------------------------------------------- the train verb


def test_solarjax_train_on_the_tiny_moe_preset_logs_the_router_figures(tmp_path):
    """``solarjax train --config tiny_moe`` on 8 emulated devices (experts over fsdp), a few steps on
    the shipped corpus: metrics.jsonl carries the MoE figures, and the HF export loads in transformers."""
    from solarjax.cli import main

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (emulated) devices")
    run, export = tmp_path / "run", tmp_path / "hf"
    argv = ["train", "--config", "tiny_moe", "--steps", "2", "--out", str(run), "--export-hf", str(export),
            "--no-progress", "--config.model.n_layers=2", "--config.train.batch_size=8", "--config.train.seq_len=16",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.mesh.data=2",
            "--config.mesh.fsdp=4"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert {"moe_balance_loss", "moe_z_loss", "router_entropy", "expert_load_max", "expert_load_min"} <= set(r)
        assert r["moe_balance_loss"] >= 1.0 - 1e-6  # E * sum f P >= 1 (equality at uniform routing)
        assert 0 < r["router_entropy"] <= math.log(4) + 1e-6
        assert r["expert_load_min"] <= 1.0 <= r["expert_load_max"]
        assert len(r["expert_load"]) == 4 and np.mean(r["expert_load"]) == pytest.approx(1.0, abs=1e-4)
    net = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert type(net).__name__ == "MixtralForCausalLM" and net.config.num_local_experts == 4
    cfg, params = hf.load_hf(export)
    np.testing.assert_allclose(model.forward_jit(params, jnp.asarray(TOKENS), cfg), logits_of(net, TOKENS), atol=1e-5)


# ----------------------------------------------------------------------------- depth up-scaling


def test_depth_upscaling_copies_whole_moe_layers(case, tmp_path):
    """DUS on a Mixtral (layers 0, 1, 1: the experts and router move with their layer): on disk
    (``dus.upscale_hf``) every tensor of new layer j is the source's planned layer's, byte for
    byte; in memory (``upscale_params``) the export is the same checkpoint, and transformers
    computes the grown model's logits as solarjax does."""
    from safetensors.numpy import load_file

    from solarjax.growth import dus, plans

    if case.name != "mixtral_e5_k3":
        pytest.skip("checked once")
    plan = plans.make_plan([(0, 2), (1, 2)], case.cfg.n_layers)
    source = {k: v for f in hf.safetensors_files(case.path) for k, v in load_file(f).items()}
    on_disk = dus.upscale_hf(case.path, tmp_path / "disk", plan)
    grown_t = {k: v for f in hf.safetensors_files(on_disk) for k, v in load_file(f).items()}
    prefix = "model.layers."
    for name, value in grown_t.items():
        if name.startswith(prefix):
            new_i, rest = name[len(prefix):].split(".", 1)
            src_name = f"{prefix}{plans.plan_layers(plan)[int(new_i)]}.{rest}"
        else:
            src_name = name
        np.testing.assert_array_equal(value, source[src_name], err_msg=name)
    assert sum(".experts.4.w2." in k for k in grown_t) == 3

    grown, cfg = dus.upscale_params(case.params, case.cfg, plan)
    assert cfg.n_layers == 3 and grown["layers"]["w_gate"].shape == (3, 5, 48, 40)
    in_memory = hf.save_hf(grown, cfg, tmp_path / "memory", source_dir=case.path)
    exported = {k: v for f in hf.safetensors_files(in_memory) for k, v in load_file(f).items()}
    assert sorted(exported) == sorted(grown_t)
    assert all(np.array_equal(exported[k], grown_t[k]) for k in grown_t)
    net = transformers.AutoModelForCausalLM.from_pretrained(on_disk, dtype=torch.float32).eval()
    np.testing.assert_allclose(model.forward_jit(grown, jnp.asarray(TOKENS), cfg), logits_of(net, TOKENS), atol=1e-5)
