"""The one training loop: resume, step, log, evaluate, checkpoint, stop cleanly."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from solarjax import ckpt
from solarjax import sharding as shd
from solarjax.config import ModelConfig
from solarjax.losses import LossFn
from solarjax.model import Params
from solarjax.train.guards import NonFiniteGuard, Preempted, StopSignals, TrainingDiverged, _params_finite, one_writer
from solarjax.train.metrics import MetricsLogger, check_loggers, metrics_logger
from solarjax.train.setup import (_place_params, build_step, configured_tokenizer, init_model,
                                  maybe_initialize_distributed, model_config)
from solarjax.train.step import TrainState, abstract_train_state, make_eval_step
from solarjax.train.task import Task


def start_or_resume(config, cfg: ModelConfig, params: Params, optimizer: optax.GradientTransformation,
                    state_sh: TrainState, train_iter: Any, out_dir: epath.Path | None, *,
                    data_from_config: bool = True):
    """``(state, checkpoint manager | None, data iterator to checkpoint | None)``.

    A fresh state from ``params``, or, when ``config.checkpoint`` has a directory with a finished
    step and ``resume`` is set, that step's state with the data iterator moved to where it was
    (shapes checked first; no fresh optimizer state is built, so a resume needs no extra memory).
    A step with a damaged file is skipped for the newest intact one, saying so in one line
    (:func:`solarjax.ckpt.restore_newest_intact`).

    The run directory's ``run.json`` (:mod:`solarjax.run_record`) is written at a fresh start; a
    resume whose config, data files (``data_from_config``: read from ``config.data``) or tokenizer
    differ from it is refused in one line unless ``checkpoint.allow_changes`` names the keys.
    """
    ck = config.checkpoint
    ckpt_dir = ckpt.as_path(ck.dir) if ck.dir else (out_dir / "checkpoints" if out_dir else None)
    manager = (ckpt.checkpoint_manager(ckpt_dir, every=ck.every, keep=ck.keep, async_save=ck.async_save)
               if ckpt_dir else None)
    data_state = train_iter if hasattr(train_iter, "get_state") else None
    resuming = manager is not None and ck.resume and manager.latest_step() is not None
    _record_run(config, out_dir, resuming, data_from_config)
    if resuming:
        state = ckpt.restore_newest_intact(manager, abstract_train_state(cfg, optimizer, state_sh), data_state)
        return state, manager, data_state
    state = {"params": params,
             "opt_state": jax.jit(optimizer.init, out_shardings=state_sh["opt_state"])(params),
             "step": jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])}
    return state, manager, data_state


def _record_run(config, out_dir: epath.Path | None, resuming: bool, data_from_config: bool) -> None:
    """Write (fresh start) or check (resume) the local run directory's record; process 0."""
    from solarjax import run_record

    if out_dir is None or "://" in os.fspath(out_dir) or jax.process_index() != 0:
        return
    sources, tokenizer = (), None
    if data_from_config:
        sources = (("files", config.data.source), ("eval_files", config.data.get("eval_source")))
        tokenizer = configured_tokenizer(config) or out_dir / "tokenizer.json"
    record = run_record.describe(config, data_sources=sources, tokenizer=tokenizer)
    if not resuming:
        run_record.write_record(out_dir, record)
        return
    allowed = config.checkpoint.get("allow_changes") or ()
    run_record.check_resume(out_dir, record, allowed.split(",") if isinstance(allowed, str) else allowed)




def finish_run(bar, manager, logger: MetricsLogger) -> None:
    """Close the progress bar and the logs, wait for the last async checkpoint to commit (its
    failure raises one ``CheckpointError``), close the checkpoint manager."""
    bar.close()
    logger.close()
    if manager is not None:
        try:
            ckpt.wait_for_saves(manager)
        except BaseException:
            _close_quietly(manager)
            raise
        manager.close()


def _close_quietly(manager) -> None:
    """Close a checkpoint manager on the way out of a failing run without masking its error; a save
    still in flight is committed (Orbax's ``close`` waits) or, failing, left for the next run to delete."""
    try:
        manager.close()
    except Exception:  # noqa: BLE001 - the error being raised is the one to report
        pass


def _abandon_run(bar, manager, logger: MetricsLogger) -> None:
    bar.close()
    logger.close()
    if manager is not None:
        _close_quietly(manager)




@one_writer
def train(
    config,
    *,
    cfg: ModelConfig | None = None,
    params: Params | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    loss_fn: LossFn | None = None,
    stop_after: int | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``config.train.steps`` steps of ``task`` (default: pretraining); return a summary.

    ``loss_fn`` defaults to the task's (:func:`default_loss` for the mesh); ``cfg``/``params`` skip
    ``config.init``; ``train_data``/``eval_data`` (grain datasets or iterables of per-process numpy
    batches) skip ``config.data``; ``stop_after`` ends the run early at that step (with a
    checkpoint), as a pre-emption would.

    Faults: SIGTERM/SIGINT finish the step, checkpoint it and raise :class:`Preempted`; more than
    ``train.max_nonfinite_skips`` non-finite steps in a row raise :class:`TrainingDiverged` (no
    checkpoint is written after them); a failed save raises one ``CheckpointError``.

    Returns ``{"steps", "start_step", "metrics" (per step), "losses" (per step), "final_loss",
    "params", "cfg", "checkpoint_dir", "skipped_steps"}`` plus the task's fields (pretraining:
    ``"eval"`` ([step, loss] pairs), ``"final_eval_loss"``, ``"tokens_per_s"``, ``"mfu"``).

    A fresh run evaluates once at step 0, before any update (``train.eval_at_start``), so an update
    that makes a pretrained model worse shows in the first eval record. ``config.optim`` fields left
    None are decided by :func:`solarjax.optim.resolve_optim`: the continued-pretraining schedule when
    the run starts from a pretrained model (``init.source``, or ``params``), else the from-scratch one.
    """
    from solarjax.progress import progress_bar

    task = task or Task()
    maybe_initialize_distributed(config)
    tc = config.train
    mesh = shd.mesh_from_config(config.mesh)
    rules = shd.rules_from_config(config.mesh.rules)
    shd.check_batch(task.rows_per_example * tc.batch_size, mesh, rules, grad_accum=tc.grad_accum,
                    process_count=jax.process_count())
    task.check(config)
    check_loggers(config)
    out_dir = ckpt.as_path(tc.out_dir) if tc.out_dir else None

    params_given = params is not None
    if params is None:
        cfg, params = init_model(config, mesh, rules)
    else:
        cfg = (cfg or model_config(config)).replace(param_dtype="float32")
        params = _place_params(params, cfg, mesh, rules)
    task.setup(config, cfg, params, mesh, rules)
    data_from_config = train_data is None
    if data_from_config:
        train_data, default_eval = task.datasets(config, cfg, out_dir)
        eval_data = eval_data if eval_data is not None else default_eval

    # a pretrained model (init.source, or params from the caller) gets the continued-pretraining schedule
    continued = config.init.source is not None or params_given
    built = build_step(config, mesh, rules, cfg, task, loss_fn=loss_fn, continued=continued)
    step_fn, state_sh, batch_sh, optimizer, loss_fn = (built.step, built.state_shardings, built.batch_shardings,
                                                       built.optimizer, built.loss_fn)
    eval_step = make_eval_step(cfg, loss_fn, batch_sh["tokens"])
    train_iter = iter(train_data)
    state, manager, data_state = start_or_resume(config, cfg, params, optimizer, state_sh, train_iter, out_dir,
                                                 data_from_config=data_from_config)
    start = int(jax.device_get(state["step"]))
    logger = metrics_logger(config, out_dir)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = progress_bar(total=tc.steps, initial=start, desc=task.name, unit="step",
                       enabled=tc.progress and jax.process_index() == 0, file=sys.stdout)
    echo = bar.write if tc.progress else print
    if start and jax.process_index() == 0:
        echo(f"resumed from step {start} (of {tc.steps})")
    every = config.checkpoint.every
    guard = NonFiniteGuard(tc.get("max_nonfinite_skips", 10))
    history: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    pending: list[dict[str, jax.Array]] = []
    timer = {"start": None, "steps": 0}  # the first step compiles: throughput is timed from its end
    save_due = stop = False
    done = start

    def flush(done: int) -> None:
        """Fetch the pending steps' metrics into the history and log one record for them."""
        nonlocal pending
        if not pending:
            return
        fetched = [{k: float(v) if np.ndim(v) == 0 else np.asarray(v, np.float64) for k, v in m.items()}
                   for m in jax.device_get(pending)]
        first = done - len(fetched) + 1
        skipped = sum(int(m.pop("nonfinite", 0)) for m in fetched)
        history.extend({"step": first + i, **m} for i, m in enumerate(fetched))
        elapsed = time.perf_counter() - timer["start"]
        record = {"step": done, **task.record(fetched, timer["steps"] / elapsed if timer["steps"] else None)}
        if skipped:
            record["skipped_steps"] = skipped
        logger.log(record, echo)
        pending, timer["start"], timer["steps"] = [], time.perf_counter(), 0

    def save(done: int) -> None:
        paused = time.perf_counter()
        if not _params_finite(state["params"]):  # the guard keeps NaNs out; an overflowed update is caught here
            raise TrainingDiverged(f"training stopped at step {done}: the weights are no longer finite (an update "
                                   "overflowed); not saving them. Lower optim.lr, then resume")
        ckpt.save_checkpoint(manager, state, cfg, data_state, force=True)
        timer["start"] += time.perf_counter() - paused  # saving is not training throughput

    def run_eval(done: int) -> None:
        paused = time.perf_counter()
        record = task.evaluate(eval_step, state["params"], eval_data, tc.eval_batches, batch_sh)
        if record is not None:
            evals.append({"step": done, **record})
            logger.log(evals[-1], echo)
        if timer["start"] is not None:
            timer["start"] += time.perf_counter() - paused  # eval time is not training throughput

    try:
        with StopSignals() as signals:
            if start == 0 and eval_data is not None and tc.eval_every and tc.get("eval_at_start", True):
                run_eval(0)  # the model as it came in: an update that makes it worse shows from the first eval
            for step in range(start, end):
                state, metrics = step_fn(state, task.batch(next(train_iter), batch_sh))
                pending.append(metrics)
                done = step + 1
                if timer["start"] is None:
                    jax.block_until_ready(metrics)
                    timer["start"] = time.perf_counter()
                else:
                    timer["steps"] += 1
                guard.observe(done, metrics)
                stop = signals.requested(done) and done < end
                save_due |= bool(every and done % every == 0) or done == end
                if manager is not None and (save_due or stop):
                    guard.settle()
                    if guard.streak == 0 or stop or done == end:  # a skipped step saves at the next good one
                        save(done)
                        save_due = False
                if done % tc.log_every == 0 or done == end or stop:
                    flush(done)
                if stop:
                    break
                if eval_data is not None and tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
                    run_eval(done)
                bar.update(1)
            guard.settle()
    except BaseException as err:
        if isinstance(err, TrainingDiverged):
            flush(int(jax.device_get(state["step"])))  # the non-finite steps' records, as null + flag
        _abandon_run(bar, manager, logger)  # the last (finite) checkpoint in flight still commits
        raise
    finish_run(bar, manager, logger)
    if signals.signum is not None and stop:
        name = signal.Signals(signals.signum).name
        where = (f"checkpoint step {done} is saved in {manager.directory}; run the same command again to resume "
                 f"from step {done}") if manager is not None else (
                 "no checkpoint directory is configured (train.out_dir / checkpoint.dir), so this run's steps are lost")
        preempted = Preempted(f"stopped by {name} after step {done} of {tc.steps}: {where}", signals.signum)
        print(f"solarjax: {preempted}", file=sys.stderr, flush=True)
        raise preempted
    return {"steps": end, "start_step": start, "metrics": history, "losses": [m["loss"] for m in history],
            "final_loss": history[-1]["loss"] if history else None, "params": state["params"], "cfg": cfg,
            "checkpoint_dir": str(manager.directory) if manager is not None else None,
            "skipped_steps": guard.total, **task.summary(evals)}
