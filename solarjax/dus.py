"""Depth up-scaling (DUS): grow a decoder by slicing and concatenating its layer stack.

A *layer plan* is a tuple of half-open source ranges, each with an optional scale, exactly as
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
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from solarjax import safetensors_io as st
from solarjax.config import ModelConfig
from solarjax.hf import (HF_LAYER_RE, CheckpointError, copy_tokenizer_files, header_checker, read_hf_config,
                         tokenizer_side_files)
from solarjax.outputs import atomic_output_dir, check_destination

Params = dict[str, Any]

SCALED_LEAVES = ("wo", "w_down")  # our leaves that a slice scale multiplies
SCALED_HF_NAMES = ("o_proj", "down_proj")  # the same tensors in HF names (mergekit filter strings)
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")  # config.json lists indexed by layer


class PlanError(ValueError):
    """A layer plan that cannot be applied; the message says which part and why."""


class Slice(NamedTuple):
    """Source layers ``[start, end)``; ``scale`` (if set) multiplies their wo and w_down."""

    start: int
    end: int
    scale: float | None = None


Plan = tuple[Slice, ...]


# ----------------------------------------------------------------------------- plans

def make_plan(ranges: Iterable[Sequence[Any]] | str, n_layers: int) -> Plan:
    """Validate ``ranges`` (``(start, end)`` or ``(start, end, scale)`` items, or a spec string)
    against a source with ``n_layers`` layers and return them as a :data:`Plan`."""
    if isinstance(ranges, str):
        return parse_plan_spec(ranges, n_layers)
    if not _is_int(n_layers) or n_layers <= 0:
        raise PlanError(f"the source model must have a positive number of layers, got {n_layers!r}")
    plan = []
    for i, item in enumerate(ranges):
        try:
            piece = Slice(*item)
        except TypeError as err:
            raise PlanError(f"plan slice {i} is {item!r}; expected (start, end) or (start, end, scale)") from err
        start, end, scale = piece
        if not (_is_int(start) and _is_int(end)):
            raise PlanError(f"plan slice {i} {item!r}: start and end must be integers")
        if not 0 <= start < end <= n_layers:
            raise PlanError(
                f"plan slice {i} [{start}, {end}) is out of range: need 0 <= start < end <= {n_layers} "
                f"(the source has {n_layers} layers; ranges are half-open)"
            )
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise PlanError(f"plan slice {i} [{start}, {end}): scale must be a finite number, got {scale!r}")
            scale = float(scale)
        plan.append(Slice(int(start), int(end), scale))
    if not plan:
        raise PlanError("the layer plan is empty: it must keep at least one source range")
    return tuple(plan)


def plan_layers(plan: Plan) -> list[int]:
    """The source layer of every output layer, in order."""
    return [i for s in plan for i in range(s.start, s.end)]


def plan_scales(plan: Plan) -> list[float | None]:
    """The scale (or None) of every output layer, in order."""
    return [s.scale for s in plan for _ in range(s.start, s.end)]


def format_plan(plan: Plan) -> str:
    """The plan as an explicit spec string (``"0:24,8:32"``) that :func:`parse_plan_spec` reads back."""
    return ",".join(f"{s.start}:{s.end}" + ("" if s.scale is None else f"*{s.scale:g}") for s in plan)


def solar(n: int, m: int) -> Plan:
    """SOLAR DUS: layers ``[0, n-m)`` of one copy, then ``[m, n)`` of another (2(n-m) layers).

    ``m = 0`` is plain repetition, the paper's contrasting baseline.
    """
    _check_count("n", n, 1)
    if not _is_int(m) or m < 0:
        raise PlanError(f"solar: m={m!r} must be a non-negative integer (layers dropped at the seam)")
    if m >= n:
        raise PlanError(f"solar: m={m} must be smaller than n={n}, or a copy would keep no layers")
    return make_plan([(0, n - m), (m, n)], n)


def check_deeper(plan: Plan, n_layers: int, spec: str) -> None:
    """Refuse a plan whose model is no deeper than its ``n_layers``-layer source: depth up-scaling
    that shrinks is almost always a wrong ``m`` (SOLAR keeps ``2(n - m)`` layers, so it deepens only
    while ``m < n/2``: ``solar:m=16`` on 30 layers writes 28). Callers skip this on request
    (``upscale --allow-shallower``, ``init.allow_shallower``) for a deliberate prune."""
    n_out = len(plan_layers(plan))
    if n_out > n_layers:
        return
    hint = ""
    if spec.replace(" ", "").lower().startswith("solar:"):
        hint = f"; SOLAR's m must be below n/2 to deepen (m <= {(n_layers - 1) // 2} for {n_layers} layers, paper: 8)"
    raise PlanError(f"plan {spec!r} makes {n_out} layers from {n_layers}: no deeper than the source{hint}. To write "
                    "it anyway: --allow-shallower (upscale) or --config.init.allow_shallower=true (training verbs)")


def seam(n: int, first_end: int, second_start: int) -> Plan:
    """Two copies cut anywhere: ``[0, first_end)`` then ``[second_start, n)`` (seam ablations)."""
    return make_plan([(0, first_end), (second_start, n)], n)


def repeat(n: int, k: int) -> Plan:
    """The whole stack ``k`` times (G_stack-style growth); ``repeat(n, 2) == solar(n, 0)``."""
    _check_count("repeat: k", k, 1)
    return make_plan([(0, n)] * k, n)


def middle(n: int, start: int, end: int) -> Plan:
    """Duplicate the block ``[start, end)`` in place (Yi-9B style): ``[0, end)`` then ``[start, n)``."""
    if not (_is_int(start) and _is_int(end)) or not 0 <= start < end <= n:
        raise PlanError(f"middle: need 0 <= start < end <= n={n} for the duplicated block, got [{start}, {end})")
    return make_plan([(0, end), (start, n)], n)


def interleave(n: int, start: int = 0, end: int | None = None, k: int = 2) -> Plan:
    """Repeat every layer of ``[start, end)`` ``k`` times in place (layer-wise duplication)."""
    end = n if end is None else end
    _check_count("interleave: k", k, 1)
    if not (_is_int(start) and _is_int(end)) or not 0 <= start < end <= n:
        raise PlanError(f"interleave: need 0 <= start < end <= n={n}, got [{start}, {end})")
    ranges = [(0, start)] if start else []
    ranges += [(i, i + 1) for i in range(start, end) for _ in range(k)]
    ranges += [(end, n)] if end < n else []
    return make_plan(ranges, n)


def llama_pro(n: int, n_new: int) -> Plan:
    """LLaMA Pro block expansion: after every ``n / n_new`` layers insert a copy of the preceding
    layer with zero output projections (scale 0), so the grown model computes the same function."""
    _check_count("llama_pro: n_new", n_new, 1)
    if n_new > n or n % n_new:
        raise PlanError(
            f"llama_pro: n_new={n_new} must divide n={n} (one identity block after every n/n_new layers)"
        )
    group = n // n_new
    ranges: list[tuple] = []
    for g in range(n_new):
        ranges += [(g * group, (g + 1) * group), ((g + 1) * group - 1, (g + 1) * group, 0.0)]
    return make_plan(ranges, n)


OPERATORS = {
    "solar": (solar, {"m": "m"}),
    "seam": (seam, {"first_end": "first_end", "second_start": "second_start"}),
    "repeat": (repeat, {"k": "k"}),
    "middle": (middle, {"start": "start", "end": "end"}),
    "interleave": (interleave, {"start": "start", "end": "end", "k": "k"}),
    "llama_pro": (llama_pro, {"new": "n_new"}),
}


def parse_plan_spec(spec: str, n_layers: int) -> Plan:
    """Parse a plan string for a source with ``n_layers`` layers.

    Forms (the trainer's ``init.upscale`` and ``solarjax upscale --plan`` take the same strings):

    - ``"solar:m=8"``: SOLAR DUS (``m=0`` repeats the stack twice);
    - ``"seam:first_end=24,second_start=8"``: any two cut points;
    - ``"repeat:k=2"``, ``"middle:start=8,end=24"``, ``"interleave:start=8,end=16,k=2"``;
    - ``"llama_pro:new=8"`` (or ``llama-pro``): LLaMA Pro identity blocks;
    - ``"0:24,8:32"``: explicit half-open ranges; ``"0:8,7:8*0"`` gives a range a scale.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PlanError(f"empty layer plan spec {spec!r}; e.g. 'solar:m=8' or '0:24,8:32'")
    text = spec.strip().replace(" ", "")
    head, _, rest = text.partition(":")
    if head and head[0].isdigit():
        return make_plan([_parse_range(part, spec) for part in text.split(",")], n_layers)
    name = head.replace("-", "_").lower()
    if name not in OPERATORS:
        raise PlanError(
            f"unknown plan method {head!r} in {spec!r}; known: {sorted(OPERATORS)} or ranges like '0:24,8:32'"
        )
    fn, keys = OPERATORS[name]
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in keys:
            raise PlanError(f"{spec!r}: bad argument {item!r}; {name} takes {', '.join(k + '=INT' for k in keys)}")
        try:
            kwargs[keys[key]] = int(value)
        except ValueError as err:
            raise PlanError(f"{spec!r}: {key}={value!r} is not an integer") from err
    try:
        return fn(n_layers, **kwargs)
    except TypeError as err:
        raise PlanError(f"{spec!r}: {name} needs {', '.join(k + '=INT' for k in keys)} ({err})") from err


def _parse_range(part: str, spec: str) -> tuple:
    match = re.fullmatch(r"(-?\d+):(-?\d+)(?:\*([^,]+))?", part)
    if not match:
        raise PlanError(f"{spec!r}: cannot read range {part!r}; write START:END or START:END*SCALE")
    start, end, scale = match.groups()
    try:
        return (int(start), int(end)) if scale is None else (int(start), int(end), float(scale))
    except ValueError as err:
        raise PlanError(f"{spec!r}: scale {scale!r} of range {part!r} is not a number") from err


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise PlanError(f"{name}={value!r} must be an integer >= {minimum}")


# ----------------------------------------------------------------------------- in memory

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
    return {**params, "layers": layers}, grown_config(cfg, plan)


def grown_config(cfg: ModelConfig, plan: Plan) -> ModelConfig:
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
    return {**params, "layers": grow(layers)}, grown_config(cfg, plan)


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
