"""Model merging (linear, SLERP, task arithmetic, TIES, DARE) with mergekit's semantics.

SOLAR 10.7B-Instruct is a 0.5/0.5 weighted average of two DPO models, so merging is the last
step of the recipe. The math follows mergekit (so a mergekit YAML recipe gives the same tensors,
which the tests check against mergekit itself), but runs in JAX and works at two levels:

* ``merge_params``: params pytrees in memory. Every per-layer leaf is stacked on axis 0, and
  mergekit's statistics (SLERP norms, TIES top-k) are per HF tensor, i.e. per layer, so the
  kernels are ``vmap``-ed over the layer axis with one parameter value per layer (over layers x
  experts for a Mixture-of-Experts leaf, whose experts are separate HF tensors).
* ``merge_checkpoints``: models on disk (HF safetensors streamed one tensor name at a time, so
  peak memory is one tensor per input model; anything else :mod:`solarjax.loading` reads, i.e.
  Orbax checkpoints, training runs and GGUF files, loaded once), written by
  :func:`solarjax.safetensors_io.write_checkpoint`.

Parameters are resolved per tensor exactly as mergekit does: a scalar; a "gradient" list,
interpolated over the layer index (``t = layer / (n_layers - 1)``, 0 for non-layer tensors);
or a list of ``{filter, value}`` conditions whose filter is a substring of the HF tensor name
(``self_attn``, ``mlp``, ...). Per-model settings fall back to the recipe-wide ``parameters``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solarjax import safetensors_io as st
from solarjax.hf import GLOBAL_TENSORS, LAYER_TENSORS
from solarjax.model import Params

Tensors = Any  # solarjax.loading.HFTensors | ParamsTensors: shapes, dtype(name), get(name), hf_config, path

# ----------------------------------------------------------------------------- errors and specs


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the model, tensor or field."""


REQUIRED = object()  # marks a parameter without a default


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a method needs: base model, input count, parameters and their defaults."""

    name: str
    base: str  # "required" | "none" (linear: the base, if named, is just one more input)
    shared: Mapping[str, Any]  # recipe-wide parameters -> default
    per_model: Mapping[str, Any]  # per non-base-model parameters -> default
    sparsify: str | None = None  # None | "magnitude" | "random"
    consensus: bool = False  # TIES sign election
    n_inputs: int | None = None  # exact number of inputs (base included), when fixed


def _task_arithmetic_spec(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool) -> MethodSpec:
    return MethodSpec(
        name, "required",
        shared={"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False},
        per_model={"weight": REQUIRED, "density": 1.0},
        sparsify=sparsify, consensus=consensus,
    )


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", "none", shared={"normalize": True}, per_model={"weight": REQUIRED}),
    "slerp": MethodSpec("slerp", "required", shared={"t": REQUIRED}, per_model={}, n_inputs=2),
    # defaults as mergekit's registry: TIES normalizes, DARE rescales (L1) instead
    "task_arithmetic": _task_arithmetic_spec("task_arithmetic", None, False, False, False),
    "ties": _task_arithmetic_spec("ties", "magnitude", True, True, False),
    "dare_ties": _task_arithmetic_spec("dare_ties", "random", True, False, True),
    "dare_linear": _task_arithmetic_spec("dare_linear", "random", False, False, True),
}

_BOOL_PARAMS = {"normalize", "rescale", "int8_mask"}


def method_spec(name: Any) -> MethodSpec:
    if not isinstance(name, str) or name not in METHODS:
        raise MergeError(f"unknown merge_method {st.short(name)}; solarjax merges with {sorted(METHODS)}")
    return METHODS[name]


# What each number may be. mergekit checks none of these; outside them a merge is NaN or meaningless:
# a non-finite value makes every tensor it touches NaN/inf, SLERP's t outside [0, 1] extrapolates past
# the two models, a density <= 0 keeps nothing and > 1 is read as 1 (50 meaning 50% would keep all).
# Weights and lambda may be negative (task arithmetic subtracts a task vector with a negative weight).
PARAMETER_RANGES: dict[str, tuple[float, float, bool, str]] = {  # low, high, low included, as stated
    "t": (0.0, 1.0, True, "in [0, 1]"),
    "density": (0.0, 1.0, False, "in (0, 1]"),
}
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


# ----------------------------------------------------------------------------- parameter settings


def _validate(name: str, value: Any) -> Any:
    """One scalar setting of parameter ``name``, checked: booleans are true/false words, numbers are
    finite and inside :data:`PARAMETER_RANGES`."""
    if name in _BOOL_PARAMS:
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if isinstance(value, (bool, int, float)):
            return bool(value)
        raise MergeError(f"parameter {st.short(name)} must be true or false, got {st.short(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeError(f"parameter {st.short(name)} must be a number, got {st.short(value)}") from None
    if not math.isfinite(number):
        raise MergeError(f"parameter {st.short(name)} must be a finite number, got {st.short(value)}")
    low, high, low_included, stated = PARAMETER_RANGES.get(name, (-math.inf, math.inf, True, ""))
    if not (low <= number <= high) or (number == low and not low_included):
        raise MergeError(f"parameter {st.short(name)} must be {stated}, got {st.short(value)}")
    return number


def check_settings(settings: Mapping[str, Any], who: str) -> None:
    """Every value a recipe's ``parameters`` mapping gives (scalars, gradient lists, ``{filter, value}``
    entries), checked before any tensor is read; errors start with ``who`` (the model, or the recipe)."""
    for param, setting in settings.items():
        pending, seen = [setting], 0
        while pending:
            item, seen = pending.pop(), seen + 1
            if seen > MAX_RECIPE_NODES:  # a structure sharing itself many times over, as an alias bomb
                raise MergeError(f"{who}: parameter {st.short(param)} holds over {MAX_RECIPE_NODES} values")
            try:
                if isinstance(item, list):
                    pending.extend(item)
                elif isinstance(item, Mapping):
                    if "value" not in item:
                        raise MergeError(f"parameter {st.short(param)}: a {{filter, value}} entry has no value")
                    pending.append(item["value"])
                else:
                    _validate(str(param), item)
            except MergeError as err:
                raise MergeError(f"{who}: {err}") from None


def evaluate_setting(param: str, setting: Any, tensor_name: str, t: float) -> Any:
    """One parameter's value for one tensor (mergekit's rules); None when no filter matched.

    Numeric gradient lists are interpolated at ``t``; boolean ones pick the nearest-below entry.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(param, setting)
    if not isinstance(setting, list):
        raise MergeError(f"parameter {st.short(param)}: cannot read setting {st.short(setting)}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_validate(param, e) for e in setting]
        if param in _BOOL_PARAMS:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for cond in setting:
        if not isinstance(cond, Mapping) or "value" not in cond:
            raise MergeError(f"parameter {st.short(param)}: list entries must be numbers or {{filter, value}} maps, "
                             f"got {st.short(cond)}")
        filt = cond.get("filter")
        if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
            return evaluate_setting(param, cond["value"], tensor_name, t)
    return None


def resolve(param: str, default: Any, sources: Sequence[Mapping[str, Any] | None], tensor_name: str, t: float,
            who: str = "") -> Any:
    """First source (highest precedence first) that sets ``param`` for this tensor wins."""
    for source in sources:
        if source and param in source:
            try:
                value = evaluate_setting(param, source[param], tensor_name, t)
            except MergeError as err:  # name the model (merge_params has no recipe that was checked first)
                raise MergeError(f"{who + ': ' if who else ''}{err}") from None
            if value is not None:
                return value
    if default is REQUIRED:
        raise MergeError(f"missing parameter {param!r} for {who + ' ' if who else ''}tensor {tensor_name!r}")
    return default


def layer_fraction(tensor_name: str, n_layers: int) -> float:
    """mergekit's ``t``: position of the tensor's layer in [0, 1]; 0 for embeddings/norm/head."""
    parts = tensor_name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2]) / (n_layers - 1) if n_layers > 1 else 1.0
    return 0.0


# ----------------------------------------------------------------------------- kernels (one tensor)
# All kernels compute in float32 and return float32; callers cast to the output dtype.


def linear_kernel(stack: jax.Array, weights: jax.Array, *, normalize: bool) -> jax.Array:
    """sum_i w_i x_i, divided by sum_i w_i when ``normalize`` (mergekit's default)."""
    w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (stack.ndim - 1))
    out = jnp.sum(stack.astype(jnp.float32) * w, axis=0)
    return out / jnp.sum(weights.astype(jnp.float32)) if normalize else out


def slerp_kernel(t: jax.Array, a: jax.Array, b: jax.Array, dot_threshold: float = 0.9995, eps: float = 1e-8) -> jax.Array:
    """Spherical interpolation from ``a`` (t=0, the base) to ``b`` (t=1) over the whole tensor.

    The angle comes from the normalised tensors; the coefficients apply to the raw ones (so
    norms interpolate too). Near-parallel or antipodal pairs fall back to plain lerp, and
    tensors with norm <= eps are treated as unit norm, as in mergekit.
    """
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    norm_a, norm_b = jnp.linalg.norm(a32.ravel()), jnp.linalg.norm(b32.ravel())
    norm_a = jnp.where(norm_a > eps, norm_a, 1.0)
    norm_b = jnp.where(norm_b > eps, norm_b, 1.0)
    dot = jnp.clip(jnp.sum((a32 / norm_a) * (b32 / norm_b)), -1.0, 1.0)
    linear = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(linear, 0.0, dot))
    sin_theta = jnp.where(linear, 1.0, jnp.sin(theta))
    coef_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    return coef_a * a32 + coef_b * b32


def _rescale_l1(x: jax.Array, masked: jax.Array, eps: float = 1e-7) -> jax.Array:
    before, after = jnp.sum(jnp.abs(x)), jnp.sum(jnp.abs(masked))
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def magnitude_prune(delta: jax.Array, k: jax.Array, rescale: bool) -> jax.Array:
    """Keep exactly the ``k`` largest-magnitude entries (mergekit: k = max(1, int(density * size))).

    Exactly k even when magnitudes tie (common in bf16); ties go to the lower index.
    """
    mag = jnp.abs(delta).ravel()
    order = jnp.argsort(mag, descending=True, stable=True)
    keep = jnp.zeros(mag.shape, bool).at[order].set(jnp.arange(mag.size) < k).reshape(delta.shape)
    masked = jnp.where(keep, delta, 0.0)
    return _rescale_l1(delta, masked) if rescale else masked


def random_prune(delta: jax.Array, density: jax.Array, key: jax.Array, rescale: bool) -> jax.Array:
    """DARE: keep each entry with probability ``density``; L1-rescale as mergekit does."""
    keep = jax.random.bernoulli(key, jnp.clip(density, 0.0, 1.0), delta.shape)
    masked = jnp.where(keep, delta, 0.0)
    masked = _rescale_l1(delta, masked) if rescale else masked
    return jnp.where(density >= 1, delta, masked)


def task_arithmetic_kernel(
    base: jax.Array, stack: jax.Array, weights: jax.Array, k: jax.Array, density: jax.Array,
    lam: jax.Array, key: jax.Array, *, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
) -> jax.Array:
    """base + lambda * combine_i(w_i * sparsify(x_i - base)), the generalized task-arithmetic family.

    With ``consensus`` (TIES), each entry keeps only the deltas whose sign matches the sign of
    their weighted sum (ties at 0 elect +), and ``normalize`` divides by the weights that survived.
    """
    base32 = base.astype(jnp.float32)
    deltas = stack.astype(jnp.float32) - base32
    if sparsify == "magnitude":
        deltas = jax.vmap(lambda d, kk: magnitude_prune(d, kk, rescale))(deltas, k)
    elif sparsify == "random":
        keys = jax.random.split(key, deltas.shape[0])
        deltas = jax.vmap(lambda d, p, kk: random_prune(d, p, kk, rescale))(deltas, density, keys)
    w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (deltas.ndim - 1))
    deltas = deltas * w
    if consensus:
        majority = jnp.where(jnp.sum(deltas, axis=0) >= 0, 1.0, -1.0)
        mask = (jnp.sign(deltas) == majority).astype(jnp.float32)
        mixed = jnp.sum(deltas * mask, axis=0)
        divisor = jnp.sum(w * mask, axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = jnp.sum(deltas, axis=0)
        divisor = jnp.sum(w, axis=0)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return base32 + mixed * lam


@functools.lru_cache(maxsize=None)
def _compiled(method: str, layered: bool, **static: Any) -> Callable:
    """The jitted kernel for a method; ``layered`` vmaps it over a leading layer axis."""
    spec = METHODS[method]
    if method == "linear":
        fn, axes = functools.partial(linear_kernel, **static), (1, 0)  # (stack, weights)
    elif method == "slerp":
        fn, axes = slerp_kernel, (0, 0, 0)  # (t, a, b)
    else:
        fn = functools.partial(task_arithmetic_kernel, sparsify=spec.sparsify, consensus=spec.consensus, **static)
        axes = (0, 1, 0, 0, 0, 0, 0)  # (base, stack, weights, k, density, lambda, key)
    return jax.jit(jax.vmap(fn, in_axes=axes) if layered else fn)


# ----------------------------------------------------------------------------- one tensor group


@dataclasses.dataclass
class TensorPlan:
    """Everything resolved for one HF tensor name (or one layer of a stacked leaf)."""

    shared: dict[str, Any]
    per_model: list[dict[str, Any]]  # for each non-base input


def plan_tensor(
    spec: MethodSpec, tensor_name: str, t: float, shared_sources: Sequence[Mapping | None],
    model_sources: Sequence[Sequence[Mapping | None]], model_names: Sequence[str],
) -> TensorPlan:
    shared = {p: resolve(p, d, shared_sources, tensor_name, t) for p, d in spec.shared.items()}
    per_model = [
        {p: resolve(p, d, srcs, tensor_name, t, who=name) for p, d in spec.per_model.items()}
        for srcs, name in zip(model_sources, model_names)
    ]
    return TensorPlan(shared, per_model)


def _magnitude_k(density: float, size: int) -> int:
    if density >= 1:
        return size
    if density <= 0 or size == 0:
        return 0
    return max(1, int(density * size))


def _kernel_args(spec: MethodSpec, plans: Sequence[TensorPlan], size: int, keys: Sequence[jax.Array]) -> tuple:
    """Stack the per-tensor values of ``plans`` (one plan per layer) into kernel arrays."""
    if spec.name == "linear":
        weights = np.array([[m["weight"] for m in p.per_model] for p in plans], np.float32)
        if plans[0].shared["normalize"] and np.any(weights.sum(axis=1) == 0):
            raise MergeError("linear weights sum to 0, so normalize would divide by zero; set normalize: false")
        return (weights,)
    if spec.name == "slerp":
        return (np.array([p.shared["t"] for p in plans], np.float32),)
    weights = np.array([[m["weight"] for m in p.per_model] for p in plans], np.float32)
    k = np.array([[_magnitude_k(m["density"], size) for m in p.per_model] for p in plans], np.int32)
    density = np.array([[m["density"] for m in p.per_model] for p in plans], np.float32)
    lam = np.array([p.shared["lambda"] for p in plans], np.float32)
    return weights, k, density, lam, jnp.stack(list(keys))


def _static(spec: MethodSpec, plans: Sequence[TensorPlan], tensor_name: str) -> dict[str, Any]:
    """Boolean switches must be the same for all layers of a stacked leaf (they change the program)."""
    names = [n for n in ("normalize", "rescale") if n in spec.shared]
    out = {}
    for n in names:
        values = {p.shared[n] for p in plans}
        if len(values) > 1:
            raise MergeError(f"parameter {n!r} varies across the layers of {tensor_name}; use the on-disk merge")
        out[n] = values.pop()
    return out


def merge_group(
    spec: MethodSpec, base: jax.Array | None, inputs: Sequence[jax.Array], plans: Sequence[TensorPlan],
    keys: Sequence[jax.Array], tensor_name: str, layered: bool,
) -> jax.Array:
    """Merge one tensor (``layered=False``, one plan) or a stack of layers (one plan per layer)."""
    size = int(np.prod(inputs[0].shape[1:] if layered else inputs[0].shape))
    args = _kernel_args(spec, plans, size, keys)
    if not layered:
        args = tuple(a[0] for a in args)
    fn = _compiled(spec.name, layered, **_static(spec, plans, tensor_name))
    # Kernels only do elementwise math and whole-tensor reductions, so they run on flat vectors:
    # one compiled program per tensor size instead of per shape.
    shape = inputs[0].shape
    flat = (lambda x: x.reshape(shape[0], -1)) if layered else (lambda x: x.reshape(-1))
    if spec.name == "linear":
        out = fn(jnp.stack([flat(x) for x in inputs]), *args)
    elif spec.name == "slerp":
        out = fn(args[0], flat(base), flat(inputs[0]))
    else:
        out = fn(flat(base), jnp.stack([flat(x) for x in inputs]), *args)
    return out.reshape(shape)


def tensor_key(seed: int, tensor_name: str) -> jax.Array:
    """A per-tensor PRNG key for DARE, so a merge is reproducible whatever the tensor order."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(tensor_name.encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- params pytrees

HF_LAYER_NAMES = {leaf: suffix for suffix, leaf in LAYER_TENSORS.items()}  # leaf -> HF name, for filters
HF_GLOBAL_NAMES = {leaf: name for name, leaf in GLOBAL_TENSORS.items()}


def hf_names(arch: str) -> tuple[dict[str, str], dict[str, str]]:
    """(layer leaf -> HF suffix, global leaf -> HF name) of a family, from its spec."""
    from solarjax import families

    family = families.get(arch)
    return ({p.name: p.hf for p in family.layer_params}, {p.name: p.hf for p in family.global_params})


def _fold_experts(leaf: jax.Array) -> jax.Array:
    """(layers, experts, ...) -> (layers * experts, ...), layer-major like the HF tensor names."""
    return jnp.reshape(leaf, (leaf.shape[0] * leaf.shape[1], *leaf.shape[2:]))


def _check_inputs(spec: MethodSpec, n_models: int, has_base: bool) -> None:
    if spec.base == "required" and not has_base:
        raise MergeError(f"merge_method {spec.name!r} needs a base model (base_model)")
    if spec.name == "linear" and has_base:
        raise MergeError("linear merging takes no separate base; list every model to average in models")
    total = n_models + (1 if spec.base == "required" else 0)
    if spec.n_inputs is not None and total != spec.n_inputs:
        raise MergeError(f"{spec.name} merges exactly {spec.n_inputs} models including the base; got {total}")
    if n_models == 0:
        raise MergeError(f"{spec.name} needs at least one model besides the base")


def merge_params(
    method: str,
    models: Sequence[Params],
    weights: Sequence[Any] | None = None,
    base: Params | None = None,
    *,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    arch: str = "llama",
    **parameters: Any,
) -> Params:
    """Merge solarjax params pytrees of identical structure; returns a pytree like ``models[0]``.

    ``models`` are the inputs other than ``base``; for ``slerp`` that is the single model that
    ``t`` moves towards from ``base``. ``weights`` (default 1.0 each) and ``model_parameters``
    (e.g. ``density``) are per model; ``parameters`` are recipe-wide (``t``, ``normalize``,
    ``lambda``, ...) and also the fallback for per-model ones. Any value may be a mergekit
    setting: scalar, per-layer gradient list, or ``[{filter, value}]`` with filters matched
    against the HF tensor names (those of family ``arch``). Results equal ``merge_checkpoints`` on
    the HF export.
    """
    layer_names, global_names = hf_names(arch)
    spec = method_spec(method)
    _check_inputs(spec, len(models), base is not None)
    per_model = [dict(m) for m in (model_parameters or [{} for _ in models])]
    if len(per_model) != len(models):
        raise MergeError(f"model_parameters has {len(per_model)} entries for {len(models)} models")
    if weights is not None:
        if len(weights) != len(models):
            raise MergeError(f"weights has {len(weights)} entries for {len(models)} models")
        for m, w in zip(per_model, weights):
            m["weight"] = w
    elif "weight" not in parameters:
        for m in per_model:
            m.setdefault("weight", 1.0)
    model_sources = [[m, parameters] for m in per_model]
    names = [f"models[{i}]" for i in range(len(models))]
    reference = base if base is not None else models[0]
    structure = jax.tree.structure(reference)
    for i, m in enumerate(models):
        if jax.tree.structure(m) != structure:
            raise MergeError(f"models[{i}] has a different params structure from the {'base' if base is not None else 'models[0]'}")

    def merge_leaf(path: tuple, ref: jax.Array, *leaves: jax.Array) -> jax.Array:
        keys = [getattr(p, "key", str(p)) for p in path]
        name = "/".join(map(str, keys))
        for i, leaf in enumerate(leaves):
            if leaf.shape != ref.shape:
                raise MergeError(f"param {name}: models[{i}] has shape {tuple(leaf.shape)}, expected {tuple(ref.shape)}")
        inputs = leaves[1:] if base is not None else leaves
        base_leaf = leaves[0] if base is not None else None
        suffix = layer_names.get(keys[-1], keys[-1])
        if keys[0] == "layers" and "{e}" in suffix:
            # Mixture-of-Experts leaf (L, E, ...): one HF tensor per layer and expert, and mergekit's
            # statistics (SLERP norms, TIES top-k) are per tensor, so layers x experts is the stacked axis
            n_layers, n_experts = ref.shape[:2]
            hf_names = [f"model.layers.{i}.{suffix.format(e=e)}" for i in range(n_layers) for e in range(n_experts)]
            base_leaf, inputs = (None if base_leaf is None else _fold_experts(base_leaf),
                                 [_fold_experts(x) for x in inputs])
            layered = True
        elif keys[0] == "layers":
            n_layers = ref.shape[0]
            hf_names = [f"model.layers.{i}.{suffix}" for i in range(n_layers)]
            layered = True
        else:
            hf_names = [global_names.get(keys[-1], keys[-1])]
            n_layers, layered = 1, False
        plans = [plan_tensor(spec, n, layer_fraction(n, n_layers), [parameters], model_sources, names) for n in hf_names]
        tkeys = [tensor_key(seed, n) for n in hf_names]
        out = merge_group(spec, base_leaf, inputs, plans, tkeys, name, layered)
        return out.reshape(ref.shape).astype(ref.dtype)

    trees = ([base] if base is not None else []) + list(models)
    return jax.tree_util.tree_map_with_path(merge_leaf, reference, *trees)


# ----------------------------------------------------------------------------- recipes

RECIPE_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}


@dataclasses.dataclass
class ModelEntry:
    path: Path
    parameters: dict[str, Any]


@dataclasses.dataclass
class Recipe:
    """A mergekit-style recipe restricted to whole-model merges (no ``slices``/``modules``)."""

    method: str
    models: list[ModelEntry]
    base_model: Path | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: Path | None = None


def _model_path(value: Any, where: str, root: Path | None) -> Path:
    if isinstance(value, Mapping) and "path" in value:  # mergekit's long form {model: {path: ...}}
        value = value["path"]
    if not isinstance(value, (str, os.PathLike)):
        raise MergeError(f"{where}: expected a model directory path, got {st.short(value)}")
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
        path = root / path  # relative to the recipe file when not relative to the working directory
    if not path.exists():
        raise MergeError(f"{where}: model path {st.short(str(value), 200)} does not exist "
                         "(solarjax merges local checkpoints only)")
    return path


def parse_recipe(data: Any, root: Path | None = None, where: str = "recipe") -> Recipe:
    """Validate a recipe dict (as loaded from YAML); ``root`` resolves relative model paths."""
    if not isinstance(data, Mapping):
        raise MergeError(f"{where}: expected a mapping with models and merge_method")
    for key in ("slices", "modules"):
        if key in data:
            raise MergeError(f"{where}: '{key}' recipes are not supported; use 'models' (layer slicing is `solarjax upscale`)")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise MergeError(f"{where}: unknown field(s) {st.short(unknown)}; known: {sorted(RECIPE_KEYS)}")
    if "merge_method" not in data:
        raise MergeError(f"{where}: missing merge_method (one of {sorted(METHODS)})")
    spec = method_spec(data["merge_method"])
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{where}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
    models = []
    for i, entry in enumerate(entries):
        if isinstance(entry, (str, os.PathLike)):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise MergeError(f"{where}: models[{i}] needs a 'model' path")
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise MergeError(f"{where}: models[{i}].parameters must be a mapping")
        path = _model_path(entry["model"], f"{where}: models[{i}].model", root)
        check_settings(params, f"{where}: models[{i}] ({path})")
        models.append(ModelEntry(path, dict(params)))
    base = _model_path(data["base_model"], f"{where}: base_model", root) if data.get("base_model") else None
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeError(f"{where}: parameters must be a mapping")
    check_settings(params, f"{where}: parameters")
    tok = data.get("tokenizer_source")
    if tok == "union":
        raise MergeError(f"{where}: tokenizer_source: union (vocabulary merging) is not supported")
    tok_path = None if tok in (None, "base") else _model_path(tok, f"{where}: tokenizer_source", root)
    known = set(spec.shared) | set(spec.per_model)
    for name in sorted(set(params) | {k for m in models for k in m.parameters}):
        if name not in known:
            warnings.warn(f"{where}: parameter {st.short(name)} is not used by {spec.name} (it uses {sorted(known)})",
                          stacklevel=2)
    return Recipe(spec.name, models, base, dict(params), data.get("dtype"), data.get("out_dtype"), tok_path)


# Real recipes are a few hundred bytes to a few KB (mergekit's examples: 0.2-3 KB, under 200 YAML
# nodes); these bounds are thousands of times that, and stop a file that is not a recipe before it costs.
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # YAML nodes once aliases are expanded


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a YAML recipe. YAML aliases may share a value (``&p``/``*p``), but a document
    whose aliases expand past ``MAX_RECIPE_NODES`` nodes (a "billion laughs" bomb) is refused while
    still a graph of a few nodes, before anything walks or prints it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MergeError(f"recipe {path} does not exist")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise MergeError(f"recipe {path} is {path.stat().st_size} bytes; a merge recipe is at most {MAX_RECIPE_BYTES}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_recipe_loader(path))  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise MergeError(f"recipe {path} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
    except (UnicodeDecodeError, RecursionError) as err:
        raise MergeError(f"recipe {path} cannot be read as a recipe ({type(err).__name__})") from None
    return parse_recipe(data, root=path.parent, where=str(path))


def _recipe_loader(path: Path) -> type:
    """``yaml.SafeLoader`` that counts each document's nodes with aliases expanded (a shared node
    counted once per reference, computed on the graph without expanding it) and refuses a cycle."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        def compose_document(self) -> Any:
            node = super().compose_document()
            sizes: dict[int, int] = {}

            def expanded(n: Any) -> int:
                if id(n) in sizes:
                    if sizes[id(n)] < 0:
                        raise MergeError(f"recipe {path}: a YAML alias refers to itself (a recursive structure)")
                    return sizes[id(n)]
                sizes[id(n)] = -1
                children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode)
                            else n.value if isinstance(n, yaml.SequenceNode) else [])
                total = 1
                for child in children:
                    total = min(total + expanded(child), MAX_RECIPE_NODES + 1)
                sizes[id(n)] = total
                return total

            if expanded(node) > MAX_RECIPE_NODES:
                raise MergeError(f"recipe {path}: its YAML aliases expand to over {MAX_RECIPE_NODES} values "
                                 "(an alias bomb?); a merge recipe has a few hundred")
            return node

    return RecipeLoader


# ----------------------------------------------------------------------------- on-disk merge


@dataclasses.dataclass
class _Inputs:
    base: Tensors | None
    models: list[Tensors]
    model_params: list[dict[str, Any]]
    names: list[str]


def _arrange(recipe: Recipe, spec: MethodSpec) -> _Inputs:
    """Separate the base from the other inputs (the base may also appear in ``models``)."""
    base_path = recipe.base_model.resolve() if recipe.base_model else None
    sources: dict[Path, Any] = {}

    def source(path: Path) -> Any:
        from solarjax.loading import open_tensors

        key = path.resolve()
        if key not in sources:
            sources[key] = open_tensors(path)
        return sources[key]

    models, params, names = [], [], []
    if spec.base == "required":
        if base_path is None:
            raise MergeError(f"merge_method {spec.name!r} needs base_model")
        for entry in recipe.models:
            if entry.path.resolve() != base_path:
                models.append(source(entry.path)); params.append(entry.parameters); names.append(str(entry.path))
        base = source(recipe.base_model)
    else:  # linear: the base, if named and not listed, is one more input (and needs a weight)
        entries = list(recipe.models)
        if base_path is not None and all(e.path.resolve() != base_path for e in entries):
            entries.append(ModelEntry(recipe.base_model, {}))
        for entry in entries:
            models.append(source(entry.path)); params.append(entry.parameters); names.append(str(entry.path))
        base = None
    total = len(models) + (base is not None)
    if spec.n_inputs is not None and total != spec.n_inputs:
        raise MergeError(f"{spec.name} merges exactly {spec.n_inputs} models including base_model; the recipe gives {total}")
    if not models:
        raise MergeError(f"{spec.name} needs at least one model besides base_model")
    return _Inputs(base, models, params, names)


def _check_tensors(inputs: _Inputs) -> list[str]:
    """Tensor names to write (the reference's, in its order); all inputs must have them, same shapes."""
    everyone = ([inputs.base] if inputs.base is not None else []) + inputs.models
    ref = everyone[0]
    for other in everyone[1:]:
        missing = [n for n in ref.shapes if n not in other.shapes]
        extra = [n for n in other.shapes if n not in ref.shapes]
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has extra tensors {extra[:3]}"
            raise MergeError(f"{other.path} {what} compared with {ref.path}; models must share one architecture")
        for name, shape in ref.shapes.items():
            if other.shapes[name] != shape:
                raise MergeError(f"tensor {name!r}: {ref.path} has shape {shape} but {other.path} has "
                                 f"{other.shapes[name]} (vocabulary or architecture mismatch)")
    return list(ref.shapes)


def _merge_plan(recipe: Recipe, spec: MethodSpec, inputs: _Inputs, names: list[str], seed: int) -> list[st.OutTensor]:
    """Every output tensor, merged when the writer reaches it (one tensor per input in memory)."""
    ref = inputs.base if inputs.base is not None else inputs.models[0]
    n_layers = int(ref.hf_config.get("num_hidden_layers", 1))
    load_dtype = np.dtype(_dtype_name(recipe.dtype)) if recipe.dtype else None
    out_dtype = recipe.out_dtype or recipe.dtype
    model_sources = [[p, recipe.parameters] for p in inputs.model_params]

    def merge_one(name: str, dtype: np.dtype) -> np.ndarray:
        def load(src: Any) -> jax.Array:
            array = src.get(name)
            if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
                raise MergeError(f"tensor {name!r} in {src.path} is {array.dtype}; only floating-point weights merge")
            return jnp.asarray(array.astype(load_dtype) if load_dtype is not None else array)

        base = load(inputs.base) if inputs.base is not None else None
        tensors = [load(m) for m in inputs.models]
        plan = plan_tensor(spec, name, layer_fraction(name, n_layers), [recipe.parameters], model_sources, inputs.names)
        merged = merge_group(spec, base, tensors, [plan], [tensor_key(seed, name)], name, layered=False)
        return np.asarray(merged.astype(dtype))

    out = []
    for name in names:
        dtype = np.dtype(jax.dtypes.canonicalize_dtype(_dtype_name(out_dtype) if out_dtype else ref.dtype(name)))
        out.append(st.OutTensor(name, st.dtype_code(dtype), ref.shapes[name],
                                make=lambda name=name, dtype=dtype: merge_one(name, dtype)))
    return out


def _dtype_name(name: str) -> str:
    return st.canonical_dtype(name, allowed=("float32", "float16", "bfloat16", "float64"), error=MergeError)


def merge_checkpoints(
    recipe: Recipe | str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    progress: bool = False,
    out_format: str = "hf",
) -> Path:
    """Run a recipe on disk and write an HF safetensors directory at ``out``, atomically.

    The output config.json (and tokenizer files) come from ``base_model`` or else the first
    model, as in mergekit; the recipe is saved beside the weights as ``merge_recipe.yml``.
    ``out_format="orbax"`` writes a solarjax Orbax params checkpoint instead (via a temporary
    HF directory, holding the merged model in memory once). ``out`` follows the ownership rule of
    :mod:`solarjax.outputs`: never an input, the recipe, or a directory containing them, and
    ``overwrite`` replaces only a directory solarjax wrote. Every input header is checked against
    its config.json before anything is written.
    """
    import yaml

    from solarjax.loading import copy_tokenizer
    from solarjax.outputs import atomic_output_dir, check_destination, scratch_dir

    if out_format not in ("hf", "orbax"):
        raise MergeError(f"unknown output format {out_format!r}; use 'hf' or 'orbax'")
    recipe_text = None
    recipe_file = None
    if not isinstance(recipe, Recipe):
        recipe_file = Path(recipe)
        recipe = load_recipe(recipe_file)  # bounded and checked before the text is kept
        recipe_text = recipe_file.read_text(encoding="utf-8")
    all_paths = [e.path for e in recipe.models] + [recipe.base_model, recipe.tokenizer_source, recipe_file]
    sources = tuple(p for p in all_paths if p is not None)
    check_destination(out, overwrite=overwrite, sources=sources)  # before opening any input
    spec = method_spec(recipe.method)
    inputs = _arrange(recipe, spec)  # opens and checks every input, so errors come before any output exists
    names = _check_tensors(inputs)
    donor = inputs.base if inputs.base is not None else inputs.models[0]
    if out_format == "orbax":
        from solarjax.ckpt import save_params
        from solarjax.hf import load_hf

        with scratch_dir(out, "hf") as scratch:
            hf_dir = merge_checkpoints(recipe, scratch / "hf", seed=seed, progress=progress)
            cfg, params = load_hf(hf_dir)
        return save_params(out, params, cfg, overwrite=overwrite, sources=sources, verb="merge")
    with atomic_output_dir(out, overwrite=overwrite, sources=sources, verb="merge") as tmp:
        st.write_checkpoint(tmp, _merge_plan(recipe, spec, inputs, names, seed), max_shard_size, progress=progress,
                            desc=f"merge ({spec.name})")
        config = dict(donor.hf_config)
        dtype = recipe.out_dtype or recipe.dtype
        if dtype:
            config["torch_dtype"] = config["dtype"] = _dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer(recipe.tokenizer_source or donor.path, tmp)
        (tmp / "merge_recipe.yml").write_text(recipe_text or yaml.safe_dump(_recipe_dict(recipe), sort_keys=False))
    return Path(out)


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base_model:
        out["base_model"] = str(recipe.base_model)
    out["models"] = [{"model": str(m.path), **({"parameters": m.parameters} if m.parameters else {})} for m in recipe.models]
    for key in ("parameters", "dtype", "out_dtype"):
        if getattr(recipe, key):
            out[key] = getattr(recipe, key)
    return out
