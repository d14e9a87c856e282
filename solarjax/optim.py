"""The optimizer: AdamW behind global-norm clipping, with a warmup + cosine / WSD / constant schedule.

Everything is optax; this module only turns ``config.optim`` into an ``optax.GradientTransformation``
and its learning-rate schedule (kept separately so the train step can log the current rate).

It is also the one place that decides the schedule a run gets when ``config.optim`` leaves
``lr``, ``warmup_steps``, ``schedule`` or ``min_lr_ratio`` as None (:func:`resolve_optim`): a model
trained from scratch gets :data:`FROM_SCRATCH`; continued pretraining of a pretrained model
(``init.source`` set, or params handed to ``train``; the demo's arms) gets
:func:`continued_pretraining`, because the from-scratch peak makes a converged model worse before
it makes it better.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import optax

from solarjax.config import ConfigError
from solarjax.families import DECAYS
from solarjax.model import Params

SCHEDULES = ("cosine", "wsd", "constant")

# A model trained from scratch: a high peak after a short warmup, cosine to a tenth.
FROM_SCRATCH = {"lr": 3e-4, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}

# Continued pretraining of a pretrained model, after Gupta et al. 2023 ("Continual Pre-Training of
# Large Language Models: How to (re)warm your model?") and Ibrahim et al. 2024 ("Simple and Scalable
# Strategies to Continually Pre-train Large Language Models"): re-warm linearly (the warmup's length
# matters little: ~1% of the steps, here at least a handful, 4, so a short CPU run does not start at
# its peak), to a peak below the from-scratch one (a lower peak forgets less of what the model
# knows), then cosine-decay to a tenth of the peak. Their small models (~400M) re-warm to 1.5e-4..3e-4
# with million-token batches; the batches used here are 10^2..10^4 tokens, far noisier, so the peak
# is 1e-4, a third of FROM_SCRATCH's (measured: 8 steps of 2 x 64 tokens at it lower the held-out loss
# of SmolLM2-135M and of its 46-layer up-scaling, tests/test_cpt_defaults.py; issue 25's runs at 3e-4 raised it).
# SOLAR's paper does not state its continued-pretraining rate.
CONTINUED_PRETRAINING = {"lr": 1e-4, "warmup_fraction": 0.01, "min_warmup_steps": 4, "max_warmup_steps": 100,
                         "schedule": "cosine", "min_lr_ratio": 0.1}
AUTO_FIELDS = ("lr", "warmup_steps", "schedule", "min_lr_ratio")  # None in config.optim: decided here


def continued_pretraining(total_steps: int) -> dict[str, Any]:
    """The continued-pretraining schedule for a run of ``total_steps``: :data:`CONTINUED_PRETRAINING`'s
    peak, a linear warmup over 1% of the steps (at least ``min_warmup_steps`` but no more than half the
    run, at most ``max_warmup_steps``), cosine to ``min_lr_ratio`` x the peak."""
    c = CONTINUED_PRETRAINING
    warmup = max(c["min_warmup_steps"], round(c["warmup_fraction"] * total_steps))
    warmup = max(1, min(warmup, c["max_warmup_steps"], total_steps // 2))
    return {"lr": c["lr"], "warmup_steps": warmup, "schedule": c["schedule"], "min_lr_ratio": c["min_lr_ratio"]}


def resolve_optim(optim: Mapping[str, Any], total_steps: int, continued: bool) -> dict[str, Any]:
    """``config.optim`` with every :data:`AUTO_FIELDS` entry left None filled in: continued pretraining
    (:func:`continued_pretraining`) when ``continued`` (the run starts from a pretrained model), else
    :data:`FROM_SCRATCH`. Values the config sets are kept."""
    defaults = continued_pretraining(total_steps) if continued else FROM_SCRATCH
    out = dict(optim.items())
    out.update({k: defaults[k] for k in AUTO_FIELDS if out.get(k) is None})
    return out


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

def make_optimizer(optim: Mapping[str, Any], total_steps: int,
                   continued: bool = False) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` from ``config.optim`` (None fields resolved by :func:`resolve_optim`;
    ``continued``: the run starts from a pretrained model); state dtypes follow the (fp32 master) params."""
    optim = resolve_optim(optim, total_steps, continued)
    schedule = make_schedule(optim, total_steps)
    decay_all = bool(optim["decay_norms_and_embeddings"])
    adamw = optax.adamw(
        schedule, b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]),
        weight_decay=float(optim["weight_decay"]), mask=lambda p: weight_decay_mask(p, decay_all),
    )
    clip = float(optim["clip_norm"] or 0.0)
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    return tx, schedule
