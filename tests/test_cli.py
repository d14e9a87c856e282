"""The command line as a user drives it: convert both ways, info, and clean errors."""

import json

import numpy as np
import torch
import transformers

from solarjax.cli import main


def test_convert_round_trip_loads_in_transformers(hf_mistral_dir, tmp_path, capsys):
    orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
    assert main(["convert", "hf-to-orbax", str(hf_mistral_dir), str(orbax_dir)]) == 0
    assert main(["convert", "orbax-to-hf", str(orbax_dir), str(hf_dir), "--source-dir", str(hf_mistral_dir)]) == 0
    tokens = torch.tensor(np.random.RandomState(0).randint(0, 256, (1, 20)))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(hf_mistral_dir).eval()(tokens).logits
        out = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
    assert torch.equal(ref, out)  # fp32 in, fp32 out, same weights: bit-identical
    assert main(["info", str(hf_dir), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert facts["architecture"] == "mistral" and facts["sliding_window"] == 8 and facts["layers"] == 4


def test_errors_are_one_clean_line(tmp_path, capsys):
    assert main(["convert", "hf-to-orbax", str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no config.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_one_convention_model_in_out_out(hf_llama_dir, tmp_path, capsys):
    """--model/--out on the model verbs (positionals still accepted), --json results, shared training flags."""
    out = tmp_path / "grown"
    assert main(["upscale", "--model", str(hf_llama_dir), "--out", str(out), "--m", "1", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["layers_in"], result["layers_out"]) == (4, 6)  # SOLAR m=1 on 4 layers: 2 * (4 - 1)
    assert main(["info", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"] == 6
    for argv, message in ((["upscale", "--out", str(tmp_path / "x"), "--m", "1"], "--model is required"),
                          (["upscale", str(hf_llama_dir), "--model", str(hf_llama_dir), "--out", str(tmp_path / "x"),
                            "--m", "1"], "not both"),
                          (["eval", "mmlu", "--model", str(hf_llama_dir), "--limit", "-1"], "0 (no limit)")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    from solarjax.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb in ("train", "sft", "dpo"):
        flags = {s for a in verbs[verb]._actions for s in a.option_strings}
        assert {"--config", "--data", "--init", "--steps", "--out", "--no-progress", "--json"} <= flags, verb


def test_verbs_import_neither_the_cli_nor_each_other():
    """Shared flags live in solarjax/commands/_flags.py; a verb module imports no other verb."""
    import ast
    from pathlib import Path

    import solarjax.commands

    for path in Path(solarjax.commands.__path__[0]).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module != "solarjax.cli", path
                assert not node.module.startswith("solarjax.commands.") or node.module == "solarjax.commands._flags", \
                    (path, node.module)


def test_research_verbs_follow_the_convention(tmp_path, capsys, monkeypatch):
    """demo, ablate and study: --out, --no-progress, --json; demo and ablate read --model (--base still
    works, hidden from --help) and count MMLU questions as eval counts a limit: 0 is all of them."""
    import pytest

    from solarjax import eval as ev
    from solarjax import research
    from solarjax.cli import build_parser
    from solarjax.commands._flags import budget_from_args, paths

    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb in ("demo", "ablate", "study"):
        flags = {s for a in verbs[verb]._actions for s in a.option_strings}
        assert {"--out", "--no-progress", "--json"} <= flags, verb
    for verb in ("demo", "ablate"):
        assert "--model" in verbs[verb].format_help() and "--base" not in verbs[verb].format_help()
        assert paths(verbs[verb].parse_args(["--base", "old"])).model == "old"
        assert paths(verbs[verb].parse_args([])).model is None  # the default model
        with pytest.raises(ValueError, match="--model or --base"):
            paths(verbs[verb].parse_args(["--model", "a", "--base", "b"]))

    asked = []  # the limit each MMLU evaluation is given (None: every question)
    monkeypatch.setattr(ev, "mmlu_accuracy", lambda *a, limit=None, **k: asked.append(limit) or "scored")
    for argv, limits in ((["--mmlu-questions", "0"], [None]), (["--mmlu-questions", "5"], [5]), (["--no-mmlu"], [])):
        asked.clear()
        budget = budget_from_args(verbs["demo"].parse_args(argv))
        assert research._mmlu(None, None, None, budget) == ("scored" if limits else None) and asked == limits
    assert main(["ablate", "--m", "1", "--mmlu-questions", "-1", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "--mmlu-questions must be 0 (no limit)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
