"""Llama (1, 2, 3.x incl. its RoPE scaling) and every checkpoint saved as ``LlamaForCausalLM``."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec


def check_silu(hf: dict[str, Any]) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise common._error(f"hidden_act={act!r} is not supported for {hf.get('architectures')} (only 'silu' / SwiGLU)")


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    if hf.get("attention_bias"):
        raise common._error("config.json sets attention_bias=true; solarjax's llama family has no biases")
    check_silu(hf)
    common.full_layer_types(hf)
    return {**common.from_hf(hf), "sliding_window": None}


def _to_hf(cfg) -> dict[str, Any]:
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "sliding_window": common.DROP, "layer_types": common.DROP}


FAMILY = spec.Family(
    name="llama", hf_architectures=("LlamaForCausalLM",), model_type="llama",
    layer_params=spec.llama_layer(), global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf,
    gguf_architecture="llama", gguf_permute_qk=True,
)
