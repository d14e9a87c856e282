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
