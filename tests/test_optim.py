"""optim against its formulas: schedules computed in NumPy, the decay mask against every family's
``Param.decay`` records, and one optimizer step against AdamW written out in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solarjax import families, model
from solarjax.config import ConfigError, base_config, preset
from solarjax.optim import (CONTINUED_PRETRAINING, FROM_SCRATCH, continued_pretraining, make_optimizer,
                            make_schedule, resolve_optim, weight_decay_mask)

OPTIM = dict(base_config().optim.to_dict(), lr=2e-3, warmup_steps=7, min_lr_ratio=0.1, decay_fraction=0.25)
TOTAL = 40


def formula(name: str, step: int) -> float:
    """The documented schedules: linear warmup, then cosine / stable + linear decay / constant."""
    lr, warmup, end = OPTIM["lr"], OPTIM["warmup_steps"], OPTIM["lr"] * OPTIM["min_lr_ratio"]
    if step < warmup:
        return lr * step / warmup
    if name == "constant":
        return lr
    if name == "cosine":
        t = min(step - warmup, TOTAL - warmup) / (TOTAL - warmup)
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))
    decay = round(OPTIM["decay_fraction"] * TOTAL)
    start = TOTAL - decay
    return lr if step < start else lr + (end - lr) * min(step - start, decay) / decay


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_schedule_equals_formula(name):
    schedule = make_schedule(dict(OPTIM, schedule=name), TOTAL)
    steps = np.arange(TOTAL + 3)
    np.testing.assert_allclose([float(schedule(s)) for s in steps], [formula(name, s) for s in steps],
                               rtol=1e-5, atol=1e-9)


def test_schedule_refusals():
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        make_schedule(dict(OPTIM, schedule="linear"), TOTAL)
    with pytest.raises(ConfigError, match="warmup_steps=-1"):
        make_schedule(dict(OPTIM, schedule="cosine", warmup_steps=-1), TOTAL)


@pytest.mark.parametrize("total, warmup", [(8, 4), (50, 4), (1000, 10), (100_000, 100), (3, 1)])
def test_continued_pretraining_warmup(total, warmup):
    c = CONTINUED_PRETRAINING
    assert continued_pretraining(total) == {"lr": c["lr"], "warmup_steps": warmup, "schedule": "cosine",
                                            "min_lr_ratio": c["min_lr_ratio"]}


def test_resolve_optim_fills_only_what_is_unset():
    unset = dict(OPTIM, lr=None, warmup_steps=None, schedule=None, min_lr_ratio=None)
    assert {k: resolve_optim(unset, 100, continued=False)[k] for k in FROM_SCRATCH} == FROM_SCRATCH
    kept = resolve_optim(dict(unset, lr=5e-5, schedule="wsd"), 1000, continued=True)
    assert (kept["lr"], kept["schedule"], kept["warmup_steps"], kept["min_lr_ratio"]) == (5e-5, "wsd", 10, 0.1)


@pytest.mark.parametrize("arch", sorted(families.FAMILIES))
def test_decay_mask_follows_each_family_spec(arch):
    family = families.get(arch)
    cfg = preset("tiny_moe" if family.moe else "tiny", arch=arch, tie_embeddings=False)
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    mask = weight_decay_mask(shapes)
    declared = {p.name: p.decay for p in family.layer_params + family.global_params}
    for path, decays in jax.tree_util.tree_leaves_with_path(mask):
        name = path[-1].key
        assert decays == declared[name] == families.DECAYS[name], (arch, name)
    assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
    assert all(jax.tree.leaves(weight_decay_mask(shapes, decay_norms_and_embeddings=True)))


def test_one_step_equals_numpy_adamw():
    """Clip by global norm, then AdamW with decoupled, masked weight decay: step 1 at lr = schedule(0)."""
    cfg = preset("tiny")
    params = model.init_params(jax.random.key(1), cfg)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape) * 3.0, params)
    optim = dict(OPTIM, schedule="constant", warmup_steps=0, clip_norm=1.0, weight_decay=0.1)
    tx, schedule = make_optimizer(optim, TOTAL)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree.map(jnp.add, params, updates)

    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    scale = min(1.0, optim["clip_norm"] / norm)
    lr, b1, b2, eps = float(schedule(0)), optim["b1"], optim["b2"], optim["eps"]
    mask = weight_decay_mask(params)
    for p, g, n, decays in zip(*(jax.tree.leaves(t) for t in (params, grads, new, mask))):
        p, g = np.asarray(p, np.float64), np.asarray(g, np.float64) * scale
        m_hat, v_hat = (1 - b1) * g / (1 - b1), (1 - b2) * g**2 / (1 - b2)
        want = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + (optim["weight_decay"] * p if decays else 0.0))
        np.testing.assert_allclose(np.asarray(n), want, rtol=1e-5, atol=1e-7)
