"""Orbax params checkpoints: the params pytree plus the model config that gives it meaning.

A checkpoint directory holds two Orbax items, ``params`` (sharded arrays, tensorstore) and
``model_config`` (JSON). The trainer's ``CheckpointManager`` steps use the same item names, so
``load_params`` also reads a training step directory. Orbax finalises saves atomically (it writes
to a temporary directory and renames), so a crash never leaves a half checkpoint that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from solarjax.config import ModelConfig, model_config_from_dict
from solarjax.hf import CheckpointError
from solarjax.model import Params, abstract_params

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"


def save_params(path: str | os.PathLike, params: Params, cfg: ModelConfig, *, overwrite: bool = False,
                sources: tuple = (), verb: str = "save_params", beside: Any = None) -> Path:
    """Save ``params`` (host or sharded ``jax.Array``s) and ``cfg`` to ``path``; blocks until done.

    Written through :class:`solarjax.outputs.atomic_output_dir`: ``path`` must not be, contain or
    lie inside any of ``sources``, and ``overwrite`` replaces only a directory solarjax wrote.
    One process writes it (the trainer's checkpoint manager handles multi-host saves). ``beside``
    (called with the directory before it appears) adds files to it, e.g. the source's tokenizer
    (``solarjax.loading.copy_tokenizer``), so the checkpoint is a complete model.
    """
    from solarjax.outputs import atomic_output_dir

    quiet_orbax_errors()  # a failed write (disk full) is then atomic_output_dir's one line, not pages
    with atomic_output_dir(path, overwrite=overwrite, sources=sources, verb=verb, create=False) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(
                tmp,
                args=ocp.args.Composite(**{
                    PARAMS_ITEM: ocp.args.StandardSave(params),
                    CONFIG_ITEM: ocp.args.JsonSave(cfg.to_dict()),
                }),
            )
        if beside is not None:
            beside(tmp)
    return Path(path).resolve()


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` stored beside the params, without touching the arrays."""
    file = as_path(path) / CONFIG_ITEM / "metadata"  # a gs:// URI stays one
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
    path = as_path(path)  # a gs:// URI stays one (Orbax reads GCS natively)
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
    mismatch = first_shape_mismatch(stored, target)
    if mismatch is not None:
        name, shape, expected = mismatch
        if shape is None:
            raise CheckpointError(f"{path}: param {name} is missing from the checkpoint")
        raise CheckpointError(f"{path}: param {name} has shape {shape}, the config implies {expected}")


def first_shape_mismatch(stored: Any, target: Any) -> tuple[str, tuple | None, tuple] | None:
    """``(leaf name, stored shape or None if missing, target shape)`` of the first leaf that differs."""
    stored_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = jax.tree_util.keystr(key)
        shape = tuple(stored_flat[name].shape) if name in stored_flat else None
        if shape != tuple(leaf.shape):
            return name, shape, tuple(leaf.shape)
    return None


# ----------------------------------------------------------------------------- training checkpoints
#
# A training run's checkpoints are an Orbax ``CheckpointManager`` directory: ``<dir>/<step>/`` with
# items ``params`` (as above, so ``load_params`` reads a step), ``model_config``, ``opt_state`` and
# ``data_state`` (the grain iterator, one JSON file per process). Orbax writes a step into
# ``<step>.orbax-checkpoint-tmp[-<timestamp>]`` and renames it when every process has finished
# (on GCS, where there is no rename, a ``commit_success.txt`` marks a finished step), so a killed
# save never looks complete; the next manager over the directory deletes such leftovers.

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's own name tag for an unfinished step


def as_path(path: str | os.PathLike) -> epath.Path:
    """One path type for local and remote storage: a URI (``gs://bucket/x``) is kept as it is (Orbax
    and tensorstore write GCS natively), a local path is made absolute."""
    text = os.fspath(path)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))


class _OrbaxErrorLog(logging.Filter):
    """Holds back the error logs of a failing Orbax save (a page of traceback each, several per failed
    save, from Orbax's threads and from asyncio's "exception was never retrieved") and keeps the
    first message, which :func:`_one_error` turns into one line."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    @staticmethod
    def _from_orbax(record: logging.LogRecord) -> bool:
        marker = f"{os.sep}orbax{os.sep}"
        if marker in record.pathname:
            return True
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if marker in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and self._from_orbax(record):
            if self.first is None and record.exc_info and record.exc_info[1] is not None:
                self.first = str(record.exc_info[1])
            return False
        return True


_ORBAX_ERRORS = _OrbaxErrorLog()


def _not_item_metadata_warning(record: logging.LogRecord) -> bool:
    """Drops Orbax's "Metadata file does not exist" warning: reading a checkpoint's ``params`` item
    (every load, resume and shape check) finds no metadata file of the item's own, by design."""
    return not (record.levelno == logging.WARNING and str(record.msg).startswith("Metadata file does not exist"))


logging.getLogger("absl").addFilter(_not_item_metadata_warning)  # Orbax logs through absl
_previous_unraisablehook = sys.unraisablehook


def _drop_closed_loop_errors(unraisable) -> None:
    """After a failed save Orbax closes the asyncio loop of its write while tensorstore still has
    writes in flight; each one's completion then reports "Event loop is closed" as unraisable (a
    page per write). They say nothing the one ``CheckpointError`` does not, so they are dropped."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
        return
    _previous_unraisablehook(unraisable)


def quiet_orbax_errors() -> None:
    """Hold back the pages of logs and unraisable errors a failing Orbax save prints; the save's
    own exception then says it in one line. Idempotent."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_ORBAX_ERRORS)  # idempotent: a Filter is added once
    sys.unraisablehook = _drop_closed_loop_errors


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


@contextlib.contextmanager
def _one_error(manager, what: str):
    """Any exception from an Orbax save or wait becomes one ``CheckpointError`` line naming the
    first underlying error and the last complete step (the previous checkpoint, left intact)."""
    _ORBAX_ERRORS.first = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - Orbax re-raises background errors of any type
        cause = _first_line(_ORBAX_ERRORS.first or f"{type(err).__name__}: {err}")
        _ORBAX_ERRORS.first = None
        complete = complete_steps(manager.directory)
        remove_unfinished_steps(manager.directory)
        kept = f"the last complete checkpoint, step {complete[-1]}, is intact" if complete else "no complete checkpoint"
        raise CheckpointError(f"{what} in {manager.directory} failed: {cause} ({kept})") from None


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Finished steps in a checkpoint directory, ascending (what a resume can restore)."""
    import orbax.checkpoint.utils as ocp_utils

    directory = as_path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and not ocp_utils.is_tmp_checkpoint(p))


def remove_unfinished_steps(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary step directories (``<step>.orbax-checkpoint-tmp*``) that killed or failed
    saves left in a local checkpoint directory; process 0 only, and only that exact pattern.
    Returns the names removed."""
    directory = as_path(directory)
    if jax.process_index() != 0 or not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        head, _, _ = p.name.partition(TMP_SUFFIX)
        if head.isdigit() and p.name != head and p.is_dir():
            p.rmtree(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def checkpoint_manager(directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
    """An Orbax ``CheckpointManager`` over ``directory`` (local or ``gs://``), after deleting the
    unfinished steps that killed runs left there (Orbax's own cleanup does it on GCS, where an
    unfinished step is a directory without ``commit_success.txt``)."""
    quiet_orbax_errors()
    directory = as_path(directory)
    remote = "://" in os.fspath(directory)
    if not remote:
        remove_unfinished_steps(directory)
    # ``every`` is enforced by the caller (``train``); Orbax alone would also save the first step.
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=remote)
    return ocp.CheckpointManager(directory, options=options)


def save_checkpoint(manager, state: Any, cfg: ModelConfig, data_iter: Any = None, *, force: bool = False) -> bool:
    """Save ``state`` (params, opt_state, step) at its step, asynchronously when configured; False when
    not a save step. A failure of this or the previous (async) save raises one ``CheckpointError``.

    Size: the fp32 params plus AdamW's m and v (3x the params; 2.13 GB for a 191M model, tensorstore
    compressing a little), plus kilobytes of model config and data-iterator state: the floor for a
    checkpoint a run resumes from (docs/performance.md, "CPU training memory")."""
    import grain

    step = int(jax.device_get(state["step"]))
    items = {PARAMS_ITEM: ocp.args.StandardSave(state["params"]),
             CONFIG_ITEM: ocp.args.JsonSave(cfg.to_dict()),
             "opt_state": ocp.args.StandardSave(state["opt_state"])}
    if data_iter is not None:
        items["data_state"] = grain.checkpoint.CheckpointSave(data_iter)
    with _one_error(manager, "saving a checkpoint"):
        return manager.save(step, args=ocp.args.Composite(**items), force=force)


def wait_for_saves(manager) -> None:
    """Block until the pending async save has committed; its failure raises one ``CheckpointError``."""
    with _one_error(manager, "saving a checkpoint"):
        manager.wait_until_finished()


def restore_checkpoint(manager, abstract_state: Any, data_iter: Any = None, step: int | None = None) -> Any:
    """Restore a complete step (default: the latest) into ``abstract_state``'s shapes and shardings.

    A run directory written by a model of another shape fails with one line naming the parameter,
    both shapes and what to do, before any array is read.
    """
    import grain

    step = manager.latest_step() if step is None else step
    check_restore_shapes(manager.directory, step, abstract_state["params"])
    items = {PARAMS_ITEM: ocp.args.StandardRestore(abstract_state["params"]),
             "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"])}
    if data_iter is not None:
        items["data_state"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    step_sharding = getattr(abstract_state["step"], "sharding", None)
    step_value = jax.numpy.asarray(step, jax.numpy.int32)
    return {"params": restored[PARAMS_ITEM], "opt_state": restored["opt_state"],
            "step": jax.device_put(step_value, step_sharding) if step_sharding is not None else step_value}


class ModelMismatch(CheckpointError):
    """The run directory's checkpoints belong to a model of another shape (not a damaged file)."""


UNREADABLE_SUFFIX = ".unreadable"  # a damaged step is kept under this name, out of the manager's way


def restore_newest_intact(manager, abstract_state: Any, data_iter: Any = None, echo=None) -> Any:
    """:func:`restore_checkpoint` of the newest step that restores: a step with a truncated, deleted
    or corrupt file is skipped, and renamed ``<step>.unreadable`` (kept for inspection, never
    deleted) so later saves of that step number do not collide with it. Falling back says so in
    one line through ``echo`` (default: stderr); no intact step is one ``CheckpointError``."""
    failed: list[tuple[int, str]] = []
    for step in reversed(complete_steps(manager.directory)):
        _ORBAX_ERRORS.first = None
        try:
            state = restore_checkpoint(manager, abstract_state, data_iter, step)
        except ModelMismatch:
            raise
        except Exception as err:  # noqa: BLE001 - Orbax and tensorstore raise anything on a damaged file
            failed.append((step, _first_line(_ORBAX_ERRORS.first or f"{type(err).__name__}: {err}")))
            continue
        if failed:
            moved = _set_aside(manager, [s for s, _ in failed])
            (echo or _stderr)(f"solarjax: checkpoint step {failed[0][0]} in {manager.directory} is unreadable "
                              f"({_short(failed[0][1])}); resumed from step {step}, the newest intact one"
                              + (f" ({', '.join(moved)} kept aside)" if moved else ""))
        return state
    causes = "; ".join(f"step {s}: {_short(c)}" for s, c in failed)
    raise CheckpointError(f"cannot resume from {manager.directory}: no checkpoint is intact ({causes}); "
                          f"move the directory away to start over")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _set_aside(manager, steps: list[int]) -> list[str]:
    """Rename damaged local steps to ``<step>.unreadable[.N]`` (process 0) and reload the manager."""
    directory = as_path(manager.directory)
    moved = []
    if jax.process_index() == 0 and "://" not in os.fspath(directory):
        for step in steps:
            source = Path(os.fspath(directory / str(step)))
            target, n = source.with_name(source.name + UNREADABLE_SUFFIX), 1
            while target.exists():
                target, n = source.with_name(f"{source.name}{UNREADABLE_SUFFIX}.{n}"), n + 1
            source.rename(target)
            moved.append(target.name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("solarjax: damaged checkpoints set aside")
    manager.reload()
    return moved


def check_restore_shapes(directory: epath.Path, step: int, abstract_params_tree: Any) -> None:
    with ocp.StandardCheckpointer() as reader:
        stored = reader.metadata(directory / str(step) / PARAMS_ITEM).item_metadata.tree
    mismatch = first_shape_mismatch(stored, abstract_params_tree)
    if mismatch is not None:
        name, stored_shape, shape = mismatch
        found = f"has shape {stored_shape}" if stored_shape is not None else "is missing"
        raise ModelMismatch(
            f"cannot resume from {directory}/{step}: param {name} {found} there but the model has {shape}; "
            f"they belong to a model of another shape: train into a new train.out_dir (or checkpoint.dir), "
            f"or move these checkpoints away")
