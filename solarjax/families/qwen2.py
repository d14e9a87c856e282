"""Qwen2 / Qwen2.5: Llama's layer with q/k/v biases (zeros at init, never decayed)."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu


def sliding_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen's optional sliding window: only on the layers ``layer_types`` marks (when enabled)."""
    types = hf.get("layer_types")
    if not hf.get("use_sliding_window") or not types or all(t == "full_attention" for t in types):
        return {"sliding_window": None, "layer_types": None}
    return {"sliding_window": hf.get("sliding_window"), "layer_types": tuple(types)}


def sliding_to_hf(cfg) -> dict[str, Any]:
    sliding = cfg.layer_types is not None and "sliding_attention" in cfg.layer_types
    return {"use_sliding_window": sliding, "sliding_window": cfg.sliding_window if sliding else None,
            "layer_types": list(cfg.layer_types or ["full_attention"] * cfg.n_layers), "max_window_layers": common.DROP}


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    return {**common.from_hf(hf), **sliding_from_hf(hf)}


def _to_hf(cfg) -> dict[str, Any]:
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", **sliding_to_hf(cfg)}


FAMILY = spec.Family(
    name="qwen2", hf_architectures=("Qwen2ForCausalLM",), model_type="qwen2",
    layer_params=spec.llama_layer(with_bias=True), global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf,
    gguf_architecture="qwen2",
)
