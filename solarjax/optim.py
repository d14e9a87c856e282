"""The optimizer: AdamW behind global-norm clipping, with a warmup + cosine / WSD / constant schedule.

Everything is optax; this module only turns ``config.optim`` into an ``optax.GradientTransformation``
and its learning-rate schedule (kept separately so the train step can log the current rate).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from solarjax.config import ConfigError
from solarjax.families import DECAYS
from solarjax.model import Params

SCHEDULES = ("cosine", "wsd", "constant")

def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step.

    ``cosine``: linear warmup then cosine to ``lr * min_lr_ratio`` at ``total_steps``.
    ``wsd`` (warmup-stable-decay): warmup, constant, then a linear decay over the last
    ``decay_fraction`` of training, which lets a run be extended from any stable-phase checkpoint.
    """
    lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
    end = lr * float(optim["min_lr_ratio"])
    name = optim["schedule"]
    if name not in SCHEDULES:
        raise ConfigError(f"optim.schedule={name!r} is not one of {SCHEDULES}")
    if warmup < 0 or total_steps <= 0:
        raise ConfigError(f"optim.warmup_steps={warmup} and train.steps={total_steps} must be >= 0 and > 0")
    warmup = min(warmup, total_steps)
    if name == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end)
    decay = max(1, int(round(float(optim["decay_fraction"]) * total_steps)))
    stable = max(0, total_steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)],
        [warmup, warmup + stable],
    )

def weight_decay_mask(params: Params, decay_norms_and_embeddings: bool = False) -> Params:
    """True where weight decay applies, as each leaf's family spec declares (:mod:`solarjax.families`):
    matrices decay; norms, biases and the embedding table do not, unless
    ``decay_norms_and_embeddings`` (then every leaf decays). A leaf no family declares decays when
    it is a matrix (two or more dims besides the layer axis)."""
    def decide(path, leaf):
        name = getattr(path[-1], "key", None)
        if decay_norms_and_embeddings:
            return True
        if name in DECAYS:
            return DECAYS[name]
        stacked = getattr(path[0], "key", None) == "layers"
        return leaf.ndim - int(stacked) >= 2
    return jax.tree_util.tree_map_with_path(decide, params)

def make_optimizer(optim: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` from ``config.optim``; state dtypes follow the (fp32 master) params."""
    schedule = make_schedule(optim, total_steps)
    decay_all = bool(optim["decay_norms_and_embeddings"])
    adamw = optax.adamw(
        schedule, b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]),
        weight_decay=float(optim["weight_decay"]), mask=lambda p: weight_decay_mask(p, decay_all),
    )
    clip = float(optim["clip_norm"] or 0.0)
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    return tx, schedule
