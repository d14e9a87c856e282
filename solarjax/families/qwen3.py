"""Qwen3 (dense): Llama's layer with a per-head RMSNorm of queries and keys before RoPE."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu
from solarjax.families.qwen2 import sliding_from_hf, sliding_to_hf


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    if hf.get("attention_bias"):
        raise common._error("config.json sets attention_bias=true; solarjax's qwen3 family has no biases")
    return {**common.from_hf(hf), **sliding_from_hf(hf)}


def _to_hf(cfg) -> dict[str, Any]:
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "attention_bias": False, **sliding_to_hf(cfg)}


FAMILY = spec.Family(
    name="qwen3", hf_architectures=("Qwen3ForCausalLM",), model_type="qwen3",
    layer_params=spec.llama_layer(with_qk_norm=True), global_params=spec.globals_(), from_hf=_from_hf,
    to_hf=_to_hf, gguf_architecture="qwen3",
)
