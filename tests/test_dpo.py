"""DPO: loss vs NumPy on transformers' sequence log-probs, pair layout under microbatching, learning, bad data."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_hf_model, save_hf_model  # noqa: E402
from sft_fixtures import (build_tokenizer, hf_tokenizer, model_with_tokenizer, preference_records,  # noqa: E402
                          write_jsonl)

from solarjax import dpo, losses, sft  # noqa: E402
from solarjax.config import ConfigError  # noqa: E402
from solarjax.data import load_tokenizer  # noqa: E402

# one UltraFeedback-style record: chosen is the whole chat, rejected only the answer
CHAT_RECORD = {"prompt": "Repeat the words: red cat",
               "chosen": [{"role": "user", "content": "Repeat the words: red cat"},
                          {"role": "assistant", "content": "red cat"}],
               "rejected": [{"role": "assistant", "content": "dog sun moon"}]}


@pytest.fixture(scope="module")
def policy_dir(hf_llama_dir, tmp_path_factory):
    return model_with_tokenizer(hf_llama_dir, tmp_path_factory.mktemp("dpo") / "policy")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    path = save_hf_model(make_hf_model("llama", seed=7, tie_word_embeddings=False),
                         tmp_path_factory.mktemp("dpo") / "reference")
    build_tokenizer(path)
    return path


def _hf_logps(model_dir, records):
    """Per record: (chosen, rejected) summed log-probs and completion lengths, with transformers only."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = hf_tokenizer(model_dir)
    out = []
    for r in records:
        prompt = [{"role": "user", "content": r["prompt"]}]
        p_ids = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        row = []
        for key in ("chosen", "rejected"):
            answer = r[key] if isinstance(r[key], str) else r[key][-1]["content"]
            ids = hf.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                         return_dict=True)["input_ids"]
            assert ids[:len(p_ids)] == p_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
            tok_logp = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
            row.append((float(tok_logp[len(p_ids) - 1:].sum()), len(ids) - len(p_ids)))
        out.append(row)
    return out


def _numpy_dpo(policy, reference, beta, ls, loss_type):
    def logp(entry):
        total, n = entry
        return total / n if loss_type == "ipo" else total

    pc, pr = np.array([[logp(p[0]), logp(p[1])] for p in policy]).T
    rc, rr = np.array([[logp(p[0]), logp(p[1])] for p in reference]).T
    h = (pc - pr) - (rc - rr)
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        log_sig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
        losses = -(1 - ls) * log_sig(beta * h) - ls * log_sig(-beta * h)
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    return {"loss": losses.mean(), "reward_accuracy": (cr > rj).mean(), "reward_margin": (cr - rj).mean()}


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_equals_numpy_on_transformers_logps(tmp_path, policy_dir, reference_dir, loss_type, ls, logps_cache={}):
    import jax

    from solarjax.hf import load_hf

    records = preference_records(5) + [CHAT_RECORD]
    if "hf" not in logps_cache:
        logps_cache["hf"] = (_hf_logps(policy_dir, records), _hf_logps(reference_dir, records))
    hf_policy, hf_reference = logps_cache["hf"]
    expected = _numpy_dpo(hf_policy, hf_reference, 0.5, ls, loss_type)

    encoder = sft.make_encoder(_config_with_dpo(), _cfg(policy_dir), load_tokenizer(policy_dir), policy_dir, "dpo")
    assert encoder.template == "chat"
    pairs, _ = dpo.load_pairs(str(write_jsonl(tmp_path / "p.jsonl", records)), encoder)
    batch = next(iter(dpo.make_dpo_dataset(pairs, seq_len=48, pairs_per_batch=len(records), shuffle=False,
                                           repeat=False)))
    assert batch["tokens"].shape == (2 * len(records), 48)
    cfg, policy = load_hf(policy_dir)
    _, reference = load_hf(reference_dir)
    logps = jax.jit(lambda p, b: losses.sequence_logps(p, b, cfg, average=loss_type == "ipo"))
    ref_logps = logps(reference, batch)
    loss_fn = jax.jit(losses.make_dpo_loss_fn(0.5, ls, loss_type), static_argnums=2)
    _, metrics = loss_fn(policy, {**batch, "ref_logps": ref_logps}, cfg)
    for key, value in expected.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-6, err_msg=key)


def _config_with_dpo():
    from solarjax.config import load_config

    return load_config("dpo_tiny")


def _cfg(model_dir):
    from solarjax.hf import config_from_hf, read_hf_config

    return config_from_hf(read_hf_config(model_dir))


def test_pairs_stay_whole_in_microbatches_and_across_processes():
    """Rows i::n (grad accumulation) of a 2-process global batch still hold both rows of every pair."""
    rng = np.random.default_rng(0)
    ex = lambda n: {"inputs": np.arange(n), "targets": np.arange(n), "loss_mask": np.ones(n, np.int32)}  # noqa: E731
    pairs = [(ex(rng.integers(2, 9)), ex(rng.integers(2, 9))) for _ in range(16)]
    parts = [next(iter(dpo.make_dpo_dataset(pairs, seq_len=8, pairs_per_batch=4, shuffle=False, process_index=i,
                                            process_count=2))) for i in range(2)]
    pair = np.concatenate([p["pair"] for p in parts])  # the global batch: process 0's rows, then process 1's
    assert sorted(np.abs(pair)) == sorted(list(range(1, 9)) * 2)
    policy, reference = rng.normal(size=16), rng.normal(size=16)
    full = losses.dpo_loss(policy, reference, pair, beta=0.3)[1]
    micro = []
    for i in range(2):  # solarjax.train's microbatch split
        rows = np.arange(i, 16, 2)
        assert sorted(pair[rows][pair[rows] > 0]) == sorted(-pair[rows][pair[rows] < 0])
        micro.append(losses.dpo_loss(policy[rows], reference[rows], pair[rows], beta=0.3)[1])
    for key in ("loss", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(np.mean([float(m[key]) for m in micro]), float(full[key]), rtol=1e-6)
    # an eval set that does not fill the last batch: empty rows (pair 0) change nothing
    last = list(dpo.make_dpo_dataset(pairs[:5], seq_len=8, pairs_per_batch=4, shuffle=False, repeat=False))[-1]
    np.testing.assert_array_equal(last["pair"], [1, -1, 0, 0, 0, 0, 0, 0])
    padded = losses.dpo_loss(policy[:8], reference[:8], last["pair"], beta=0.3)[1]
    alone = losses.dpo_loss(policy[:2], reference[:2], np.array([1, -1]), beta=0.3)[1]
    assert float(padded["loss"]) == pytest.approx(float(alone["loss"]), rel=1e-6)


def test_dpo_steps_raise_reward_accuracy(tmp_path, policy_dir):
    """Policy starts equal to the reference (loss ln 2, zero margins); a few steps separate the pairs."""
    import jax

    from solarjax.config import apply_overrides
    from solarjax.hf import load_hf

    data = write_jsonl(tmp_path / "prefs.jsonl", preference_records(16))
    config = _config_with_dpo()
    apply_overrides(config, [f"init.source='{policy_dir}'", f"data.source='{data}'", f"data.eval_source='{data}'",
                             f"train.out_dir='{tmp_path / 'run'}'", "train.steps=8", "train.batch_size=4",
                             "train.grad_accum=2", "train.seq_len=40", "train.log_every=1", "train.eval_every=8",
                             "train.eval_batches=4", "train.progress=False", "optim.lr=3e-3", "optim.warmup_steps=1",
                             "dpo.beta=0.5", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    summary = dpo.run_dpo(config)
    first = summary["metrics"][0]
    assert math.isclose(first["loss"], math.log(2), rel_tol=1e-5)
    assert abs(first["reward_margin"]) < 1e-5  # rewards start at 0 (up to float noise between the two jits)
    evals = summary["eval"][-1]
    assert evals["eval_reward_accuracy"] >= 0.75 and evals["eval_reward_margin"] > 0, summary["eval"]
    assert evals["eval_loss"] < math.log(2)
    # the reference stayed frozen: it still equals the starting checkpoint
    _, start = load_hf(policy_dir)
    for a, b in zip(jax.tree.leaves(summary["reference"]), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), b)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # first the step-0 eval (before any update: policy = reference, so the DPO loss is ln 2), then the steps
    assert lines[0]["step"] == 0 and math.isclose(lines[0]["eval_loss"], math.log(2), rel_tol=1e-5)
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= set(lines[1])
    assert (tmp_path / "run" / "checkpoints" / "8" / "params").is_dir()
    # a second run of the same config resumes from the last checkpoint (here: nothing left to do)
    again = dpo.run_dpo(config)
    assert again["start_step"] == 8 and not again["metrics"]
    for a, b in zip(jax.tree.leaves(again["params"]), jax.tree.leaves(summary["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_pairs_name_file_and_line(tmp_path, policy_dir, capsys):
    tok = load_tokenizer(policy_dir)
    encoder = sft.Encoder(tok, 64, "alpaca")
    good = preference_records(2)
    bad = [
        ({"prompt": "Repeat: red", "chosen": "red"}, r"missing field\(s\) \['rejected'\]"),
        ({"prompt": "Repeat: red", "chosen": " ", "rejected": "blue"}, "empty response"),
        ({"prompt": "", "chosen": "red", "rejected": "blue"}, "'prompt' is empty"),
        ({"prompt": " ".join(["red"] * 100), "chosen": "red", "rejected": "blue"}, "prompt has"),
        ({"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}], "rejected": "x"}, "end with an assistant"),
    ]
    for i, (record, message) in enumerate(bad):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good[0], record])
        with pytest.raises(sft.SFTDataError, match=message) as err:
            dpo.load_pairs(str(path), encoder)
        assert f"{path}:2:" in str(err.value)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", good + [r for r, _ in bad])
    pairs, stats = dpo.load_pairs(str(mixed), encoder, skip_bad=True)
    assert len(pairs) == 2 and sum(stats.skipped.values()) == len(bad)

    from solarjax.cli import main

    rc = main(["dpo", "--data", str(tmp_path / "bad1.jsonl"), "--init", str(policy_dir), "--config.train.seq_len=64",
               "--config.mesh.data=8"])
    assert rc == 1 and "bad1.jsonl:2: empty response" in capsys.readouterr().err
    config = _config_with_dpo()
    config.dpo.loss_type = "hinge"
    with pytest.raises(ConfigError, match="loss_type"):
        dpo.run_dpo(config)


def test_moe_policy_adds_its_router_losses():
    """A Mixture-of-Experts policy is tuned with its balance and z losses (weighted as in
    pretraining) on top of the DPO loss, and logs the router figures; a dense one is unchanged."""
    import jax
    import jax.numpy as jnp

    from solarjax import model
    from solarjax.config import ModelConfig

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, arch="mixtral",
                      n_experts=3, experts_per_token=2, router_aux_loss_coef=0.5, router_z_loss_coef=0.25)
    params = model.init_params(jax.random.key(0), cfg)
    tokens = np.random.default_rng(0).integers(0, 32, (4, 8))
    batch = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
             "loss_mask": jnp.ones((4, 8)), "segment_ids": jnp.ones((4, 8), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(8), (4, 8)), "pair": jnp.asarray([1, -1, 2, -2]),
             "ref_logps": jnp.asarray([-30.0, -31.0, -29.0, -30.5])}
    loss_fn = losses.make_dpo_loss_fn(beta=0.1)
    loss, metrics = loss_fn(params, batch, cfg)
    plain, _ = loss_fn(params, batch, cfg.replace(router_aux_loss_coef=0.0, router_z_loss_coef=0.0))
    assert float(loss - plain) == pytest.approx(0.5 * float(metrics["moe_balance_loss"])
                                                + 0.25 * float(metrics["moe_z_loss"]), rel=1e-5)
    assert float(metrics["moe_balance_loss"]) >= 1.0 - 1e-6 and len(metrics["expert_load"]) == 3


def test_chat_pairs_without_a_chat_template_are_refused(tmp_path, policy_dir):
    """template=auto on a tokenizer without a chat template: messages in a pair are one error naming
    file:line and the dpo settings, never skipped as a bad record; text pairs still load (as SFT)."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((policy_dir / "tokenizer.json").read_bytes())
    encoder = sft.make_encoder(_config_with_dpo(), _cfg(policy_dir), load_tokenizer(plain), plain, "dpo")
    assert encoder.template == "alpaca" and encoder.no_chat_template
    path = write_jsonl(tmp_path / "p.jsonl", preference_records(2) + [CHAT_RECORD])
    for skip_bad in (False, True):
        with pytest.raises(sft.SFTDataError, match=r"p\.jsonl:3: a record with messages in \['chosen', 'rejected'\] "
                                                   r"needs a chat template.*dpo\.chat_template=FILE") as err:
            dpo.load_pairs(str(path), encoder, skip_bad=skip_bad)
        assert str(plain) in str(err.value) and "\n" not in str(err.value)
    pairs, _ = dpo.load_pairs(str(write_jsonl(tmp_path / "text.jsonl", preference_records(2))), encoder)
    assert len(pairs) == 2
