"""Orbax params checkpoints: the params pytree plus the model config that gives it meaning.

A checkpoint directory holds two Orbax items, ``params`` (sharded arrays, tensorstore) and
``model_config`` (JSON). The trainer's ``CheckpointManager`` steps use the same item names, so
``load_params`` also reads a training step directory. Orbax finalises saves atomically (it writes
to a temporary directory and renames), so a crash never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from solarjax.config import ModelConfig, model_config_from_dict
from solarjax.hf import CheckpointError
from solarjax.model import Params, abstract_params

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"


def save_params(path: str | os.PathLike, params: Params, cfg: ModelConfig, *, overwrite: bool = False) -> Path:
    """Save ``params`` (host or sharded ``jax.Array``s) and ``cfg`` to ``path``; blocks until done."""
    path = Path(path).resolve()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(**{
                PARAMS_ITEM: ocp.args.StandardSave(params),
                CONFIG_ITEM: ocp.args.JsonSave(cfg.to_dict()),
            }),
            force=overwrite,
        )
    return path


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` stored beside the params, without touching the arrays."""
    file = Path(path) / CONFIG_ITEM / "metadata"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a solarjax Orbax checkpoint (no {CONFIG_ITEM}/ item)")
    return model_config_from_dict(json.loads(file.read_text()))


def load_params(
    path: str | os.PathLike,
    *,
    shardings: Any = None,
    dtype: str | None = None,
) -> tuple[ModelConfig, Params]:
    """Restore ``(cfg, params)``; ``shardings`` (a pytree like the params) places them on a mesh.

    Stored shapes are checked against the stored config first, so a mismatched checkpoint fails
    with the leaf name and both shapes instead of a tensorstore error.
    """
    path = Path(path).resolve()
    if not (path / PARAMS_ITEM).is_dir():
        raise CheckpointError(f"{path} is not a solarjax Orbax checkpoint (no {PARAMS_ITEM}/ item)")
    cfg = read_config(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    target = abstract_params(cfg)
    with ocp.StandardCheckpointer() as reader:
        _check_shapes(reader.metadata(path / PARAMS_ITEM).item_metadata.tree, target, path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        if shardings is not None:
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings
            )
        restored = checkpointer.restore(
            path, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)})
        )
    return cfg, restored[PARAMS_ITEM]


def _check_shapes(stored: Any, target: Params, path: Path) -> None:
    stored_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = jax.tree_util.keystr(key)
        if name not in stored_flat:
            raise CheckpointError(f"{path}: param {name} is missing from the checkpoint")
        shape = tuple(stored_flat[name].shape)
        if shape != leaf.shape:
            raise CheckpointError(f"{path}: param {name} has shape {shape}, the config implies {leaf.shape}")
