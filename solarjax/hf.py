"""Hugging Face checkpoints of every family in :mod:`solarjax.families` <-> solarjax params.

Import streams one safetensors tensor at a time into preallocated stacked buffers, so the
checkpoint is never held twice. Export writes shards into a temporary directory next to the
destination and renames it into place only when everything is written (:mod:`solarjax.outputs`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import numpy as np

from solarjax import families
from solarjax import safetensors_io as st
from solarjax.config import ModelConfig
from solarjax.model import Params, param_shapes
from solarjax.safetensors_io import SAFE_INDEX, CheckpointError, safetensors_files  # noqa: F401  (names kept here)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "added_tokens.json",
)


# ----------------------------------------------------------------------------- names and layouts
# Every HF tensor maps to one of our leaves (and a layer index for stacked ones), with the two
# layout conversions the family spec declares (solarjax.families.spec.LAYOUTS). The conversions are
# reshapes and transposes only: RoPE is rotate-half in both.

class TensorSpec(NamedTuple):
    leaf: str
    layer: int | None  # index on the stacked layer axis; None for embed / final_norm / lm_head
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    expert: int | None = None  # index on a Mixture-of-Experts leaf's experts axis (after the layer axis)


def _identity(w: np.ndarray) -> np.ndarray:
    return w


def converters(layout: str, ours: tuple[int, ...]) -> tuple[Callable, Callable]:
    """(to ours, to HF) for one tensor of our (one-layer) shape ``ours`` in ``layout``."""
    if layout == "identity":
        return _identity, _identity
    if layout == "transpose":
        return np.transpose, np.transpose
    if layout == "split_out":  # HF (n*hd, d) <-> ours (d, n, hd)
        return (lambda w: w.T.reshape(ours)), (lambda w: w.reshape(ours[0], -1).T)
    if layout == "split_in":  # HF (d, n*hd) <-> ours (n, hd, d)
        return (lambda w: w.T.reshape(ours)), (lambda w: w.reshape(-1, ours[-1]).T)
    if layout == "flat":  # HF (n*hd,) <-> ours (n, hd)
        return (lambda w: w.reshape(ours)), (lambda w: w.reshape(-1))
    raise ValueError(f"unknown layout {layout!r}")


# The Llama family's tables (merge's default filter names; the other families are in solarjax.families)
LAYER_TENSORS = {p.hf: p.name for p in families.get("llama").layer_params}
GLOBAL_TENSORS = {p.hf: p.name for p in families.get("llama").global_params}


def tensor_index(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """HF tensor name -> where it lives in our params, for every tensor a checkpoint of ``cfg`` has.

    Ordered as transformers writes them (embedding, layers, final norm, head).
    """
    layer, glob = families.get(cfg.arch).params(cfg)
    by_name = {p.name: p for p in glob}
    index = {}

    def add(name: str, p, i: int | None) -> None:
        if not p.per_expert:
            index[name] = TensorSpec(p.name, i, *converters(p.layout, tuple(p.shape(cfg))))
            return
        to_ours, to_hf = converters(p.layout, tuple(p.shape(cfg))[1:])  # one expert's slice
        for e in range(cfg.n_experts):
            index[name.format(e=e)] = TensorSpec(p.name, i, to_ours, to_hf, e)

    add(by_name["embed"].hf, by_name["embed"], None)
    for i in range(cfg.n_layers):
        for p in layer:
            add(f"model.layers.{i}.{p.hf}", p, i)
    for p in glob:
        if p.name != "embed":
            add(p.hf, p, None)
    return index


# ----------------------------------------------------------------------------- fused experts
# transformers 5 holds a Mixture-of-Experts layer's experts fused (``MixtralExperts``,
# ``OlmoeExperts``; transformers/conversion_mapping.py, "mixtral" and "qwen2_moe") and some writers
# save that layout (mergekit, ``model.state_dict()``): per layer ``mlp.experts.gate_up_proj``
# (E, 2f, d), each expert's gate rows then its up rows; ``mlp.experts.down_proj`` (E, d, f); the
# router at ``mlp.gate.weight`` (Mixtral's ``block_sparse_moe.`` becomes ``mlp.``). Readers turn it
# into the per-expert names the Hub and ``save_pretrained`` use, so one name table serves both.

FUSED_EXPERTS = {"mlp.experts.gate_up_proj": ("w_gate", "w_up"), "mlp.experts.down_proj": ("w_down",)}
FUSED_ROUTER = "mlp.gate.weight"


def fused_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], list[tuple[str, tuple]]]]:
    """Fused layer-tensor suffix -> (its shape, [(per-expert suffix, index into the fused tensor)]);
    empty for a dense ``cfg``."""
    if not cfg.n_experts:
        return {}
    family = families.get(cfg.arch)
    e, f, d = cfg.n_experts, cfg.expert_ffn_dim, cfg.d_model
    out = {FUSED_ROUTER: ((e, d), [(family.param("w_router").hf, ())])}
    for fused, leaves in FUSED_EXPERTS.items():
        parts = [(family.param(leaf).hf.format(e=i), (i, slice(k * f, (k + 1) * f)) if len(leaves) > 1 else (i,))
                 for k, leaf in enumerate(leaves) for i in range(e)]
        out[fused] = ((e, len(leaves) * f, d) if len(leaves) > 1 else (e, d, f), parts)
    return out


def unfused(tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig,
            source: str = "", error: type[CheckpointError] = CheckpointError) -> Iterator[tuple[str, np.ndarray]]:
    """``tensors`` with fused expert tensors split into per-expert views under the canonical names
    and the fused router renamed; everything else passes through. A fused tensor whose shape the
    config does not imply raises ``error`` naming it (before any slicing could hide a mismatch)."""
    layout = fused_layout(cfg)
    for name, array in tensors:
        parts = _split(name, tuple(array.shape), layout, source, error)
        if parts is None:
            yield name, array
        else:
            for part, index in parts:
                yield part, array[index]


def unfused_index(shapes: dict[str, tuple[int, ...]], hf: dict[str, Any]) -> dict[str, tuple[str, tuple | None, tuple]]:
    """For readers by name (merge): every per-expert or plain name -> (stored name, index into it or
    None, shape), in stored order, given the stored ``shapes`` of a checkpoint with config ``hf``."""
    try:
        layout = fused_layout(config_from_hf(hf))
    except Exception:  # noqa: BLE001 - a config solarjax does not model has no fused layout it knows
        layout = {}
    out: dict[str, tuple[str, tuple | None, tuple]] = {}
    for name, shape in shapes.items():
        parts = _split(name, tuple(shape), layout, "config.json", CheckpointError)
        if parts is None:
            out[name] = (name, None, tuple(shape))
        for part, index in parts or ():
            out[part] = (name, index, np.broadcast_to(np.int8(0), shape)[index].shape)
    return out


def _split(name: str, shape: tuple, layout: dict, source: str, error: type[CheckpointError]) -> list | None:
    """[(per-expert name, index)] of one fused tensor; None for any other name."""
    match = HF_LAYER_RE.match(name) if layout else None
    fused = layout.get(match.group(2)) if match else None
    if fused is None:
        return None
    if shape != fused[0]:
        raise error(f"tensor {name!r} has shape {shape}, but the config of {source or 'the model'} implies "
                    f"{fused[0]} (transformers' fused experts layout)")
    return [(f"model.layers.{match.group(1)}.{suffix}", index) for suffix, index in fused[1]]


# ----------------------------------------------------------------------------- config.json

def family_of(hf: dict[str, Any]):
    """The family of a ``config.json`` dict; an unknown architecture is one line naming it."""
    family = families.for_hf_config(hf)
    if family is None:
        archs = hf.get("architectures") or hf.get("model_type")
        raise CheckpointError(f"unsupported architecture {archs!r}: solarjax reads {sorted(families.HF_ARCHITECTURES)}")
    return family


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Translate a transformers ``config.json`` dict; unsupported features raise by name."""
    family = family_of(hf)
    try:
        values = {"arch": family.name, **family.from_hf(hf)}
    except KeyError as err:
        raise CheckpointError(f"config.json has no {err.args[0]!r}, which {family.name} models need") from None
    values.update(overrides)
    return ModelConfig(**values)


def config_to_hf(cfg: ModelConfig, base: dict[str, Any] | None = None, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``config.json`` for ``cfg``; fields of ``base`` we do not model are kept."""
    from solarjax.families.common import DROP

    out = dict(base or {})
    for stale in ("rope_scaling", "_name_or_path", "transformers_version"):
        out.pop(stale, None)
    for key, value in families.get(cfg.arch).to_hf(cfg).items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    out.update(torch_dtype=torch_dtype, dtype=torch_dtype)
    return out


# config.json size fields -> the ModelConfig field whose bound (solarjax.config.SIZE_LIMITS) applies
HF_SIZE_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "ffn_dim", "moe_intermediate_size": "ffn_dim", "shared_expert_intermediate_size": "ffn_dim",
    "num_local_experts": "n_experts", "num_experts": "n_experts", "num_experts_per_tok": "n_experts",
    "max_position_embeddings": "max_seq_len",
}

HF_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_hf_sizes(hf: dict[str, Any], origin: str | os.PathLike) -> None:
    """Every size ``config.json`` gives (also in a nested ``text_config``) is a non-negative integer
    within :data:`solarjax.config.SIZE_LIMITS`, so nothing is looped over or allocated from an absurd
    one (``num_hidden_layers: 1e9``); else one line naming the field and ``origin``."""
    from solarjax.config import SIZE_LIMITS

    for where, values in (("", hf), ("text_config.", hf.get("text_config"))):
        if not isinstance(values, dict):
            continue
        for key, field in HF_SIZE_FIELDS.items():
            value = values.get(key)
            if value is None:
                continue
            least = 1 if key in HF_POSITIVE else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise CheckpointError(f"{origin}: {where}{key} must be an integer >= {least}, got {st.short(value)}")
            if value > SIZE_LIMITS[field]:
                raise CheckpointError(f"{origin}: {where}{key}={value} exceeds {SIZE_LIMITS[field]}, far beyond any "
                                      "real model (corrupt config?)")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF directory: a JSON object inside it, its sizes within bounds."""
    cfg_file = st.contained_file(path, "config.json")
    if cfg_file is None:
        raise CheckpointError(f"{path} has no config.json; is it a Hugging Face model directory?")
    hf = st.read_json(cfg_file)
    check_hf_sizes(hf, cfg_file)
    return hf


# ----------------------------------------------------------------------------- headers vs config.json
# For readers that stream tensors without modelling them (upscale, merge): every header is checked
# against the shapes config.json implies before anything is written.

HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def implied_shapes(hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The HF-layout shape ``config.json`` implies for each tensor (layer tensors keyed by suffix,
    e.g. ``mlp.down_proj.weight``): from the family's spec when solarjax models the config, else
    the Llama-family names. Names the config does not size are absent."""
    try:
        cfg = config_from_hf(hf)
    except Exception:  # noqa: BLE001 - a config we do not model: check what the Llama names say
        cfg = None
    if cfg is not None:
        shapes: dict[str, tuple[int, ...]] = {"lm_head.weight": (cfg.vocab_size, cfg.d_model)}
        for name, spec in tensor_index(cfg).items():
            if spec.layer in (None, 0):
                match = HF_LAYER_RE.match(name)
                shapes[match.group(2) if match else name] = hf_shape(spec, cfg)
        shapes.update({suffix: shape for suffix, (shape, _) in fused_layout(cfg).items()})  # the fused layout too
        return shapes
    try:
        d, vocab, ffn, n_heads = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"], hf["num_attention_heads"]
        hd = hf.get("head_dim") or d // n_heads
        q, kv = n_heads * hd, (hf.get("num_key_value_heads") or n_heads) * hd
    except (KeyError, TypeError, ZeroDivisionError):
        return {}
    return {
        "model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "model.norm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q), "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (ffn, d), "mlp.up_proj.weight": (ffn, d), "mlp.down_proj.weight": (d, ffn),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
    }


def header_checker(hf: dict[str, Any], shapes: bool = True) -> st.HeaderCheck:
    """A check of one tensor's safetensors header (shape, dtype code) against ``config.json``:
    a shape the config does not imply (e.g. dims swapped, same byte size), a dtype other than the
    config's, or any non-floating dtype (an ``I32`` tensor in a float model) raises naming the file
    and tensor. Run on every header before anything is allocated or written; ``shapes=False`` leaves
    shapes to :func:`check_stored_shapes` (readers that model the config)."""
    implied = implied_shapes(hf) if shapes else {}
    declared = hf.get("dtype") or hf.get("torch_dtype")
    want = st.ST_CODES.get(str(declared)) if declared else None

    def check(file: Path, name: str, shape: tuple, dtype: str) -> None:
        match = HF_LAYER_RE.match(name)
        expected = implied.get(match.group(2) if match else name)
        if expected is not None and tuple(shape) != expected:
            raise CheckpointError(f"{file}: tensor {st.short(name)} has shape {tuple(shape)} in its header, but "
                                  f"config.json implies {expected} (swapped dimensions or a corrupt header?)")
        if not st.is_floating(dtype) or (want and dtype != want):
            said = f"config.json says dtype {declared}" if want else "model weights are floating point"
            raise CheckpointError(f"{file}: tensor {st.short(name)} is {st.ST_DTYPES[dtype]} in its header, but {said}")

    return check


# ----------------------------------------------------------------------------- reading

def load_hf(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    shardings: Any = None,
    progress: bool = False,
    **config_overrides: Any,
) -> tuple[ModelConfig, Params]:
    """Read an HF Llama/Mistral safetensors checkpoint into ``(cfg, params)``.

    ``dtype`` sets the param dtype (default: the checkpoint's own, float32 if unknown);
    ``shardings`` (a pytree of ``jax.sharding.Sharding`` like the params) places each leaf
    directly where it belongs instead of on the default device.
    """
    hf = read_hf_config(path)
    src_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    cfg = config_from_hf(hf, param_dtype=dtype or src_dtype, **config_overrides)
    reader = st.Reader(path, header_checker(hf, shapes=False))
    check_stored_shapes(reader.shapes, hf, cfg, str(path))  # before a buffer is allocated
    tensors = unfused(reader, cfg, str(path))
    if progress:
        from solarjax.progress import progress_bar

        tensors = progress_bar(tensors, total=len(tensor_index(cfg)), desc="import", unit="tensor")
    return cfg, to_device(assemble_params(tensors, cfg, str(path)), shardings)


def check_stored_shapes(stored: dict[str, tuple[int, ...]], hf: dict[str, Any], cfg: ModelConfig, source: str,
                        error: type[CheckpointError] = CheckpointError) -> None:
    """The tensors a checkpoint's headers hold (``stored``: name -> shape) are the ones ``cfg``
    implies, with the same shapes, so no config size is trusted until the weights agree with it
    (a ``num_hidden_layers`` or ``vocab_size`` the files do not hold is refused before allocating)."""
    present = unfused_index(stored, hf)
    index = tensor_index(cfg)
    for name, (_, _, shape) in present.items():
        spec = index.get(name)
        if spec is None and ((name == "lm_head.weight" and cfg.tie_embeddings) or name.endswith("rotary_emb.inv_freq")):
            continue
        if spec is None:
            raise error(f"unexpected tensor {st.short(name)} {tuple(shape)} in {source} "
                        f"(config: {cfg.n_layers} layers, tie_embeddings={cfg.tie_embeddings})")
        if tuple(shape) != hf_shape(spec, cfg):
            raise error(f"tensor {st.short(name)} has shape {tuple(shape)}, but the config of {source} implies "
                        f"{hf_shape(spec, cfg)}")
    missing = [name for name in index if name not in present]
    if missing:
        layers = sorted({int(m.group(1)) for m in map(HF_LAYER_RE.match, present) if m})
        held = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise error(f"{source} is missing {len(missing)} tensors its config implies, e.g. {missing[:3]} "
                    f"(config: {cfg.n_layers} layers; the checkpoint holds {held})")


def assemble_params(tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig, source: str,
                    error: type[CheckpointError] = CheckpointError) -> Params:
    """Fill preallocated stacked numpy buffers from HF-named tensors, one tensor at a time.

    The one place where names, shapes and completeness are checked, for every reader (safetensors,
    GGUF): an unexpected name, a shape the config does not imply, or a missing tensor raises
    ``error`` naming the tensor, both shapes and ``source``.
    """
    shapes = param_shapes(cfg)
    buffers: dict[str, Any] = {
        "layers": {k: np.empty(s, cfg.weight_dtype) for k, s in shapes["layers"].items()},
        **{k: np.empty(s, cfg.weight_dtype) for k, s in shapes.items() if k != "layers"},
    }
    index = tensor_index(cfg)
    seen: set[str] = set()
    for name, array in tensors:
        if (name == "lm_head.weight" and cfg.tie_embeddings) or name.endswith("rotary_emb.inv_freq"):
            continue  # some writers store the tied head anyway; old ones store RoPE tables
        spec = index.get(name)
        if spec is None:
            raise error(f"unexpected tensor {name!r} {tuple(array.shape)} in {source} "
                        f"(config: {cfg.n_layers} layers, tie_embeddings={cfg.tie_embeddings})")
        target = buffers[spec.leaf] if spec.layer is None else buffers["layers"][spec.leaf]
        expected = hf_shape(spec, cfg)
        if tuple(array.shape) != expected:
            raise error(f"tensor {name!r} has shape {tuple(array.shape)}, but the config of {source} implies {expected}")
        if spec.layer is None:
            target[...] = spec.to_ours(array)
        elif spec.expert is None:
            target[spec.layer] = spec.to_ours(array)
        else:
            target[spec.layer, spec.expert] = spec.to_ours(array)
        seen.add(name)
    missing = [name for name in index if name not in seen]
    if missing:
        raise error(f"{source} is missing {len(missing)} tensors, e.g. {missing[:3]}")
    return buffers


def to_device(buffers: Params, shardings: Any) -> Params:
    """Move numpy buffers to devices leaf by leaf, dropping each host copy as we go."""
    flat, treedef = jax.tree.flatten(buffers)
    placements = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    out = []
    for i, sharding in enumerate(placements):
        out.append(jax.device_put(flat[i], sharding))
        flat[i] = None
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- writing

def hf_tensor(params: Params, spec: TensorSpec, dtype: str | None = None) -> np.ndarray:
    """One HF tensor of ``params`` as a contiguous numpy array (fetched from the device now)."""
    array = params[spec.leaf] if spec.layer is None else params["layers"][spec.leaf][spec.layer]
    if spec.expert is not None:
        array = array[spec.expert]
    array = spec.to_hf(np.asarray(array))
    return np.ascontiguousarray(array.astype(dtype) if dtype else array)


def hf_tensors(params: Params, cfg: ModelConfig, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous numpy array) for every tensor, one at a time, fetched lazily."""
    for name, spec in tensor_index(cfg).items():
        yield name, hf_tensor(params, spec, dtype)


def hf_shape(spec: TensorSpec, cfg: ModelConfig) -> tuple[int, ...]:
    """The HF-layout shape of one tensor of a ``cfg`` checkpoint: its converter applied to a zero-stride
    view, so nothing the size of the tensor is allocated (the config may not be trusted yet)."""
    shapes = param_shapes(cfg)
    ours = shapes[spec.leaf] if spec.layer is None else shapes["layers"][spec.leaf][1:]
    if spec.expert is not None:
        ours = ours[1:]
    return tuple(spec.to_hf(np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), ours, (0,) * len(ours))).shape)


def out_tensors(params: Params, cfg: ModelConfig, dtype: str) -> list[st.OutTensor]:
    """Every tensor of ``params`` as a :class:`~solarjax.safetensors_io.OutTensor`, produced when written."""
    code = st.dtype_code(dtype)
    return [st.OutTensor(name, code, hf_shape(spec, cfg), make=lambda spec=spec: hf_tensor(params, spec, dtype))
            for name, spec in tensor_index(cfg).items()]


def tokenizer_side_files(source_dir: str | os.PathLike) -> dict[str, Path]:
    """The tokenizer side files of ``source_dir`` that exist, by name, each checked to be a regular file
    inside it (:func:`~solarjax.safetensors_io.contained_file`): a link to a file elsewhere is refused
    rather than copied out as a plain file. Writers call it before writing anything."""
    found = {name: st.contained_file(source_dir, name) for name in TOKENIZER_FILES}
    return {name: file for name, file in found.items() if file is not None}


def copy_tokenizer_files(source_dir: str | os.PathLike | None, out_dir: Path) -> list[str]:
    """Copy the tokenizer side files of ``source_dir`` (:func:`tokenizer_side_files`) into ``out_dir``."""
    if source_dir is None:
        return []
    files = tokenizer_side_files(source_dir)  # all checked before the first copy
    for name, src in files.items():
        shutil.copy2(src, out_dir / name)
    return list(files)


def save_hf(
    params: Params,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = False,
    sources: tuple = (),
    extra_files: dict[str, str] | None = None,
    verb: str = "save_hf",
) -> Path:
    """Write ``params`` as a transformers-loadable directory, atomically (:mod:`solarjax.outputs`).

    ``source_dir`` (the checkpoint the params came from) supplies tokenizer files and the
    config fields solarjax does not model; ``dtype`` casts on the way out (default: as stored).
    ``extra_files`` (name -> text: tokenizer files, generation config) are written beside the
    weights. ``path`` must not be, contain or lie inside ``source_dir`` or any of ``sources``,
    and ``overwrite`` replaces only a directory solarjax wrote.
    """
    from solarjax.outputs import atomic_output_dir

    dtype = st.canonical_dtype(dtype) if dtype else str(np.dtype(jax.tree.leaves(params)[0].dtype))
    base = read_hf_config(source_dir) if source_dir is not None and (Path(source_dir) / "config.json").is_file() else None
    with atomic_output_dir(path, overwrite=overwrite, sources=(source_dir, *sources), verb=verb) as tmp:
        st.write_checkpoint(tmp, out_tensors(params, cfg, dtype), max_shard_size, progress=progress, desc="export")
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, base, dtype), indent=2))
        copy_tokenizer_files(source_dir, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(path)
