"""Mistral: Llama's layer with a sliding window on every layer; ``head_dim`` may differ from
d_model / n_heads (Mistral-Nemo)."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    common.full_layer_types(hf)
    return {**common.from_hf(hf), "sliding_window": hf.get("sliding_window")}


def _to_hf(cfg) -> dict[str, Any]:
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "sliding_window": cfg.sliding_window,
            "layer_types": common.DROP}


FAMILY = spec.Family(
    name="mistral", hf_architectures=("MistralForCausalLM",), model_type="mistral",
    layer_params=spec.llama_layer(), global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf,
    gguf_architecture=None, gguf_permute_qk=True,  # llama.cpp writes Mistral files as "llama"
)
