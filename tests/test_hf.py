"""HF interop, checked against transformers itself: logits on import, load-back after export."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from solarjax import hf, model
from solarjax.hf import CheckpointError
from solarjax.outputs import OutputError

FIXTURES = ["hf_llama_dir", "hf_llama_tied_sharded_dir", "hf_mistral_dir"]


def hf_logits(path, tokens, attention_mask=None, position_ids=None):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=torch.tensor(attention_mask), position_ids=torch.tensor(position_ids))
    with torch.no_grad():
        return ref(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(0, 256, size=(2, 24))  # longer than the sliding window (8)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_import_matches_transformers_logits(fixture, request, tokens):
    path = request.getfixturevalue(fixture)
    cfg, params = hf.load_hf(path)
    ours = model.forward_jit(params, jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(ours, hf_logits(path, tokens), atol=1e-5)


def test_sharded_tied_checkpoint_is_read_from_its_index(hf_llama_tied_sharded_dir):
    assert (hf_llama_tied_sharded_dir / hf.SAFE_INDEX).is_file()
    cfg, params = hf.load_hf(hf_llama_tied_sharded_dir)
    assert cfg.tie_embeddings and "lm_head" not in params and cfg.n_kv_heads == 1


@pytest.mark.parametrize("fixture", ["hf_llama_dir", "hf_mistral_dir"])
def test_left_padding_matches_transformers_attention_mask(fixture, request, tokens):
    path = request.getfixturevalue(fixture)
    mask = np.ones_like(tokens)
    mask[0, :5] = 0  # row 0 is left-padded
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    cfg, params = hf.load_hf(path)
    ours = np.asarray(model.forward(params, jnp.asarray(tokens), cfg, positions=jnp.asarray(positions),
                                    segment_ids=jnp.asarray(mask)))
    ref = hf_logits(path, tokens, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-5)


def test_packed_segments_equal_separate_transformers_runs(hf_mistral_dir, tokens):
    cfg, params = hf.load_hf(hf_mistral_dir)
    first, second = tokens[0, :14], tokens[1, :10]
    packed = np.concatenate([first, second])[None]
    segments = np.array([[1] * 14 + [2] * 10])
    ours = np.asarray(model.forward(params, jnp.asarray(packed), cfg, segment_ids=jnp.asarray(segments)))[0]
    np.testing.assert_allclose(ours[:14], hf_logits(hf_mistral_dir, first[None])[0], atol=1e-5)
    np.testing.assert_allclose(ours[14:], hf_logits(hf_mistral_dir, second[None])[0], atol=1e-5)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_export_loads_in_transformers_and_reimports_bit_identically(fixture, request, tmp_path, tokens):
    src = request.getfixturevalue(fixture)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    cfg, params = hf.load_hf(src)
    out = hf.save_hf(params, cfg, tmp_path / "export", source_dir=src, max_shard_size="60KB")
    assert (out / hf.SAFE_INDEX).is_file() and (out / "tokenizer_config.json").is_file()
    ours = model.forward_jit(params, jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(hf_logits(out, tokens), ours, atol=1e-5)
    cfg2, params2 = hf.load_hf(out)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_bf16_checkpoints_stay_bf16(hf_llama_dir, tmp_path):
    cfg, params = hf.load_hf(hf_llama_dir, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
    out = hf.save_hf(params, cfg, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, params2 = hf.load_hf(out)
    assert cfg2.param_dtype == "bfloat16"
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


# ----------------------------------------------------------------------------- bad input

def _copy(src, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture_is_named(hf_llama_dir, tmp_path):
    path = _copy(hf_llama_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        hf.load_hf(path)


def test_missing_shard_is_named(hf_llama_tied_sharded_dir, tmp_path):
    path = _copy(hf_llama_tied_sharded_dir, tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        hf.load_hf(path)


def test_truncated_shard_is_reported(hf_llama_dir, tmp_path):
    path = _copy(hf_llama_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hf.load_hf(path)


def test_wrong_shape_names_tensor_and_shapes(hf_llama_dir, tmp_path):
    path = _copy(hf_llama_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight.*has shape \((128, 64|64, 128)\), but the config of .* implies \((96, 64|64, 96)\)"):
        hf.load_hf(path)


def test_pickle_checkpoints_are_refused(tmp_path, hf_llama_dir):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(hf_llama_dir / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        hf.load_hf(path)


def test_failed_export_leaves_no_output_and_never_writes_into_source(hf_llama_dir, tmp_path):
    cfg, params = hf.load_hf(hf_llama_dir)
    broken = dict(params, layers={k: v for k, v in params["layers"].items() if k != "w_down"})
    with pytest.raises(KeyError):
        hf.save_hf(broken, cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="is the source"):
        hf.save_hf(params, cfg, hf_llama_dir, source_dir=hf_llama_dir, overwrite=True)
    with pytest.raises(OutputError, match="already exists"):
        hf.save_hf(params, cfg, hf_llama_dir)
