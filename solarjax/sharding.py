"""Device mesh and sharding rules: logical axis names -> mesh axes -> ``NamedSharding``s.

The mesh has three named axes: ``data`` (pure data parallel), ``fsdp`` (data parallel whose
params and optimizer state are also sharded, ZeRO-3 style) and ``tensor`` (Megatron-style split
of heads and MLP). Params carry logical axis names (``solarjax.model.param_axes``); a small rules
table (``config.mesh.rules``) maps each logical name to a mesh axis, a tuple of axes, or None
(replicated). Every divisibility problem is reported here, before anything compiles, because
XLA's own error for an uneven split names neither the param nor the rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from solarjax.config import DEFAULT_RULES, ModelConfig
from solarjax.model import Params, activation_sharding, param_axes, param_shapes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")



class ShardingError(ValueError):
    """A mesh or rules table that cannot shard this model or batch."""


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolve one ``-1`` axis to the remaining devices and check the product."""
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1, got {sizes}")
    for name, value in sizes.items():
        if value != -1 and (not isinstance(value, int) or value < 1):
            raise ShardingError(f"mesh.{name} must be a positive integer or -1, got {value!r}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but there are {num_devices}")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Any = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all) with axes ``("data", "fsdp", "tensor")``.

    Built with ``jax.sharding.Mesh`` (Auto axis types) rather than ``jax.make_mesh``, whose
    Explicit default rejects matmuls over a sharded contracting dimension.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - topology-aware placement is an optimisation only
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config: Mapping[str, Any], devices: Any = None) -> Mesh:
    return make_mesh(mesh_config["data"], mesh_config["fsdp"], mesh_config["tensor"], devices)


def rules_from_config(rules: Mapping[str, Any] | None) -> dict[str, Any]:
    """Rules as a plain dict (ConfigDict -> dict, lists -> tuples), defaults for missing names."""
    out = dict(DEFAULT_RULES)
    for key, value in dict(rules or {}).items():
        out[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


def _axes_of(rule: Any) -> tuple[str, ...]:
    if rule is None:
        return ()
    return tuple(rule) if isinstance(rule, tuple) else (rule,)


def _check_rule(name: str, rule: Any, mesh: Mesh) -> None:
    for axis in _axes_of(rule):
        if axis not in mesh.shape:
            raise ShardingError(f"sharding rule {name!r} -> {rule!r}: mesh has no axis {axis!r} (axes: {tuple(mesh.shape)})")


def logical_to_spec(axes: tuple[str | None, ...], rules: Mapping[str, Any], mesh: Mesh) -> P:
    """PartitionSpec for one array from its logical axis names; a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for name in axes:
        rule = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ShardingError(f"no sharding rule for logical axis {name!r}; rules: {sorted(rules)}")
        _check_rule(name, rule, mesh)
        mesh_axes = tuple(a for a in _axes_of(rule) if a not in used and mesh.shape[a] > 1)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _check_divisible(what: str, shape: tuple[int, ...], axes: tuple, spec: P, mesh: Mesh) -> None:
    for dim, (size, name, entry) in enumerate(zip(shape, axes, tuple(spec) + (None,) * len(shape))):
        mesh_axes = _axes_of(entry)
        parts = math.prod(mesh.shape[a] for a in mesh_axes)
        if parts > 1 and size % parts:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
            raise ShardingError(
                f"{what}: dim {dim} ({name}) has size {size}, not divisible by mesh {sizes} = {parts}; "
                f"change the mesh or map {name!r} to None in mesh.rules"
            )


def param_partition_specs(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Params:
    """PartitionSpecs for every param, checked for divisibility (raises ``ShardingError``)."""
    rules = rules_from_config(rules)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    shapes = param_shapes(cfg)
    flat_axes, treedef = jax.tree_util.tree_flatten_with_path(param_axes(cfg), is_leaf=is_axes)
    flat_shapes = jax.tree.leaves(shapes, is_leaf=is_axes)
    specs = []
    for (path, axes), shape in zip(flat_axes, flat_shapes):
        spec = logical_to_spec(axes, rules, mesh)
        _check_divisible(f"param {jax.tree_util.keystr(path)} {shape}", shape, axes, spec, mesh)
        specs.append(spec)
    return jax.tree.unflatten(treedef, specs)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Params:
    """``NamedSharding`` per param (a pytree like the params), for ``load_hf``/``load_params``/jit."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(cfg, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> P:
    return logical_to_spec(("batch", None), rules_from_config(rules), mesh)


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> dict[str, NamedSharding]:
    """One sharding per batch field: rows split over the batch axes, the sequence replicated."""
    sharding = NamedSharding(mesh, batch_spec(mesh, rules))
    return {key: sharding for key in BATCH_KEYS}


def check_batch(batch_size: int, mesh: Mesh, rules: Mapping[str, Any] | None = None, *,
                grad_accum: int = 1, process_count: int = 1) -> None:
    """Raise before compiling when the global batch cannot be split as configured."""
    if batch_size % grad_accum:
        raise ShardingError(f"train.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum}")
    spec = batch_spec(mesh, rules)
    parts = math.prod(mesh.shape[a] for a in _axes_of(spec[0]))
    micro = batch_size // grad_accum
    if micro % parts:
        raise ShardingError(
            f"microbatch size {micro} (train.batch_size={batch_size} / grad_accum={grad_accum}) is not divisible "
            f"by the batch mesh axes {spec[0]} = {parts} devices"
        )
    if batch_size % process_count:
        raise ShardingError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_activation_sharding(fn: Callable, batch_sharding: NamedSharding) -> Callable:
    """``fn`` traced with its (batch, seq, d_model) activations sharded like the batch rows.

    Every jitted step over a mesh needs this: without it XLA may follow the FSDP-sharded weights
    into the activations and run each layer on the whole global batch (see
    ``solarjax.model.activation_sharding``).
    """
    sharding = NamedSharding(batch_sharding.mesh, P(batch_sharding.spec[0], None, None))

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(sharding):
            return fn(*args, **kwargs)

    return wrapped


def vocab_parallel_cross_entropy(x: jax.Array, head: jax.Array, targets: jax.Array, mesh: Mesh,
                                 rules: Mapping[str, Any] | None = None) -> jax.Array:
    """Per-token cross-entropy ``(B, T)`` of ``x @ head`` with the vocabulary split over the mesh.

    ``x`` is the final-normed hidden state ``(B, T, d)``, ``head`` the ``(d, V)`` projection. Each
    device computes logits for its vocabulary shard only; the softmax normaliser and the target's
    logit are combined across shards with ``pmax``/``psum``, so the full ``(B, T, V)`` fp32 logits,
    the largest activation of a big-vocabulary model, never exist on one device.
    """
    rules = rules_from_config(rules)
    batch = batch_spec(mesh, rules)[0]
    vocab = logical_to_spec(("vocab",), rules, mesh)[0]
    vocab_axes = tuple(_axes_of(vocab))

    def local(x, head, targets):
        logits = jnp.einsum("btd,dv->btv", x, head.astype(x.dtype)).astype(jnp.float32)
        shard = head.shape[1]
        start = jax.lax.axis_index(vocab_axes) * shard if vocab_axes else 0
        top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        top = jax.lax.pmax(top, vocab_axes) if vocab_axes else top
        sum_exp = jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)
        index = targets - start
        mine = (index >= 0) & (index < shard)
        picked = jnp.take_along_axis(logits, jnp.clip(index, 0, shard - 1)[..., None], axis=-1)[..., 0]
        picked = jnp.where(mine, picked, 0.0)
        if vocab_axes:
            sum_exp, picked = jax.lax.psum(sum_exp, vocab_axes), jax.lax.psum(picked, vocab_axes)
        return jnp.log(sum_exp) + top - picked

    return jax.shard_map(local, mesh=mesh, in_specs=(P(batch, None, None), P(None, vocab), P(batch, None)),
                         out_specs=P(batch, None))(x, head, targets)
