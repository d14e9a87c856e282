"""Depth up-scaling (DUS) applied: grow a decoder by slicing and concatenating its layer stack.

A *layer plan* (:mod:`solarjax.growth.plans`) is a tuple of half-open source ranges, each with an optional scale, exactly as
mergekit's passthrough merge reads ``layer_range`` lists: SOLAR 10.7B is ``[(0, 24), (8, 32)]``
applied to Mistral 7B. Every depth-growth operator researchers compare (SOLAR, seam ablations,
plain repetition / G_stack, middle duplication, LLaMA Pro) is a plan, so one function applies
them all, in memory (:func:`upscale_params`, jit-able on sharded arrays) and on disk
(:func:`upscale_hf`, streamed byte ranges so a checkpoint larger than RAM can grow).

A slice's ``scale`` multiplies its attention output projection and MLP down projection only
(``wo``/``w_down``, HF ``o_proj``/``down_proj``): these are the two matrices that write into the
residual stream, so scale 0 turns a block into the identity (LLaMA Pro) and other values damp a
duplicated block. mergekit's passthrough ``scale`` multiplies whichever tensors its filter
selects; the equivalent recipe filters ``o_proj`` and ``down_proj``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from solarjax import safetensors_io as st
from solarjax.config import ModelConfig
from solarjax.growth.plans import Plan, PlanError, make_plan, plan_layers, plan_scales
from solarjax.hf import (HF_LAYER_RE, CheckpointError, copy_tokenizer_files, header_checker, read_hf_config,
                         tokenizer_side_files)
from solarjax.outputs import atomic_output_dir, check_destination

Params = dict[str, Any]

SCALED_LEAVES = ("wo", "w_down")  # our leaves that a slice scale multiplies
SCALED_HF_NAMES = ("o_proj", "down_proj")  # the same tensors in HF names (mergekit filter strings)
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")  # config.json lists indexed by layer


def apply_plan(params: Params, cfg: ModelConfig, plan: Plan | Iterable | str) -> tuple[Params, ModelConfig]:
    """Slice and concatenate axis 0 of every leaf under ``params["layers"]``; traceable.

    Only static slices and one concatenation per leaf, so under ``jax.jit`` sharded inputs stay
    on their devices. Embeddings, final norm and head are passed through untouched; dtypes kept.
    """
    import jax
    import jax.numpy as jnp

    plan = make_plan(plan, cfg.n_layers)

    def grow(name: str, leaf):
        pieces = []
        for s in plan:
            piece = jax.lax.slice_in_dim(leaf, s.start, s.end, axis=0)
            if s.scale is not None and s.scale != 1.0 and name in SCALED_LEAVES:
                piece = (jnp.zeros_like(piece) if s.scale == 0.0
                         else (piece.astype(jnp.float32) * s.scale).astype(leaf.dtype))
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)

    layers = {name: grow(name, leaf) for name, leaf in params["layers"].items()}
    return {**params, "layers": layers}, plan_config(cfg, plan)


def plan_config(cfg: ModelConfig, plan: Plan) -> ModelConfig:
    """``cfg`` of the grown model: the layer count, and the per-layer attributes (``layer_types``:
    sliding or full, hence each layer's window and RoPE base) re-indexed by the same plan as the
    stacked weights, so every copied layer keeps its type."""
    src_of = plan_layers(plan)
    layer_types = None if cfg.layer_types is None else tuple(cfg.layer_types[i] for i in src_of)
    return cfg.replace(n_layers=len(src_of), layer_types=layer_types)


def upscale_params(params: Params, cfg: ModelConfig, plan: Plan | Iterable | str) -> tuple[Params, ModelConfig]:
    """Grow ``params`` by ``plan`` (a Plan, a list of ranges, or a spec like ``"solar:m=8"``).

    Runs :func:`apply_plan` under ``jax.jit``; each output leaf keeps its input's
    ``NamedSharding`` (a mesh axis on a dim that no longer divides is dropped), so the result
    is built on the devices that hold the input, with no gather to the host.
    """
    import jax

    plan = make_plan(plan, cfg.n_layers)
    new_n = len(plan_layers(plan))
    layers = params["layers"]
    out_shardings = {k: _grown_sharding(v, new_n) for k, v in layers.items()}
    grow = jax.jit(lambda tree: apply_plan({"layers": tree}, cfg, plan)[0]["layers"], out_shardings=out_shardings)
    return {**params, "layers": grow(layers)}, plan_config(cfg, plan)


def _grown_sharding(leaf: Any, new_n: int):
    """The input leaf's NamedSharding for the grown shape, or None (let XLA choose)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    shape = (new_n, *leaf.shape[1:])
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for dim, axes in enumerate(spec):
        names = axes if isinstance(axes, tuple) else (axes,) if axes is not None else ()
        size = math.prod(sharding.mesh.shape[a] for a in names)
        if shape[dim] % size:
            spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


# ----------------------------------------------------------------------------- on disk (HF)
# Every output tensor is known (name, dtype, shape, source bytes) before anything is written, so
# the writer (:mod:`solarjax.safetensors_io`) copies byte ranges straight from the source shards and
# memory stays at one copy buffer; only tensors that are scaled or cast are decoded, one at a time.

def _output_tensors(sources: list[tuple[str, st.StoredTensor]], n_src: int, plan: Plan,
                    dtype: str | None) -> list[st.OutTensor]:
    """Output tensors in write order: globals in source order, the grown layer block where the
    source's first layer tensor was."""
    layers: dict[int, dict[str, st.StoredTensor]] = {}
    order: list[tuple[str, st.StoredTensor] | None] = []
    for name, src in sources:
        match = HF_LAYER_RE.match(name)
        if not match:
            order.append((name, src))
            continue
        index = int(match.group(1))
        if index >= n_src:
            raise CheckpointError(f"tensor {name!r} is beyond num_hidden_layers={n_src} of config.json")
        if not layers:
            order.append(None)  # the grown layer block goes here
        layers.setdefault(index, {})[match.group(2)] = src
    suffixes = layers.get(0, {}).keys()
    for i in range(n_src):
        if i not in layers or layers[i].keys() != suffixes:
            raise CheckpointError(
                f"layer {i} has tensors {sorted(layers.get(i, {}))}, expected the same as layer 0: {sorted(suffixes)}"
            )
        for suffix, src in layers[i].items():  # also for names config.json does not size
            first = layers[0][suffix]
            if (src.shape, src.dtype) != (first.shape, first.dtype):
                raise CheckpointError(f"{src.file}: tensor 'model.layers.{i}.{suffix}' is {src.dtype} {src.shape}, but "
                                      f"layer 0 has {first.dtype} {first.shape}; every layer must match")
    scaled = [s for s in suffixes if any(k in s for k in SCALED_HF_NAMES)]
    if any(s.scale is not None for s in plan) and len(scaled) != len(SCALED_HF_NAMES):
        raise PlanError(f"the plan scales slices, but layers have no single {' / '.join(SCALED_HF_NAMES)} "
                        f"tensors to scale (found {scaled})")
    out_code = None if dtype is None else st.ST_CODES[st.canonical_dtype(dtype)]

    def out(name: str, src: st.StoredTensor, scale: float | None) -> st.OutTensor:
        code = out_code if (out_code and st.is_floating(src.dtype)) else src.dtype
        if scale is None and code == src.dtype:
            return st.OutTensor(name, code, src.shape, source=src)  # bytes as stored
        return st.OutTensor(name, code, src.shape, make=lambda: _scaled(src, scale, code))

    result = []
    for entry in order:
        if entry is not None:
            result.append(out(*entry, None))
            continue
        for new_i, (src_i, scale) in enumerate(zip(plan_layers(plan), plan_scales(plan))):
            for suffix, src in layers[src_i].items():
                use = scale if suffix in scaled and scale != 1.0 else None
                result.append(out(f"model.layers.{new_i}.{suffix}", src, use))
    return result


def _scaled(src: st.StoredTensor, scale: float | None, code: str) -> np.ndarray:
    """One source tensor decoded, multiplied by ``scale`` (in float32) and/or cast to ``code``."""
    out_dtype = st.numpy_dtype(code)
    if scale == 0.0:
        return np.zeros(src.shape, out_dtype)
    array = st.read_stored(src)
    if scale is not None:
        array = array.astype(np.float32) * np.float32(scale)
    return array.astype(out_dtype)


def upscaled_hf_config(hf: dict[str, Any], plan: Plan, dtype: str | None = None) -> dict[str, Any]:
    """``config.json`` of the grown model: everything copied, ``num_hidden_layers`` and the
    per-layer lists (``layer_types``, ...) re-indexed through the plan, dtype updated on a cast."""
    out = dict(hf)
    n_src, src_of = hf["num_hidden_layers"], plan_layers(plan)
    out["num_hidden_layers"] = len(src_of)
    for key in PER_LAYER_CONFIG_KEYS:
        values = hf.get(key)
        if isinstance(values, list):
            if len(values) != n_src:
                raise CheckpointError(f"config.json {key} has {len(values)} entries for {n_src} layers")
            out[key] = [values[i] for i in src_of]
    if dtype is not None:
        present = [k for k in ("dtype", "torch_dtype") if k in out] or ["dtype"]
        for key in present:
            out[key] = dtype
    return out


def upscale_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    plan: Plan | Iterable | str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    chunk_bytes: int = st.COPY_CHUNK,
) -> Path:
    """Grow an HF safetensors checkpoint directory on disk, out of core; returns ``dst``.

    Every output tensor is a byte range of a source shard (copied, so repeated layers are
    independent) or, when scaled or cast, one decoded tensor. ``config.json`` is copied with the
    new layer count; tokenizer files are copied; the directory appears only when complete.
    Every header is checked against ``config.json`` before anything is written; ``dst`` follows
    :mod:`solarjax.outputs`' ownership rule (``overwrite`` replaces only what solarjax wrote).
    """
    src = Path(src)
    dtype = None if dtype is None else st.canonical_dtype(dtype)
    hf = read_hf_config(src)
    if "num_hidden_layers" not in hf:
        raise CheckpointError(f"{src}/config.json has no num_hidden_layers")
    check_destination(dst, overwrite=overwrite, sources=(src,))  # before reading any header
    tokenizer_side_files(src)  # a side file linked outside src is refused before anything is written
    plan = make_plan(plan, hf["num_hidden_layers"])
    tensors = _output_tensors(st.scan(src, header_checker(hf)), hf["num_hidden_layers"], plan, dtype)
    config = upscaled_hf_config(hf, plan, dtype)
    with atomic_output_dir(dst, overwrite=overwrite, sources=(src,), verb="upscale") as tmp:
        st.write_checkpoint(tmp, tensors, max_shard_size, progress=progress, desc="upscale", chunk_bytes=chunk_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(src, tmp)
    return Path(dst)
