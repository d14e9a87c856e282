"""Depth up-scaling, checked against mergekit's passthrough merge, transformers and numpy.

The expected layer ranges in mergekit recipes are written out literally (not derived from our
plan functions), so mergekit checks both the plan semantics and the slicing.
"""

import json
import os
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open

from conftest import make_hf_model, save_hf_model
from solarjax import ckpt, hf, model, safetensors_io
from solarjax.growth import dus, plans
from solarjax.cli import main
from solarjax.growth.plans import PlanError

TOKENS = np.random.RandomState(0).randint(0, 256, size=(2, 20))  # longer than Mistral's window (8)


# ----------------------------------------------------------------------------- helpers

def mergekit_passthrough(src, out, slices, dtype="float32"):
    """Run mergekit's passthrough merge in-process; ``slices`` are (start, end[, o/down scale])."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = []
    for s in slices:
        source = {"model": str(src), "layer_range": [s[0], s[1]]}
        if len(s) == 3:
            source["parameters"] = {"scale": [{"filter": "o_proj", "value": s[2]},
                                              {"filter": "down_proj", "value": s[2]}, {"value": 1.0}]}
        recipe.append({"sources": [source]})
    config = MergeConfiguration.model_validate({"slices": recipe, "merge_method": "passthrough", "dtype": dtype})
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, clone_tensors=True, write_model_card=False,
                                             quiet=True))
    return out


def tensors(path):
    out = {}
    for file in hf.safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:  # pt: bf16 readable without extras
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def hf_logits(path):
    net = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return net(torch.tensor(TOKENS)).logits.float().numpy()


def run_cli(*args):
    return main(["upscale", *map(str, args), "--no-progress"])


# ----------------------------------------------------------------------------- plans

@pytest.mark.parametrize("spec, n, expected", [
    ("solar:m=8", 32, [(0, 24), (8, 32)]),
    ("solar:m=0", 4, [(0, 4), (0, 4)]),
    ("seam:first_end=20,second_start=4", 32, [(0, 20), (4, 32)]),
    ("repeat:k=3", 4, [(0, 4)] * 3),
    ("middle:start=8,end=24", 32, [(0, 24), (8, 32)]),
    ("interleave:start=1,end=3", 4, [(0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4)]),
    ("llama_pro:new=2", 4, [(0, 2), (1, 2, 0.0), (2, 4), (3, 4, 0.0)]),
    ("llama-pro:new=1", 4, [(0, 4), (3, 4, 0.0)]),
    (" 0:24, 8:32 ", 32, [(0, 24), (8, 32)]),
    ("0:3,1:4*0.5", 4, [(0, 3), (1, 4, 0.5)]),
])
def test_parse_plan_spec(spec, n, expected):
    plan = plans.parse_plan_spec(spec, n)
    assert [tuple(s)[: 3 if s.scale is not None else 2] for s in plan] == expected
    assert plans.parse_plan_spec(plans.format_plan(plan), n) == plan


def test_named_operators():
    assert plans.solar(32, 8) == plans.make_plan([(0, 24), (8, 32)], 32)
    assert len(plans.plan_layers(plans.solar(32, 8))) == 48  # SOLAR 10.7B
    assert plans.solar(6, 0) == plans.repeat(6, 2)
    assert plans.plan_layers(plans.llama_pro(8, 4)) == [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7]
    assert plans.plan_scales(plans.llama_pro(8, 4))[:3] == [None, None, 0.0]
    assert plans.make_plan([[0, 2], (1, 3, 2)], 3) == (plans.Slice(0, 2), plans.Slice(1, 3, 2.0))


@pytest.mark.parametrize("call, message", [
    (lambda: plans.make_plan([], 4), "empty"),
    (lambda: plans.make_plan([(0, 5)], 4), r"\[0, 5\) is out of range"),
    (lambda: plans.make_plan([(2, 2)], 4), "out of range"),
    (lambda: plans.make_plan([(-1, 2)], 4), "out of range"),
    (lambda: plans.make_plan([(0, 2.5)], 4), "integers"),
    (lambda: plans.make_plan([(0, 2, float("nan"))], 4), "finite"),
    (lambda: plans.make_plan([(0,)], 4), "expected"),
    (lambda: plans.solar(32, -1), "non-negative"),
    (lambda: plans.solar(32, 32), "smaller than n=32"),
    (lambda: plans.repeat(4, 0), "k=0"),
    (lambda: plans.middle(4, 3, 2), "start < end"),
    (lambda: plans.llama_pro(32, 5), "must divide n=32"),
    (lambda: plans.parse_plan_spec("", 4), "empty"),
    (lambda: plans.parse_plan_spec("grow:m=1", 4), "unknown plan method 'grow'"),
    (lambda: plans.parse_plan_spec("solar:k=1", 4), "bad argument 'k=1'"),
    (lambda: plans.parse_plan_spec("solar:m=x", 4), "not an integer"),
    (lambda: plans.parse_plan_spec("solar", 4), "needs m=INT"),
    (lambda: plans.parse_plan_spec("0-3", 4), "cannot read range"),
    (lambda: plans.parse_plan_spec("0:3*x", 4), "not a number"),
])
def test_invalid_plans_say_what_and_why(call, message):
    with pytest.raises(PlanError, match=message):
        call()


def test_config_per_layer_lists_are_reindexed():
    hf_cfg = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "dtype": "float32", "sliding_window": 8}
    out = dus.upscaled_hf_config(hf_cfg, plans.parse_plan_spec("0:2,1:3", 3), dtype="bfloat16")
    assert out == {"num_hidden_layers": 4, "layer_types": ["a", "b", "b", "c"], "dtype": "bfloat16",
                   "sliding_window": 8}


# ----------------------------------------------------------------------------- mergekit oracle

CASES = {  # fixture, CLI args, mergekit slices (literal), mergekit dtype
    "llama-solar-m1": ("hf_llama_dir", ["--m", "1"], [(0, 3), (1, 4)], "float32"),
    "mistral-solar-m1-bf16": ("hf_mistral_dir", ["--m", "1", "--dtype", "bfloat16"], [(0, 3), (1, 4)], "bfloat16"),
    "llama-scaled-plan": ("hf_llama_dir", ["--plan", "0:3,1:4*0.5,2:4"], [(0, 3), (1, 4, 0.5), (2, 4)], "float32"),
    "tied-sharded-solar-m1": ("hf_llama_tied_sharded_dir", ["--m", "1", "--max-shard-size", "100KB"],
                              [(0, 3), (1, 4)], "float32"),
}


@pytest.mark.parametrize("case", CASES)
def test_cli_matches_mergekit_passthrough(case, request, tmp_path):
    fixture, args, slices, dtype = CASES[case]
    src = request.getfixturevalue(fixture)
    assert run_cli(src, tmp_path / "ours", *args) == 0
    theirs = mergekit_passthrough(src, tmp_path / "mergekit", slices, dtype)
    ours_t, theirs_t = tensors(tmp_path / "ours"), tensors(theirs)
    assert sorted(ours_t) == sorted(theirs_t)
    for name in theirs_t:
        assert ours_t[name].dtype == theirs_t[name].dtype, name
        assert torch.equal(ours_t[name], theirs_t[name]), name
    ours_cfg, theirs_cfg = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "ours", theirs))
    assert ours_cfg == theirs_cfg  # incl. Mistral's sliding_window, which mergekit copies as is
    np.testing.assert_array_equal(hf_logits(tmp_path / "ours"), hf_logits(theirs))
    if "sharded" in case:
        index = json.loads((tmp_path / "ours" / hf.SAFE_INDEX).read_text())
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(ours_t)


def test_in_memory_upscale_equals_on_disk(hf_llama_dir, tmp_path):
    plan = "0:3,1:4*0.5,2:4"
    dus.upscale_hf(hf_llama_dir, tmp_path / "out", plan)
    cfg, params = hf.load_hf(hf_llama_dir)
    grown, grown_cfg = dus.upscale_params(params, cfg, plan)
    disk_cfg, disk = hf.load_hf(tmp_path / "out")
    assert grown_cfg == disk_cfg and grown_cfg.n_layers == 8
    for path, leaf in jax.tree_util.tree_leaves_with_path(disk):
        mem = grown
        for key in path:
            mem = mem[key.key]
        assert mem.dtype == leaf.dtype and np.array_equal(np.asarray(mem), np.asarray(leaf)), path
    assert grown["embed"] is params["embed"]  # untouched leaves are passed through, not copied


def test_solar_m0_equals_repeat_in_memory(hf_llama_dir):
    cfg, params = hf.load_hf(hf_llama_dir, dtype="bfloat16")
    grown, grown_cfg = dus.upscale_params(params, cfg, plans.solar(cfg.n_layers, 0))
    assert grown_cfg.n_layers == 8
    for name, leaf in params["layers"].items():
        expected = np.concatenate([np.asarray(leaf)] * 2)  # numpy oracle
        assert grown["layers"][name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(grown["layers"][name]), expected)


# ----------------------------------------------------------------------------- LLaMA Pro

def test_llama_pro_preserves_transformers_logits(hf_mistral_dir, tmp_path):
    out = tmp_path / "pro"
    assert run_cli(hf_mistral_dir, out, "--method", "llama-pro", "--new-layers", "2") == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    grown, source = tensors(out), tensors(hf_mistral_dir)
    for new, (old, zero) in enumerate([(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (3, 1)]):
        for suffix in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
            expected = source[f"model.layers.{old}.{suffix}"]
            if zero and ("o_proj" in suffix or "down_proj" in suffix):
                expected = torch.zeros_like(expected)
            assert torch.equal(grown[f"model.layers.{new}.{suffix}"], expected), (new, suffix)
    np.testing.assert_array_equal(hf_logits(out), hf_logits(hf_mistral_dir))


def test_llama_pro_in_memory_keeps_the_function(hf_llama_dir):
    cfg, params = hf.load_hf(hf_llama_dir)
    grown, grown_cfg = dus.upscale_params(params, cfg, "llama_pro:new=4")
    assert grown_cfg.n_layers == 8
    ours = np.asarray(model.forward_jit(grown, jnp.asarray(TOKENS), grown_cfg))
    np.testing.assert_allclose(ours, hf_logits(hf_llama_dir), atol=1e-5)


# ----------------------------------------------------------------------------- sharding

def test_sharded_upscale_stays_on_the_mesh(hf_mistral_dir):
    cfg, params = hf.load_hf(hf_mistral_dir)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    rules = {"layers": "data", "heads": "model", "mlp": "model"}
    shardings = jax.tree.map(lambda axes: NamedSharding(mesh, P(*(rules.get(a) for a in axes))),
                             model.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    sharded = jax.device_put(params, shardings)
    plan = "0:3,1:4*0.5,3:4"  # 7 layers: no longer divisible by the 'data' axis
    with jax.transfer_guard("disallow"):  # no host round trip
        grown, grown_cfg = dus.upscale_params(sharded, cfg, plan)
    single, _ = dus.upscale_params(params, cfg, plan)
    for name, leaf in grown["layers"].items():
        spec = shardings["layers"][name].spec
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == P(None, *spec[1:]), name
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(single["layers"][name]))
    with jax.transfer_guard("disallow"):
        even, _ = dus.upscale_params(sharded, cfg, "solar:m=1")  # 6 layers: 'data' sharding kept
    assert even["layers"]["wq"].sharding.spec == P("data", None, "model", None)
    wq = np.asarray(params["layers"]["wq"])
    np.testing.assert_array_equal(np.asarray(even["layers"]["wq"]), np.concatenate([wq[0:3], wq[1:4]]))


# ----------------------------------------------------------------------------- streaming

@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """8 layers of 1 MiB matrices (~32 MB): large enough that holding the model would show."""
    net = make_hf_model("llama", seed=3, hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    return save_hf_model(net, tmp_path_factory.mktemp("hf") / "wide")


@pytest.mark.parametrize("plan, kernel_copy", [("solar:m=2", True), ("solar:m=2", False), ("0:6,2:8*0.5", True)])
def test_streaming_holds_about_one_tensor(wide_llama_dir, tmp_path, monkeypatch, plan, kernel_copy):
    if not kernel_copy:  # the portable fallback: one bounded read buffer
        monkeypatch.delattr(os, "copy_file_range")
    largest = 256 * 1024 * 4
    tracemalloc.start()
    try:
        dus.upscale_hf(wide_llama_dir, tmp_path / "out", plan, chunk_bytes=256 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert total > 40 * largest and peak < 4 * largest, (peak, total)
    cfg, params = hf.load_hf(wide_llama_dir)
    grown, _ = dus.upscale_params(params, cfg, plan)
    _, disk = hf.load_hf(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(disk["layers"]["w_down"]), np.asarray(grown["layers"]["w_down"]))


# ----------------------------------------------------------------------------- CLI behaviour

def test_tokenizer_files_copied(hf_llama_dir, tmp_path):
    src = shutil.copytree(hf_llama_dir, tmp_path / "src")
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    assert run_cli(src, tmp_path / "out", "--plan", "repeat:k=2") == 0
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name]


def test_cli_errors_leave_no_output(hf_llama_dir, tmp_path, capsys, monkeypatch):
    assert run_cli(hf_llama_dir, tmp_path / "a", "--m", "4") == 1
    assert "m=4 must be smaller than n=4" in capsys.readouterr().err
    assert run_cli(hf_llama_dir, tmp_path / "a", "--plan", "0:9") == 1
    assert run_cli(hf_llama_dir, tmp_path / "a", "--method", "llama-pro") == 1
    assert "--new-layers" in capsys.readouterr().err
    broken = shutil.copytree(hf_llama_dir, tmp_path / "broken")
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)
    assert run_cli(broken, tmp_path / "a", "--m", "1") == 1
    assert "truncated" in capsys.readouterr().err
    calls = []

    def fail_second(*args, **kwargs):  # crash after the first shard is on disk
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_shard(*args, **kwargs)

    write_shard = safetensors_io.write_shard
    monkeypatch.setattr(safetensors_io, "write_shard", fail_second)
    assert run_cli(hf_llama_dir, tmp_path / "a", "--m", "1", "--max-shard-size", "50KB") == 1
    assert "disk full" in capsys.readouterr().err  # one line (tests/test_os_errors.py makes real faults)
    assert len(calls) == 2 and _leftovers(tmp_path, "a") == []


def test_orbax_format(hf_llama_dir, tmp_path):
    cfg, params = hf.load_hf(hf_llama_dir)
    ckpt.save_params(tmp_path / "ckpt", params, cfg)
    assert run_cli(tmp_path / "ckpt", tmp_path / "grown", "--m", "1", "--dtype", "bf16") == 0
    grown_cfg, grown = ckpt.load_params(tmp_path / "grown")
    assert grown_cfg.n_layers == 6 and grown_cfg.param_dtype == "bfloat16"
    for name, leaf in params["layers"].items():
        expected = np.concatenate([np.asarray(leaf)[0:3], np.asarray(leaf)[1:4]]).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(grown["layers"][name]), expected)
    assert run_cli(tmp_path / "ckpt", tmp_path / "bad", "--format", "orbax", "--m", "7") == 1
    assert not (tmp_path / "bad").exists()


def test_small_scaled_tensors_between_copied_ones(tmp_path):
    """Decoded writes (scale) smaller than any I/O buffer must land before the next byte copy."""
    src = save_hf_model(make_hf_model("llama", seed=4, hidden_size=32, intermediate_size=32, num_attention_heads=2,
                                      num_key_value_heads=1), tmp_path / "small")
    plan = "0:3*0.25,1:4"
    dus.upscale_hf(src, tmp_path / "out", plan)
    cfg, params = hf.load_hf(src)
    grown, _ = dus.upscale_params(params, cfg, plan)
    _, disk = hf.load_hf(tmp_path / "out")
    for name, leaf in grown["layers"].items():
        np.testing.assert_array_equal(np.asarray(disk["layers"][name]), np.asarray(leaf), err_msg=name)


@pytest.mark.parametrize("record,layers", [
    (plans.Solar(m=2), [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]),  # SOLAR: [0, n - m) + [m, n)
    (plans.Seam(first_end=6, second_start=4), [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]),
    (plans.Repeat(k=2), list(range(8)) * 2),
    (plans.Middle(start=3, end=5), [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]),
    (plans.Interleave(start=6, k=2), [0, 1, 2, 3, 4, 5, 6, 6, 7, 7]),
    (plans.LlamaPro(new=2), [0, 1, 2, 3, 3, 4, 5, 6, 7, 7]),
    (plans.Ranges(((0, 6), (4, 6, 0.5), (6, 8))), [0, 1, 2, 3, 4, 5, 4, 5, 6, 7]),
])
def test_typed_plan_steps_round_trip_through_their_spec(record, layers):
    """Each operator's record is its spec string and its plan: the string parses back to the record,
    and the plan stacks the layers the operator's definition lists (written out for n = 8)."""
    assert plans.parse_plan_step(record.spec()) == record
    assert plans.plan_layers(record.plan(8)) == layers == plans.plan_layers(plans.parse_plan_spec(record.spec(), 8))
    assert type(record) is plans.Ranges or plans.OPERATORS[record.NAME] is type(record)
