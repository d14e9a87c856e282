"""Merging: our linear / SLERP / task arithmetic / TIES equal mergekit's on tiny random models.

mergekit (from PyPI, run in-process and offline) is the oracle. Inputs are a random base and
two "fine-tunes" (base + noise), so task vectors are small as in real merges, and the norm
weights are nearly parallel, which exercises SLERP's lerp fallback as well as its slerp branch.
"""

from __future__ import annotations

import copy
import json

import ml_dtypes  # noqa: F401  (numpy bfloat16, for safetensors)
import numpy as np
import pytest
import yaml
from conftest import make_hf_model, save_hf_model
from safetensors.numpy import load_file

from solarjax.merge import MergeError, merge_checkpoints, merge_params

ATOL = 2e-6  # fp32: different summation orders only

# name -> recipe; "{base}", "{ft1}", "{ft2}" are filled with model directories
RECIPES = {
    "linear": """
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {ft1}
    parameters: {{weight: [0.1, 0.9]}}   # gradient over layers
  - model: {ft2}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: float32
""",
    "linear_unnormalized": """
models:
  - model: {ft1}
    parameters: {{weight: 0.7}}
  - model: {ft2}
    parameters: {{weight: 0.6}}
merge_method: linear
parameters: {{normalize: false}}
dtype: float32
""",
    # bf16 output: both compute in fp32 and round once, so at most one bf16 ulp apart
    "linear_bf16": """
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: bfloat16
""",
    "slerp": """
models:
  - model: {base}
  - model: {ft1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.35
dtype: float32
""",
    "task_arithmetic": """
models:
  - model: {ft1}
    parameters: {{weight: 0.6}}
  - model: {ft2}
    parameters: {{weight: [0.2, 0.8]}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 0.9}}
dtype: float32
""",
    "ties": """
models:
  - model: {base}
  - model: {ft1}
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {ft2}
    parameters: {{density: [0.3, 0.8], weight: 0.5}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true}}
dtype: float32
""",
    # DARE with density 1 keeps every delta: deterministic, so it checks the dare_ties plumbing
    "dare_ties_dense": """
models:
  - model: {ft1}
    parameters: {{density: 1.0, weight: 0.7}}
  - model: {ft2}
    parameters: {{density: 1.0, weight: 0.4}}
merge_method: dare_ties
base_model: {base}
dtype: float32
""",
}


def _finetune(model, seed: int, scale: float = 0.01):
    import torch

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


@pytest.fixture(scope="session")
def merge_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_models")
    base = make_hf_model("llama", seed=3)
    dirs = {"base": save_hf_model(base, root / "base")}
    for i, seed in ((1, 101), (2, 102)):
        dirs[f"ft{i}"] = save_hf_model(_finetune(base, seed), root / f"ft{i}")
    return dirs


@pytest.fixture(scope="session")
def recipes(merge_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_recipes")
    paths = {}
    for name, text in RECIPES.items():
        paths[name] = root / f"{name}.yml"
        paths[name].write_text(text.format(**merge_models))
    return paths


@pytest.fixture(scope="session")
def mergekit_outputs(recipes, tmp_path_factory):
    """Every recipe run once by mergekit's own Python API (one import, no subprocess)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    root = tmp_path_factory.mktemp("mergekit_out")
    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0)
    outs = {}
    for name, path in recipes.items():
        config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
        run_merge(config, str(root / name), options)
        outs[name] = root / name
    return outs


@pytest.fixture(scope="session")
def our_outputs(recipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("solarjax_merge_out")
    return {name: merge_checkpoints(path, root / name) for name, path in recipes.items()}


def _tensors(path) -> dict[str, np.ndarray]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("name", list(RECIPES))
def test_matches_mergekit(name, mergekit_outputs, our_outputs, merge_models):
    ours, theirs = _tensors(our_outputs[name]), _tensors(mergekit_outputs[name])
    assert sorted(ours) == sorted(theirs)
    base = _tensors(merge_models["base"])
    dtype = "bfloat16" if name.endswith("bf16") else "float32"
    rtol = 2**-7 if dtype == "bfloat16" else 0
    for key in theirs:
        assert ours[key].dtype.name == theirs[key].dtype.name == dtype, key
        np.testing.assert_allclose(ours[key].astype(np.float32), theirs[key].astype(np.float32), rtol=rtol,
                                   atol=ATOL, err_msg=f"{name}: {key}")
    # not a trivial merge (SLERP's gradients reach t=0, i.e. the base, at some layers)
    changed = [not np.array_equal(ours[k], base[k]) for k in theirs]
    assert np.mean(changed) > 0.75
    config = json.loads((our_outputs[name] / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["torch_dtype"] == dtype


def test_slerp_uses_both_branches(merge_models, our_outputs):
    """Sanity of the fixture: norms are near-parallel (lerp), projections are not (slerp)."""
    base, ft1 = _tensors(merge_models["base"]), _tensors(merge_models["ft1"])

    def cos(name):
        a, b = base[name].ravel().astype(np.float64), ft1[name].ravel().astype(np.float64)
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    assert cos("model.norm.weight") > 0.9995
    assert cos("model.layers.1.self_attn.q_proj.weight") < 0.99


@pytest.fixture(scope="session")
def loaded(merge_models):
    from solarjax.hf import load_hf

    return {k: load_hf(v) for k, v in merge_models.items()}


def _load_params(path):
    from solarjax.hf import load_hf

    return load_hf(path)[1]


@pytest.mark.parametrize("name", ["linear", "slerp", "ties"])
def test_params_pytree_equals_mergekit(name, loaded, mergekit_outputs):
    """The in-memory API on stacked layers gives mergekit's per-tensor result for every layer."""
    import jax

    p = {k: v[1] for k, v in loaded.items()}
    if name == "linear":
        merged = merge_params("linear", [p["base"], p["ft1"], p["ft2"]], weights=[0.2, [0.1, 0.9], 0.5])
    elif name == "slerp":
        t = yaml.safe_load(RECIPES["slerp"].format(base="b", ft1="f"))["parameters"]["t"]
        merged = merge_params("slerp", [p["ft1"]], base=p["base"], t=t)
    else:
        merged = merge_params("ties", [p["ft1"], p["ft2"]], weights=[1.0, 0.5], base=p["base"],
                              model_parameters=[{"density": 0.5}, {"density": [0.3, 0.8]}], normalize=True)
    expected = _load_params(mergekit_outputs[name])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))


def test_dare_statistics(merge_models, tmp_path):
    """DARE is random: check the kept fraction, the L1 rescaling, and seed reproducibility."""
    recipe = {
        "models": [{"model": str(merge_models["ft1"]), "parameters": {"weight": 1.0, "density": 0.3}}],
        "merge_method": "dare_linear", "base_model": str(merge_models["base"]), "dtype": "float32",
    }
    path = tmp_path / "dare.yml"
    path.write_text(yaml.safe_dump(recipe))
    first, again, other = (_tensors(merge_checkpoints(path, tmp_path / f"out{seed}_{i}", seed=seed))
                           for i, seed in enumerate((0, 0, 1)))
    base, ft1 = _tensors(merge_models["base"]), _tensors(merge_models["ft1"])
    name = "model.layers.2.mlp.up_proj.weight"  # 8192 entries
    delta, got = ft1[name] - base[name], first[name] - base[name]
    kept = first[name] != base[name]
    assert abs(kept.mean() - 0.3) < 0.03
    # mergekit rescales the surviving deltas so the task vector keeps its L1 norm (about 1/density)
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(delta).sum(), rtol=1e-4)
    scale = got[kept] / delta[kept]
    np.testing.assert_allclose(scale, np.abs(delta).sum() / np.abs(delta[kept]).sum(), rtol=1e-3)
    assert 2.5 < scale.mean() < 4.2
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first[name], other[name])


def test_orbax_input_equals_hf(merge_models, loaded, our_outputs, tmp_path):
    from solarjax.ckpt import save_params

    cfg, params = loaded["ft2"]
    save_params(tmp_path / "ft2_orbax", params, cfg)
    text = RECIPES["linear_unnormalized"].format(**{**merge_models, "ft2": tmp_path / "ft2_orbax"})
    (tmp_path / "r.yml").write_text(text)
    ours = _tensors(merge_checkpoints(tmp_path / "r.yml", tmp_path / "out"))
    want = _tensors(our_outputs["linear_unnormalized"])
    assert sorted(ours) == sorted(want)
    for key in want:
        np.testing.assert_allclose(ours[key], want[key], rtol=0, atol=ATOL, err_msg=key)


def test_orbax_output(recipes, our_outputs, tmp_path):
    from solarjax.ckpt import load_params
    from solarjax.hf import load_hf

    out = merge_checkpoints(recipes["ties"], tmp_path / "orbax", out_format="orbax")
    cfg, got = load_params(out)
    want_cfg, want = load_hf(our_outputs["ties"])
    assert cfg == want_cfg
    for a, b in zip(jax_leaves(got), jax_leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merge-")]


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_cli(recipes, our_outputs, tmp_path, capsys):
    from solarjax.cli import main

    out = tmp_path / "cli_out"
    assert main(["merge", str(recipes["task_arithmetic"]), str(out), "--no-progress"]) == 0
    ours, want = _tensors(out), _tensors(our_outputs["task_arithmetic"])
    assert all(np.array_equal(ours[k], want[k]) for k in want)
    assert (out / "merge_recipe.yml").is_file()
    assert main(["merge", str(recipes["task_arithmetic"]), str(out), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", str(recipes["task_arithmetic"]), str(out), "--overwrite", "--no-progress"]) == 0


# ----------------------------------------------------------------------------- bad input


def _write(tmp_path, recipe: dict, name="bad.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def big_vocab_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama", seed=4, vocab_size=300), tmp_path_factory.mktemp("merge_bad") / "v300")


def test_shape_mismatch_names_tensor_and_shapes(merge_models, big_vocab_dir, tmp_path):
    recipe = {"models": [{"model": str(merge_models["ft1"]), "parameters": {"weight": 0.5}},
                         {"model": str(big_vocab_dir), "parameters": {"weight": 0.5}}],
              "merge_method": "linear"}
    with pytest.raises(MergeError, match=r"tensor .(model\.embed_tokens|lm_head)\.weight.*\(256, 64\).*\(300, 64\)"):
        merge_checkpoints(_write(tmp_path, recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"merge_method": "frankenmerge"}, r"unknown merge_method 'frankenmerge'.*linear"),
    ({"models": [{"model": "/nonexistent/model", "parameters": {"weight": 1.0}}]}, r"models\[0\]\.model.*/nonexistent/model.*does not exist"),
    ({"merge_method": "slerp", "base_model": "{base}", "parameters": {"t": 0.5}}, r"slerp merges exactly 2 models.*gives 3"),
    ({"merge_method": "ties"}, r"ties.*needs base_model"),
    ({"models": [{"model": "{ft1}", "parameters": {"weight": 1.0}}, {"model": "{ft2}"}]}, r"missing parameter 'weight' for .*ft2"),
    ({"slices": []}, r"'slices' recipes are not supported"),
])
def test_bad_recipes(change, message, merge_models, tmp_path):
    recipe = {"models": [{"model": "{ft1}", "parameters": {"weight": 1.0}},
                         {"model": "{ft2}", "parameters": {"weight": 1.0}}],
              "merge_method": "linear"}
    recipe.update(change)
    text = yaml.safe_dump(recipe).replace("'{", "{").replace("}'", "}").format(**merge_models)
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(MergeError, match=message):
        merge_checkpoints(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_output_equal_to_input(merge_models, recipes):
    from solarjax.outputs import OutputError

    with pytest.raises(OutputError, match="is the source"):
        merge_checkpoints(recipes["linear"], merge_models["ft1"], overwrite=True)
    assert (merge_models["ft1"] / "model.safetensors").is_file()


def test_params_mismatch(loaded):
    p = {k: v[1] for k, v in loaded.items()}
    bad = {**p["ft1"], "embed": p["ft1"]["embed"][:100]}
    with pytest.raises(MergeError, match=r"param embed: models\[1\] has shape \(100, 64\), expected \(256, 64\)"):
        merge_params("linear", [p["ft2"], bad])
    with pytest.raises(MergeError, match="needs a base"):
        merge_params("ties", [p["ft1"]])


MOE_RECIPES = {
    "linear": """
models:
  - model: {ft1}
    parameters: {{weight: [0.1, 0.9]}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: float32
""",
    "slerp": """
models:
  - model: {base}
  - model: {ft1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.7]
    - filter: experts
      value: [0.9, 0.4]
    - value: 0.35
dtype: float32
""",
    "ties": """
models:
  - model: {ft1}
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {ft2}
    parameters: {{density: [0.3, 0.8], weight: 0.5}}
merge_method: ties
base_model: {base}
parameters: {{normalize: true}}
dtype: float32
""",
}


def _mergekit_expert_tensors(out_dir, n_layers: int, n_experts: int) -> dict[str, np.ndarray]:
    """mergekit writes Mixtral's experts fused as transformers 5 holds them in memory
    (``mlp.experts.gate_up_proj`` (E, 2f, d) = [w1; w3], ``down_proj`` (E, d, f) = w2): unfused
    to the per-expert names of the checkpoints (and of solarjax's export)."""
    fused, out = _tensors(out_dir), {}
    for i in range(n_layers):
        experts = f"model.layers.{i}.mlp.experts"
        gate_up, down = fused[f"{experts}.gate_up_proj"], fused[f"{experts}.down_proj"]
        for e in range(n_experts):
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            w1, w3 = np.split(gate_up[e], 2)
            out.update({f"{prefix}.w1.weight": w1, f"{prefix}.w3.weight": w3, f"{prefix}.w2.weight": down[e]})
        out[f"model.layers.{i}.block_sparse_moe.gate.weight"] = fused[f"model.layers.{i}.mlp.gate.weight"]
    return out


def _mergekit_per_tensor(name: str, recipe: dict, tensors: dict[str, np.ndarray], n_layers: int) -> np.ndarray:
    """mergekit's own SLERP / TIES functions on one HF tensor (sparsify, sign consensus, normalise)."""
    import torch
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.merge_methods.slerp import slerp
    from mergekit.sparsify import SparsificationMethod, sparsify

    from solarjax.merge import layer_fraction, resolve

    t_layer = layer_fraction(name, n_layers)
    base = torch.tensor(tensors["base"])
    if recipe["merge_method"] == "slerp":
        t = resolve("t", None, [recipe["parameters"]], name, t_layer)
        return slerp(torch.tensor([t]), base[None], torch.tensor(tensors["ft1"])[None])[0].numpy()
    deltas, weights = [], []
    for entry, key in zip(recipe["models"], ("ft1", "ft2")):
        params = entry["parameters"]
        density = resolve("density", None, [params], name, t_layer)
        weights.append(resolve("weight", None, [params], name, t_layer))
        deltas.append(sparsify(torch.tensor(tensors[key]) - base, density, SparsificationMethod.magnitude))
    w = torch.tensor(weights).reshape(-1, *[1] * base.ndim)
    deltas = torch.stack(deltas) * w
    mask = get_mask(deltas, "sum")
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return (base + (deltas * mask).sum(0) / divisor).numpy()


@pytest.mark.parametrize("name", list(MOE_RECIPES))
def test_mixture_of_experts_merges_per_expert_tensor(name, tmp_path):
    """Two Mixtral fine-tunes of one base, on disk and in memory (each expert of a stacked
    (L, E, ...) leaf is its own tensor, as in the checkpoint). Oracles: mergekit's own merge for
    linear; for SLERP and TIES mergekit's functions on each per-expert tensor (mergekit's Mixtral
    architecture merges transformers 5's fused expert stacks, so its SLERP norms and TIES top-k
    span all experts of a layer, gate and up together: a different merge)."""
    import jax
    import torch
    import transformers
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from solarjax.hf import load_hf

    torch.manual_seed(5)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    base = transformers.MixtralForCausalLM(config).eval()
    dirs = {"base": save_hf_model(base, tmp_path / "base")}
    for i, seed in ((1, 201), (2, 202)):
        dirs[f"ft{i}"] = save_hf_model(_finetune(base, seed), tmp_path / f"ft{i}")
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(MOE_RECIPES[name].format(**dirs))
    recipe = yaml.safe_load(recipe_path.read_text())
    ours = _tensors(merge_checkpoints(recipe_path, tmp_path / "ours"))
    inputs = {k: _tensors(d) for k, d in dirs.items()}
    assert sorted(ours) == sorted(inputs["base"])
    if name == "linear":
        run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mergekit"),
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0))
        theirs = {**_tensors(tmp_path / "mergekit"), **_mergekit_expert_tensors(tmp_path / "mergekit", 2, 3)}
        for key in ours:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=ATOL, err_msg=key)
    else:
        for key in (k for k in ours if ".experts." in k or "self_attn.q" in k):
            expected = _mergekit_per_tensor(key, recipe, {k: v[key] for k, v in inputs.items()}, n_layers=2)
            np.testing.assert_allclose(ours[key], expected, rtol=0, atol=ATOL, err_msg=key)

    p = {k: load_hf(d)[1] for k, d in dirs.items()}
    models = [p["ft1"], p["ft2"]] if name != "slerp" else [p["ft1"]]
    base_params = None if name == "linear" else p["base"]
    kwargs = recipe.get("parameters", {})
    merged = merge_params(name, models, base=base_params, arch="mixtral",
                          model_parameters=[m["parameters"] for m in recipe["models"] if "parameters" in m]
                          if name != "slerp" else None, **kwargs)
    cfg, expected = load_hf(tmp_path / "ours")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
