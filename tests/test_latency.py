"""``solarjax bench latency`` on a tiny shape: rows for base and up-scaled models, files, one-line errors."""

from __future__ import annotations

import json


def test_bench_latency_tiny(tmp_path, capsys):
    from solarjax.cli import main

    out = tmp_path / "lat"
    argv = ["bench", "latency", "--tiny", "--presets", "smollm2_135m", "--formats", "int8", "--lengths", "16",
            "--new-tokens", "4", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["model"], r["weights"]) for r in rows] == [("smollm2_135m", "int8"), ("smollm2_135m+dus", "int8")]
    base, dus = rows
    assert (base["layers"], dus["layers"]) == (4, 6)  # SOLAR's rule at 4 layers: m = 1, 2 * (4 - 1)
    for r in rows:
        assert r["prefill_ms"]["16"] > 0 and r["decode_ms_per_token"] >= 0
        assert r["peak_memory_mb"] >= r["weight_mb"] > 0  # XLA's accounting includes the weights
    assert base["weight_mb"] < 0.5 * base["params_b"] * 1e9 * 4 / 2**20  # int8 + scales, not fp32
    assert "| smollm2_135m+dus | 6 |" in "\n".join(lines)
    assert {p.name for p in out.iterdir()} >= {"latency.md", "latency.jsonl", "latency.png"}
    assert len((out / "latency.jsonl").read_text().splitlines()) == 2

    assert main([*argv[:-2], "--no-upscale", "--json"]) == 0  # one JSON object, nothing else
    (only,) = capsys.readouterr().out.strip().splitlines()
    assert [r["model"] for r in json.loads(only)["rows"]] == ["smollm2_135m"]

    for bad, message in ((["--formats", "fp8"], "unknown weight format 'fp8'"),
                         (["--lengths", "9000"], "prompt length 9000 exceeds smollm2_135m's context of 8192 tokens")):
        assert main(["bench", "latency", "--tiny", "--presets", "smollm2_135m", *bad]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["bench", "latency", "--tiny", "--presets", "no_such_preset"]) == 1
    assert "no config 'no_such_preset'" in capsys.readouterr().err
