"""safetensors_io against the ``safetensors`` library and transformers: what we write they read,
what they write we read (header offsets, bf16 bytes, shards + index)."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from solarjax import safetensors_io as st

rng = np.random.default_rng(0)
ARRAYS = {
    "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
    "b.bias": rng.standard_normal((7,)).astype(np.float16),
    "c.bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
    "d.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
}


def _out(arrays):
    return [st.OutTensor(name, st.dtype_code(a.dtype), a.shape, make=lambda a=a: a) for name, a in arrays.items()]


def _assert_same(got: dict, want: dict):
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name].view(np.uint8), array.view(np.uint8), err_msg=name)


def test_single_file_reads_back_with_safetensors(tmp_path):
    files = st.write_checkpoint(tmp_path, _out(ARRAYS))
    assert files == ["model.safetensors"] and not (tmp_path / st.SAFE_INDEX).exists()
    _assert_same(load_file(tmp_path / "model.safetensors"), ARRAYS)


def test_shards_and_index_read_back_with_safetensors(tmp_path):
    files = st.write_checkpoint(tmp_path, _out(ARRAYS), max_shard_size=90)  # bytes: 60, 14, 48, 48
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / st.SAFE_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in ARRAYS.values())
    got = {}
    for file in files:
        shard = load_file(tmp_path / file)
        assert all(index["weight_map"][name] == file for name in shard)
        got.update(shard)
    _assert_same(got, ARRAYS)
    assert set(index["weight_map"]) == set(ARRAYS)


def test_reader_and_byte_copy_of_a_safetensors_file(tmp_path):
    """Read what the library wrote; copy its bytes (``source=``) into a new file it reads back."""
    src = tmp_path / "src"
    src.mkdir()
    save_file(ARRAYS, src / "model.safetensors")
    reader = st.Reader(src)
    _assert_same(dict(reader), ARRAYS)
    assert reader.shapes == {name: a.shape for name, a in ARRAYS.items()}
    stored = dict(st.scan(src))
    _assert_same({name: st.read_stored(s) for name, s in stored.items()}, ARRAYS)
    out = tmp_path / "out"
    out.mkdir()
    copies = [st.OutTensor(name, s.dtype, s.shape, source=s) for name, s in reversed(stored.items())]
    st.write_checkpoint(out, copies, chunk_bytes=16)
    _assert_same(load_file(out / "model.safetensors"), ARRAYS)


def test_transformers_loads_our_shards(tmp_path):
    import torch
    import transformers

    from conftest import make_hf_model

    model = make_hf_model("llama", seed=3, tie_word_embeddings=False)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    st.write_checkpoint(tmp_path, _out(state), max_shard_size="40KB")
    model.config.save_pretrained(tmp_path)
    assert len(json.loads((tmp_path / st.SAFE_INDEX).read_text())["weight_map"]) == len(state)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)


def test_sizes_names_and_refusals(tmp_path):
    assert st.parse_size("5GB") == 5 * 10**9 and st.parse_size("40KiB") == 40_000 and st.parse_size(7) == 7
    assert st.shard_names(1) == ["model.safetensors"]
    plan = st.plan_shards(_out(ARRAYS), 90)
    assert [[t.name for t in shard] for shard in plan] == [["a.weight", "b.bias"], ["c.bf16"], ["d.ids"]]
    with pytest.raises(ValueError, match="cannot parse size"):
        st.parse_size("five")
    with pytest.raises(st.CheckpointError, match="written twice"):
        st.write_checkpoint(tmp_path, _out(ARRAYS) + _out({"a.weight": ARRAYS["a.weight"]}))
    wrong = [st.OutTensor("x", "F32", (2,), make=lambda: np.zeros(3, np.float32))]
    with pytest.raises(st.CheckpointError, match="expected float32"):
        st.write_checkpoint(tmp_path, wrong)
