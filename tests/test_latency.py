"""``solarjax bench latency`` on a tiny shape: rows for base and up-scaled models, files, one-line errors.

Parameter counts and weight bytes are checked against the shape's formula; the reported prefill and
decode figures against the timings the run took (decode ms/token = (t(N) - t(1)) / (N - 1))."""

from __future__ import annotations

import json

import pytest

# --tiny's smollm2_135m: d 64, 4 heads of 16, 1 KV head (4 heads do not divide SmolLM2's 3), ffn 128,
# vocab 256, tied embeddings, RMSNorm weights only.
D, H, KV, HD, FFN, VOCAB = 64, 4, 1, 16, 128, 256
LAYER_MATRICES = {"wq": (D, H * HD), "wk": (D, KV * HD), "wv": (D, KV * HD), "wo": (H * HD, D),
                  "w_gate": (D, FFN), "w_up": (D, FFN), "w_down": (FFN, D)}  # (contracted, output columns)


def tiny_counts(layers: int) -> tuple[int, int]:
    """(parameters, int8 bytes: int8 values + one fp32 scale per output column + fp32 norms)."""
    matrices = layers * sum(a * b for a, b in LAYER_MATRICES.values()) + VOCAB * D
    scales = layers * sum(b for _, b in LAYER_MATRICES.values()) + VOCAB  # embed: one scale per token row
    norms = layers * 2 * D + D
    return matrices + norms, matrices + 4 * (scales + norms)


def test_bench_latency_tiny(tmp_path, capsys, monkeypatch):
    from solarjax import latency
    from solarjax.cli import main

    timings: list[float] = []
    best_ms = latency._best_ms

    def recorded(fn, repeats):
        timings.append(best_ms(fn, repeats))
        return timings[-1]

    monkeypatch.setattr(latency, "_best_ms", recorded)

    out = tmp_path / "lat"
    argv = ["bench", "latency", "--tiny", "--presets", "smollm2_135m", "--formats", "int8", "--lengths", "16",
            "--new-tokens", "4", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["model"], r["weights"]) for r in rows] == [("smollm2_135m", "int8"), ("smollm2_135m+dus", "int8")]
    base, dus = rows
    assert (base["layers"], dus["layers"]) == (4, 6)  # SOLAR's rule at 4 layers: m = 1, 2 * (4 - 1)
    assert len(timings) == 6  # per row: prefill at 16, generate 1 token, generate 4 tokens
    for r, (prefill, one, many) in zip(rows, (timings[:3], timings[3:])):
        assert r["prefill_ms"] == {"16": prefill} and prefill > 0
        assert r["decode_ms_per_token"] == pytest.approx(max(many - one, 0.0) / 3)
        params, int8_bytes = tiny_counts(r["layers"])
        assert r["params_b"] * 1e9 == pytest.approx(params)
        assert r["weight_mb"] * 2**20 == pytest.approx(int8_bytes)
        assert r["peak_memory_mb"] >= r["weight_mb"]  # XLA's accounting includes the weights
    assert "| smollm2_135m+dus | 6 |" in "\n".join(lines)
    assert {p.name for p in out.iterdir()} >= {"latency.md", "latency.jsonl", "latency.png"}
    assert len((out / "latency.jsonl").read_text().splitlines()) == 2

    fp32 = [*argv[:5], "--formats", "float32", *argv[7:-2]]
    assert main([*fp32, "--no-upscale", "--json"]) == 0  # one JSON object, nothing else
    (only,) = capsys.readouterr().out.strip().splitlines()
    (row,) = json.loads(only)["rows"]
    assert (row["model"], row["weights"]) == ("smollm2_135m", "float32")
    assert row["weight_mb"] * 2**20 == pytest.approx(4 * tiny_counts(4)[0])

    for bad, message in ((["--formats", "fp8"], "unknown weight format 'fp8'"),
                         (["--lengths", "9000"], "prompt length 9000 exceeds smollm2_135m's context of 8192 tokens")):
        assert main(["bench", "latency", "--tiny", "--presets", "smollm2_135m", *bad]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert main(["bench", "latency", "--tiny", "--presets", "no_such_preset"]) == 1
    assert "no config 'no_such_preset'" in capsys.readouterr().err
