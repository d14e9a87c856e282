"""decode_layout checked in NumPy: each fused leaf is the column concatenation of the leaves it
replaces, each layer's arrays are slices of the stack, and splitting the fused columns gives the
originals back (float, int8-quantized, and MoE experts left apart). (Generation with the decode
layout against transformers lives in test_generate.py and test_families.py.)"""

import jax
import numpy as np
import pytest

from solarjax import model
from solarjax.config import preset
from solarjax.decode_layout import FUSED, fuse_projections, unstack_layers
from solarjax.quant import Quantized, quantize_params


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _split_columns(fused: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    """The inverse of the fusion, in NumPy: cut the columns, restore each original's output axes."""
    cuts = np.cumsum([int(np.prod(a.shape[1:])) for a in like])[:-1]  # one layer: (d, *out_axes)
    return [part.reshape(a.shape) for part, a in zip(np.split(fused, cuts, axis=-1), like)]


@pytest.mark.parametrize("name, fused", [("tiny", {"wqkv", "w_gate_up"}), ("tiny_moe", {"wqkv"})])
def test_fused_leaves_are_concatenations_of_the_originals(name, fused):
    cfg = preset(name)
    params = model.init_params(jax.random.key(0), cfg)
    host = _host(params)
    out = unstack_layers(params)
    assert isinstance(out["layers"], tuple) and len(out["layers"]) == cfg.n_layers
    replaced = {n for f in fused for n in FUSED[f]}
    assert set(out["layers"][0]) == (set(host["layers"]) - replaced) | fused
    stacked = dict(host["layers"])
    for i, layer in enumerate(out["layers"]):
        for f in fused:
            originals = [stacked[n][i] for n in FUSED[f]]
            np.testing.assert_array_equal(layer[f], np.concatenate([a.reshape(a.shape[0], -1) for a in originals], -1))
            for back, a in zip(_split_columns(np.asarray(layer[f]), originals), originals):  # round trip
                np.testing.assert_array_equal(back, a)
        for n in set(layer) - fused:
            np.testing.assert_array_equal(layer[n], stacked[n][i])
    for n in set(host) - {"layers"}:
        np.testing.assert_array_equal(out[n], host[n])
    assert unstack_layers(out) is out  # already in the decode layout
    assert unstack_layers(params)["layers"][0].keys() == out["layers"][0].keys()  # the caller's params intact


def test_quantized_values_and_scales_fuse_together():
    cfg = preset("tiny")
    q = quantize_params(model.init_params(jax.random.key(1), cfg))
    fused = fuse_projections(q["layers"])
    for f, names in FUSED.items():
        assert isinstance(fused[f], Quantized)
        for part in ("values", "scale"):
            originals = [np.asarray(getattr(q["layers"][n], part)) for n in names]
            want = np.concatenate([a.reshape(*a.shape[:2], -1) for a in originals], axis=-1)
            np.testing.assert_array_equal(np.asarray(getattr(fused[f], part)), want)
    mixed = dict(q["layers"], wk=model.init_params(jax.random.key(1), cfg)["layers"]["wk"])
    with pytest.raises(ValueError, match="quantized and float projections"):
        fuse_projections(mixed)


def test_consume_frees_the_stacked_leaves():
    params = model.init_params(jax.random.key(2), preset("tiny"))
    host = _host(params["layers"])
    out = unstack_layers(params, consume=True)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params["layers"]))
    np.testing.assert_array_equal(out["layers"][1]["wo"], host["wo"][1])
