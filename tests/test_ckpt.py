"""Orbax params checkpoints: bit-identical round trips, sharded restore, clear errors."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from solarjax import ckpt, model
from solarjax.config import preset
from solarjax.hf import CheckpointError
from solarjax.outputs import OutputError


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("tiny", param_dtype="bfloat16")
    return cfg, model.init_params(jax.random.key(0), cfg)


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_is_bit_identical(tiny, tmp_path):
    cfg, params = tiny
    ckpt.save_params(tmp_path / "ck", params, cfg)
    cfg2, params2 = ckpt.load_params(tmp_path / "ck")
    assert cfg2 == cfg
    assert_identical(params, params2)


def test_sharded_params_save_and_restore_onto_a_mesh(tiny, tmp_path):
    cfg, params = tiny
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    spec = lambda x: P(*([None] * (x.ndim - 1) + ["fsdp"]))  # noqa: E731  last dim divides 4 everywhere
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params)
    sharded = jax.device_put(params, shardings)
    ckpt.save_params(tmp_path / "sharded", sharded, cfg)
    _, restored = ckpt.load_params(tmp_path / "sharded", shardings=shardings)
    assert_identical(params, restored)
    assert restored["layers"]["wq"].sharding == shardings["layers"]["wq"]


def test_existing_destination_and_wrong_shapes_raise(tiny, tmp_path):
    cfg, params = tiny
    ckpt.save_params(tmp_path / "ck", params, cfg)
    with pytest.raises(OutputError, match="already exists"):
        ckpt.save_params(tmp_path / "ck", params, cfg)
    with pytest.raises(CheckpointError, match="not a solarjax Orbax checkpoint"):
        ckpt.load_params(tmp_path)
    wrong = cfg.replace(ffn_dim=96)
    (tmp_path / "ck" / ckpt.CONFIG_ITEM / "metadata").write_text(__import__("json").dumps(wrong.to_dict()))
    with pytest.raises(CheckpointError, match=r"w_down.*\(4, 128, 64\).*\(4, 96, 64\)"):
        ckpt.load_params(tmp_path / "ck")


def test_gs_uris_stay_uris_through_one_path_type(tmp_path, monkeypatch):
    """Data sources (files, globs, directories), the tokenizer and the metrics log go through
    ``etils.epath``, so a ``gs://`` URI reaches GCS unmangled. Offline, epath's own test backend
    (``mock_epath``: every scheme on the local disk, ``gs://bucket/x`` at ``./gs:/bucket/x``) runs the
    very calls a pod job makes; Orbax arrays use tensorstore's GCS driver, which needs the network."""
    import json
    import os

    from etils.epath import testing as epath_testing

    from solarjax import data, train

    assert os.fspath(ckpt.as_path("gs://bucket/run") / "checkpoints" / "7") == "gs://bucket/run/checkpoints/7"
    assert os.fspath(ckpt.as_path("run")) == os.path.abspath("run")
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "gs:" / "bucket" / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "a" / "x.jsonl").write_text('{"text": "one"}\n')
    (corpus / "b.jsonl").write_text('{"text": "two"}\n')
    (corpus / "c.txt").write_text("three")
    with epath_testing.mock_epath():
        assert data.read_documents("gs://bucket/corpus/*.jsonl") == ["two"]
        assert data.read_documents("gs://bucket/corpus") == ["one", "two", "three"]
        data.train_tokenizer(["one two three"], 64, "gs://bucket/run/tokenizer.json")
        assert data.load_tokenizer("gs://bucket/run").encode("one two").tokens
        logger = train.MetricsLogger(ckpt.as_path("gs://bucket/run/metrics.jsonl"), None)
        logger.log({"step": 1, "loss": float("nan")}, echo=lambda _: None)
        logger.close()
    assert (tmp_path / "gs:" / "bucket" / "run" / "tokenizer.json").is_file()
    record = json.loads((tmp_path / "gs:" / "bucket" / "run" / "metrics.jsonl").read_text(),
                        parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert record == {"step": 1, "loss": None, "nonfinite": True}
