"""Sharded training: the step, its shardings and the one loop that pretraining, SFT and DPO drive.

Modules: ``step`` (the pure step, its state, shardings and jit), ``setup`` (model, tokenizer, data and
``build_step``, the one place the optimizer, loss, step and jit are built, for ``train`` and ``solarjax aot``),
``task`` (:class:`Task`), ``guards`` (signals, non-finite steps, one writer), ``metrics`` (logs, MFU, eval),
``loop`` (:func:`train`). Losses live in :mod:`solarjax.losses`.

The pieces are separable on purpose: ``make_train_step`` is a pure function of
``(state, batch)`` with a pluggable ``loss_fn`` (SFT/DPO swap the loss), ``train_state_shardings``
and ``abstract_train_state`` describe the state without allocating it (so the AOT compiler lowers
the very same step for a TPU topology), and ``train(config, task=...)`` wires data, mesh,
checkpoints (``solarjax.ckpt``) and metrics around them. A :class:`Task` supplies what differs
between pretraining, SFT and DPO (batch construction, loss, log records, eval); everything else,
including the fault handling, is this one loop.

Train state: ``{"params": fp32 master weights, "opt_state": optax state, "step": int32}``.
Compute runs in ``cfg.dtype`` (the model casts weights at each matmul), gradients and AdamW
moments stay fp32.

Batch: a dict of int32 ``(B, T)`` arrays ``tokens``, ``targets``, ``loss_mask``, ``segment_ids``,
``positions`` (``solarjax.data`` produces it).

Faults: a step with a non-finite loss or gradient norm leaves the weights and optimizer state as
they were (inside the jitted step) and is counted; more than ``train.max_nonfinite_skips`` in a
row stop the run (``TrainingDiverged``) without checkpointing. SIGTERM/SIGINT finish the step,
checkpoint it (params, optimizer, data iterator), wait for the commit and raise ``Preempted``,
a ``SystemExit`` with code 143/130 (running the same command again resumes). Checkpoints: ``solarjax.ckpt``.
"""

from __future__ import annotations

from solarjax.losses import Batch, LossFn, default_loss, next_token_loss
from solarjax.train.guards import NonFiniteGuard, Preempted, StopSignals, TrainingDiverged, one_writer
from solarjax.train.loop import finish_run, start_or_resume, train
from solarjax.train.metrics import MetricsLogger, check_loggers, evaluate, json_safe, metrics_logger, mfu, tensorboard_writer
from solarjax.train.setup import (COMPUTE_KEYS, SHAPE_KEYS, BuiltStep, build_step, configured_tokenizer, init_model,
                                  init_source, make_data, maybe_initialize_distributed, model_config, model_from_init,
                                  run_tokenizer)
from solarjax.train.step import (TrainState, abstract_batch, abstract_train_state, global_batch, init_train_state,
                                 jit_train_step, make_eval_step, make_train_step, train_state_shardings)
from solarjax.train.task import Task

__all__ = [
    "Batch", "BuiltStep", "COMPUTE_KEYS", "LossFn", "MetricsLogger", "NonFiniteGuard", "Preempted", "SHAPE_KEYS",
    "StopSignals", "Task", "TrainState", "TrainingDiverged", "abstract_batch", "abstract_train_state", "build_step",
    "check_loggers", "configured_tokenizer", "default_loss", "evaluate", "finish_run", "global_batch", "init_model",
    "init_source", "init_train_state", "jit_train_step", "json_safe", "make_data", "make_eval_step", "make_train_step",
    "maybe_initialize_distributed", "metrics_logger", "mfu", "model_config", "model_from_init", "next_token_loss",
    "one_writer", "run_tokenizer", "start_or_resume", "tensorboard_writer", "train", "train_state_shardings",
]
