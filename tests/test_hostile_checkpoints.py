"""Hostile checkpoints (issue 24): every one is refused in one line naming the file, before a byte of
it is used or anything is written, and every file outside the destination is unchanged.

Each class builds its inputs here from the tiny random transformers Llama of ``conftest.py``:
safetensors headers that lie (negative, overlapping or out-of-file offsets, wrong JSON shapes, an
integer tensor in a float model, an absurd header length), files named outside the checkpoint
(index entries climbing out, absolute paths, symlinked shards and tokenizer files), config sizes the
weights do not hold (``num_hidden_layers: 10**9``, ``vocab_size: 10**12``, in config.json and in a
GGUF), and tokenizer / config files that are not JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from solarjax import hf, loading
from solarjax import safetensors_io as st
from solarjax.cli import main

TOKENIZER = json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
                        "decoder": None, "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1},
                                                   "unk_token": "<unk>"}})


@pytest.fixture(scope="module")
def world(hf_llama_dir, tmp_path_factory):
    """src/: the tiny Llama with a tokenizer; secret.txt and other.safetensors: a user's files
    outside it. Each case copies it."""
    root = tmp_path_factory.mktemp("hostile") / "world"
    shutil.copytree(hf_llama_dir, root / "src")
    (root / "src" / "tokenizer.json").write_text(TOKENIZER)
    (root / "secret.txt").write_text('{"api_key": "do not leak"}')
    shutil.copy(root / "src" / "model.safetensors", root / "other.safetensors")
    return root


@pytest.fixture
def case(world, tmp_path):
    return Path(shutil.copytree(world, tmp_path / "world", symlinks=True))


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def refused(argv: list[str], capsys, *expected: str) -> str:
    """Run the CLI; it must fail with one line holding every ``expected`` text."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(e in err[0] for e in expected), err
    return err[0]


def upscale_refused(root: Path, capsys, *expected: str) -> None:
    """``solarjax upscale`` of root/src is one line, writes no output and changes no file."""
    before = hashes(root)
    refused(["upscale", str(root / "src"), str(root / "out"), "--m", "1", "--no-progress"], capsys, *expected)
    assert not (root / "out").exists() and hashes(root) == before


# ----------------------------------------------------------------------------- safetensors headers


def rewrite_header(file: Path, change) -> None:
    """Replace the header of ``file`` by ``change(header)`` (a dict, or any JSON value), data kept."""
    header, start = st.read_header(file)
    data = file.read_bytes()[start:]
    new = change(json.loads(json.dumps(header)))
    blob = json.dumps(new).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _set(name: str, key: str, value):
    def change(h):
        h[name][key] = value(h) if callable(value) else value
        return h
    return change


NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
EMBED = "model.embed_tokens.weight"
HEADERS = {  # the change, what the one line says
    "negative offsets": (_set(NORM0, "data_offsets", [-256, 0]), "not two non-negative integers"),
    "overlapping offsets": (_set(NORM1, "data_offsets", lambda h: h[NORM0]["data_offsets"]), "overlap"),
    "offsets beyond the file": (_set(NORM0, "data_offsets", [1 << 40, (1 << 40) + 256]), "does not match shape"),
    "begin after end": (_set(NORM0, "data_offsets", lambda h: h[NORM0]["data_offsets"][::-1]), "byte range"),
    "wrong byte count": (_set(NORM0, "shape", [65]), "does not match shape"),
    "integer tensor in a float model": (_set(EMBED, "dtype", "I32"), "is int32 in its header, but config.json says "
                                                                     "dtype float32"),
    "unknown dtype": (_set(NORM0, "dtype", "F8_E4M3"), "unsupported dtype 'F8_E4M3'"),
    "shape of strings": (_set(NORM0, "shape", ["64"]), "not a list of non-negative integers"),
    "header is a list": (lambda h: list(h.items()), "header is a JSON list, not an object"),
    "entry without data_offsets": (lambda h: {**h, NORM0: {"dtype": "F32", "shape": [64]}},
                                   "not an object with dtype, shape and data_offsets"),
    "metadata not strings": (lambda h: {**h, "__metadata__": {"format": ["pt"]}}, "__metadata__ is not an object"),
}


@pytest.mark.parametrize("kind", list(HEADERS))
def test_lying_safetensors_headers_are_one_line(kind, case, capsys):
    change, message = HEADERS[kind]
    file = case / "src" / "model.safetensors"
    rewrite_header(file, change)
    upscale_refused(case, capsys, str(file), message)
    refused(["info", str(case / "src")], capsys, str(file), message)
    with pytest.raises(st.CheckpointError, match=None) as err:
        hf.load_hf(case / "src")
    assert str(file) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("kind", ["overlapping offsets", "integer tensor in a float model"])
def test_merge_reads_through_the_same_checks(kind, case, capsys):
    change, message = HEADERS[kind]
    shutil.copytree(case / "src", case / "bad")
    rewrite_header(case / "bad" / "model.safetensors", change)
    recipe = case / "recipe.yml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": "src", "parameters": {"weight": 0.5}}, {"model": "bad", "parameters": {"weight": 0.5}}]}))
    before = hashes(case)
    refused(["merge", str(recipe), str(case / "out")], capsys, str(case / "bad" / "model.safetensors"), message)
    assert not (case / "out").exists() and hashes(case) == before


def test_absurd_header_length_and_truncation_are_one_line(case, capsys):
    file = case / "src" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])  # refused before 1 TB is read
    upscale_refused(case, capsys, str(file), "header length 1099511627776 does not fit")
    file.write_bytes(data[: len(data) - 100])  # the last tensor's bytes cut short
    upscale_refused(case, capsys, str(file), "does not match shape")
    file.write_bytes(data[:8] + b"[" * (len(data) - 8))  # a header nested past any recursion limit
    upscale_refused(case, capsys, str(file), "unreadable safetensors header")


# ----------------------------------------------------------------------------- paths out of the checkpoint


def _index(root: Path, shard: str) -> None:
    header, _ = st.read_header(root / "src" / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
    weight_map[EMBED] = shard
    (root / "src" / st.SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["climbs out", "absolute", "symlinked shard", "index is a list", "no weight_map"])
def test_files_named_outside_the_checkpoint_are_refused(kind, case, capsys):
    src = case / "src"
    if kind == "climbs out":
        _index(case, "../other.safetensors")
        message = "which is not a plain path inside the directory"
    elif kind == "absolute":
        _index(case, str(case / "other.safetensors"))
        message = "which is not a plain path inside the directory"
    elif kind == "symlinked shard":
        (src / "model.safetensors").unlink()
        (src / "model.safetensors").symlink_to(case / "other.safetensors")
        message = "outside"
    elif kind == "index is a list":
        _index(case, "model.safetensors")
        (src / st.SAFE_INDEX).write_text("[]")
        message = "holds a JSON list, not an object"
    else:
        (src / st.SAFE_INDEX).write_text('{"weight_map": ["model.safetensors"]}')
        message = "has no weight_map object"
    upscale_refused(case, capsys, str(src), message)
    refused(["info", str(src)], capsys, message)
    with pytest.raises(st.CheckpointError, match=message):
        loading.load(src)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json", "config.json"])
def test_side_file_linked_outside_is_refused_not_copied(name, case, capsys):
    """A user's secret linked in as a side file never leaves its directory: every verb that copies
    side files (upscale, convert, merge) refuses, naming the link."""
    src = case / "src"
    if (src / name).exists():
        (src / name).unlink()
    (src / name).symlink_to(case / "secret.txt")
    upscale_refused(case, capsys, str(src / name), "outside")
    before = hashes(case)
    if name == "config.json":
        refused(["convert", "hf-to-orbax", str(src), str(case / "orbax")], capsys, str(src / name), "outside")
    else:
        out = case / "copied"
        out.mkdir()
        with pytest.raises(st.CheckpointError, match="outside"):
            hf.copy_tokenizer_files(src, out)
        assert list(out.iterdir()) == []
        out.rmdir()
    assert hashes(case) == before


def test_hub_cache_snapshot_links_still_load(world, tmp_path, capsys):
    """A Hugging Face hub cache (snapshots/<rev>/<file> -> ../../blobs/<hash>) is inside its repository."""
    repo = tmp_path / "models--tiny--llama"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in (world / "src").iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    assert main(["info", str(snapshot)]) == 0
    assert main(["upscale", str(snapshot), str(tmp_path / "out"), "--m", "1", "--no-progress"]) == 0
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())
    capsys.readouterr()


# ----------------------------------------------------------------------------- sizes before allocation


def _config(root: Path, **changes) -> Path:
    file = root / "src" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return file


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000 exceeds 4096"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers must be an integer >= 1, got 1000000000.0"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000 exceeds"),
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"num_hidden_layers": 40}, "(config: 40 layers; the checkpoint holds layers 0..3)"),
    ({"vocab_size": 300_000}, "has shape (256, 64)"),
])
def test_config_sizes_the_weights_do_not_hold_are_refused_before_allocating(changes, message, case, capsys):
    file = _config(case, **changes)
    line = refused(["info", str(case / "src")], capsys, message)
    assert str(case / "src") in line
    tracemalloc.start()
    with pytest.raises(ValueError, match=None) as err:
        hf.load_hf(case / "src")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message in str(err.value) and peak < 50 << 20, (err.value, peak)  # the model itself is 0.3 MB
    if "exceeds" in message or "integer" in message:
        upscale_refused(case, capsys, str(file), message)


def _gguf(path: Path, block_count, tensors_blocks: int = 1, vocab=None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    if vocab is not None:
        writer.add_uint64("llama.vocab_size", vocab)
    writer.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, np.float32))
    for i in range(tensors_blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kwargs, message", [
    ({"block_count": 10**9}, "n_layers=1000000000 exceeds 4096"),
    ({"block_count": 3}, "block_count is 3, but its tensors hold blocks 0..0"),
    ({"block_count": 1, "vocab": 10**12}, "vocab_size=1000000000000 exceeds"),
    ({"block_count": 1, "vocab": 32}, "parameters, but its tensors hold"),
])
def test_gguf_sizes_are_checked_against_its_tensors(kwargs, message, tmp_path, capsys):
    path = _gguf(tmp_path / "m.gguf", **kwargs)
    before = hashes(tmp_path)
    line = refused(["info", str(path)], capsys, message)
    assert str(path) in line and hashes(tmp_path) == before


# ----------------------------------------------------------------------------- side files that are not JSON


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_side_file_that_is_not_json_is_one_line(name, case, capsys):
    from solarjax.generate import tokenizer_config

    src = case / "src"
    (src / name).write_bytes(b"{not json \xff")
    if name == "config.json":
        refused(["info", str(src)], capsys, str(src / name), "is not valid JSON")
        return
    if name == "tokenizer.json":
        refused(["generate", "--model", str(src), "--prompt", "a", "--max-new-tokens", "1"], capsys, str(src / name),
                "is not a valid tokenizer.json")
        with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
            loading.load_tokenizer(src)
        return
    with pytest.raises(ValueError, match=f"{src / name} is not valid JSON"):
        tokenizer_config(src)
