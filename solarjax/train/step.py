"""The train step as a pure function of ``(state, batch)``, its state, shardings and jit.

Train state: ``{"params": fp32 master weights, "opt_state": optax state, "step": int32}``. The abstract
state and shardings describe it without allocating it, so the AOT compiler lowers the very step ``train`` runs.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from solarjax import sharding as shd
from solarjax.config import ModelConfig
from solarjax.losses import Batch, LossFn, next_token_loss
from solarjax.model import Params, abstract_params


TrainState = dict[str, Any]


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
