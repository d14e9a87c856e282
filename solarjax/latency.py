"""Inference latency and memory across model shapes, depth up-scaling and weight formats.

The small-model survey's table, for the presets in ``configs/``: prefill milliseconds at several
prompt lengths, decode milliseconds per token, and peak memory, for each base model and its
SOLAR-style up-scaled version (m = n // 4 layers dropped at the seam, SOLAR's 32 -> 48 rule), in
fp32, bf16 and int8 weights. Random weights: latency does not depend on their values.

Each figure is measured on one compiled program, compiled ahead of time: prefill is one
forward over a batch-1 prompt that also writes the KV cache (the first half of
``generate``); decode is ``generate``'s own program (prefill + the on-device decode loop)
timed at N and at 1 new tokens, ``(t(N) - t(1)) / (N - 1)`` with the best of ``repeats`` each. Peak memory is XLA's own accounting
of the largest of these programs (arguments + outputs + temporaries, aliased buffers once), so
it is per configuration and comparable between CPU and GPU.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solarjax import generate as G
from solarjax import model as M
from solarjax import quant
from solarjax.config import ModelConfig
from solarjax.decode_layout import unstack_layers
from solarjax.gguf_export import gguf_type

FORMATS = ("float32", "bfloat16", "int8")


class LatencyError(ValueError):
    """A latency request that cannot run (unknown preset or format, lengths beyond the context)."""


@dataclasses.dataclass
class Row:
    model: str  # preset name, with "+dus" for the up-scaled version
    layers: int
    params_b: float  # billions
    weights: str  # float32, bfloat16 or int8
    compute: str  # activation dtype
    prefill_ms: dict[int, float]  # prompt length -> ms
    decode_ms_per_token: float
    peak_memory_mb: float
    weight_mb: float
    device: str

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prefill_ms"] = {str(k): v for k, v in self.prefill_ms.items()}
        return out


def solar_m(n_layers: int) -> int:
    """Layers dropped at the seam by SOLAR's rule scaled to depth: 32 -> m = 8."""
    return max(n_layers // 4, 1)


def format_config(cfg: ModelConfig, weights: str, accelerator: bool) -> ModelConfig:
    """The config a weight format runs with: int8 computes in bf16 on accelerators, fp32 on CPU."""
    if weights not in FORMATS:
        raise LatencyError(f"unknown weight format {weights!r}; choose from {FORMATS}")
    if weights == "int8":
        compute = "bfloat16" if accelerator else "float32"
        return cfg.replace(dtype=compute, param_dtype=compute, attention="xla", remat="none")
    return cfg.replace(dtype=weights, param_dtype=weights, attention="xla", remat="none")


def _memory_mb(compiled: Any) -> float:
    stats = compiled.memory_analysis()
    if stats is None:
        return float("nan")
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
    return total / 2**20


def _best_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(params: Any, cfg: ModelConfig, prompt_lens: Sequence[int], new_tokens: int,
            repeats: int = 3) -> tuple[dict[int, float], float, float]:
    """(prefill ms per prompt length, decode ms/token, peak MB) of one model on the default device,
    in the decode layout ``solarjax generate`` uses (:func:`solarjax.decode_layout.unstack_layers`)."""
    params = unstack_layers(params)
    rng = np.random.default_rng(0)
    prefill, peak = {}, 0.0

    def prefill_fn(p, tokens, positions, segments):
        cache = G.init_cache(cfg, 1, tokens.shape[1])
        logits, cache = G.forward_cached(p, cache, tokens, positions, segments, 0, cfg, last_only=True, fresh=True)
        return logits, cache

    for length in prompt_lens:
        tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, length)), jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        segments = jnp.ones((1, length), jnp.int32)
        compiled = jax.jit(prefill_fn).lower(params, tokens, positions, segments).compile()
        peak = max(peak, _memory_mb(compiled))
        jax.block_until_ready(compiled(params, tokens, positions, segments))  # warm-up
        prefill[length] = _best_ms(lambda: compiled(params, tokens, positions, segments), repeats)

    # decode: generate()'s own program, with the shortest prompt as context
    p_len = G.bucket(prompt_lens[0])
    n_bucket = G.bucket(new_tokens, 32)
    tokens, segments, positions = G.left_pad([rng.integers(3, cfg.vocab_size, prompt_lens[0]).tolist()], p_len)
    sampler = G.Sampler(jnp.float32(0), jnp.float32(1), jnp.full((8,), -1, jnp.int32), jnp.int32(0))
    static = G.Static(cfg, G.cache_length(cfg, p_len + n_bucket), n_bucket, 0, False, G.default_unroll(cfg))
    key = jax.random.key(0)
    args = (params, tokens, segments, positions, key)
    compiled = G._generate_jit.lower(*args, jnp.int32(new_tokens), sampler, static=static).compile()
    peak = max(peak, _memory_mb(compiled))
    run = lambda n: compiled(*args, jnp.int32(n), sampler)  # noqa: E731
    jax.block_until_ready(run(new_tokens))
    # best of each: on a shared machine the minimum is the least disturbed estimate of both halves
    one, many = _best_ms(lambda: run(1), repeats), _best_ms(lambda: run(new_tokens), repeats)
    return prefill, max(many - one, 0.0) / (new_tokens - 1), peak


def latency_table(
    presets: Sequence[str],
    formats: Sequence[str] = FORMATS,
    prompt_lens: Sequence[int] = (128, 512, 2048),
    new_tokens: int = 32,
    *,
    upscale: bool = True,
    repeats: int = 3,
    configs: dict[str, ModelConfig] | None = None,
    on_row: Callable[[Row], None] | None = None,
    progress: bool = False,
    llama_cpp: Sequence[str] = (),
    threads: int | None = None,
) -> list[Row]:
    """Measure every (preset, base/up-scaled, format); ``configs`` maps names to ready configs
    (else :func:`solarjax.config.preset` loads them). ``on_row`` sees each row as it is done.
    ``llama_cpp`` (GGUF types such as ``f32``, ``q8_0``) adds llama.cpp rows: the same random
    weights exported by :mod:`solarjax.gguf_export`, timed by :mod:`solarjax.llama_cpp_peer`."""
    if new_tokens < 2:
        raise LatencyError(f"new tokens must be at least 2 (decode is timed as t(N) - t(1)), got {new_tokens}")
    if not prompt_lens or min(prompt_lens) < 1:
        raise LatencyError(f"prompt lengths must be positive, got {list(prompt_lens)}")
    for weights in formats:
        if weights not in FORMATS:
            raise LatencyError(f"unknown weight format {weights!r}; choose from {FORMATS}")
    accelerator = jax.default_backend() != "cpu"
    device = jax.devices()[0].device_kind
    jobs = []
    for name in presets:
        base = configs[name] if configs and name in configs else _preset(name)
        longest = max(prompt_lens)
        if longest > base.max_seq_len:
            raise LatencyError(f"prompt length {longest} exceeds {name}'s context of {base.max_seq_len} tokens")
        for variant in (("base", "dus") if upscale else ("base",)):
            for weights in formats:
                jobs.append((name, base, variant, weights))
            for qtype in llama_cpp:
                jobs.append((name, base, variant, f"llama.cpp {gguf_type(qtype)}"))
    bar = None
    if progress:
        from solarjax.progress import progress_bar

        bar = progress_bar(total=len(jobs), desc="latency", unit="model")
    rows = []
    for name, base, variant, weights in jobs:
        if weights.startswith("llama.cpp"):
            row = llama_cpp_row(name, base, variant, weights.split()[-1], prompt_lens, new_tokens, repeats, threads)
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if bar is not None:
                bar.update(1)
            continue
        cfg = format_config(base, weights, accelerator)
        stored = cfg.param_dtype  # int8 is quantized from float32 weights
        label, params, cfg = random_model(name, cfg.replace(param_dtype="float32" if weights == "int8" else stored),
                                          variant)
        cfg = cfg.replace(param_dtype=stored)
        if weights == "int8":
            params = quant.quantize_params(params)
        if bar is not None:
            bar.set_postfix_str(f"{label} {weights}")
        prefill, decode, peak = measure(params, cfg, prompt_lens, new_tokens, repeats)
        row = Row(label, cfg.n_layers, cfg.num_params() / 1e9, weights, cfg.dtype, prefill, decode, peak,
                  quant.param_bytes(params) / 2**20, device)
        del params
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def random_model(name: str, cfg: ModelConfig, variant: str) -> tuple[str, Any, ModelConfig]:
    """(row label, random params, config) of a preset, up-scaled by SOLAR's rule for ``dus``."""
    from solarjax.growth.dus import upscale_params

    params = M.init_params(jax.random.key(0), cfg)
    if variant != "dus":
        return name, params, cfg
    params, cfg = upscale_params(params, cfg, f"solar:m={solar_m(cfg.n_layers)}")
    return f"{name}+dus", params, cfg


def llama_cpp_row(name: str, base: ModelConfig, variant: str, qtype: str, prompt_lens: Sequence[int],
                  new_tokens: int, repeats: int, threads: int | None) -> Row:
    """One llama.cpp row: the preset's random float32 weights (up-scaled for ``dus``) as a GGUF of
    ``qtype``, timed on the CPU; peak memory is not measured (llama.cpp shares this process)."""
    from solarjax import gguf_export, llama_cpp_peer

    label, params, cfg = random_model(name, base.replace(dtype="float32", param_dtype="float32", remat="none"),
                                      variant)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        gguf_export.write_gguf(path, params, cfg, llama_cpp_peer.placeholder_tokenizer(Path(tmp) / "tok"), qtype)
        del params
        prefill, decode = llama_cpp_peer.measure(path, prompt_lens, new_tokens, repeats, threads)
        size = path.stat().st_size / 2**20
    return Row(label, cfg.n_layers, cfg.num_params() / 1e9, f"llama.cpp {qtype}", qtype, prefill, decode,
               float("nan"), size, "cpu (llama.cpp)")


def _preset(name: str) -> ModelConfig:
    from solarjax.config import ConfigError, preset

    try:
        return preset(name)
    except ConfigError as err:
        raise LatencyError(str(err)) from err


def markdown(rows: Iterable[Row]) -> str:
    rows = list(rows)
    lengths = sorted({k for r in rows for k in r.prefill_ms})
    head = (["model", "layers", "params", "weights"] + [f"prefill {n} (ms)" for n in lengths]
            + ["decode (ms/token)", "peak memory (MB)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model, str(r.layers), f"{r.params_b:.3g}B", r.weights]
        cells += [f"{r.prefill_ms[n]:.1f}" if n in r.prefill_ms else "" for n in lengths]
        cells += [f"{r.decode_ms_per_token:.2f}", f"{r.peak_memory_mb:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_jsonl(rows: Iterable[Row], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(r.as_dict()) + "\n" for r in rows))


def plot(rows: Sequence[Row], path: str | Path) -> None:
    """Two panels like the survey's: prefill ms vs prompt length, and decode ms/token vs peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        lengths = sorted(r.prefill_ms)
        style = "--" if r.model.endswith("+dus") else "-"
        left.plot(lengths, [r.prefill_ms[n] for n in lengths], style, marker="o", label=f"{r.model} {r.weights}")
        right.scatter(r.peak_memory_mb, r.decode_ms_per_token, marker="s" if r.model.endswith("+dus") else "o")
        right.annotate(f"{r.model} {r.weights}", (r.peak_memory_mb, r.decode_ms_per_token), fontsize=7)
    left.set(xlabel="prompt tokens", ylabel="prefill ms (batch 1)", xscale="log", yscale="log", title="prefill")
    right.set(xlabel="peak memory (MB, XLA)", ylabel="decode ms/token", title="decode")
    left.legend(fontsize=6, ncol=2)
    fig.suptitle(f"inference on {rows[0].device if rows else ''}: base vs SOLAR-style up-scaled (dashed/squares)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
