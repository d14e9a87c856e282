"""OLMoE: a Mixture-of-Experts decoder (1B active of 7B, 64 experts, 8 per token) whose q/k
RMSNorms run over the whole projection (all heads at once), and whose router does not
renormalise the top-k weights by default (``norm_topk_prob``)."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu
from solarjax.families.mixtral import moe_from_hf, moe_to_hf


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    common.full_layer_types(hf)
    if hf.get("clip_qkv") is not None:
        raise common._error(f"clip_qkv={hf['clip_qkv']} is not supported (solarjax does not clamp q/k/v)")
    if hf.get("attention_bias"):
        raise common._error("config.json sets attention_bias=true; solarjax's olmoe family has no biases")
    return {**common.from_hf(hf), "sliding_window": None, **moe_from_hf(hf, "num_experts"),
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}


def _to_hf(cfg) -> dict[str, Any]:
    if cfg.moe_ffn_dim not in (None, cfg.ffn_dim):
        raise common._error("OlmoeForCausalLM's experts use intermediate_size; set ffn_dim, not moe_ffn_dim")
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "attention_bias": False, "clip_qkv": None,
            **moe_to_hf(cfg, "num_experts"), "norm_topk_prob": cfg.norm_topk_prob, "sliding_window": common.DROP,
            "layer_types": common.DROP}


FAMILY = spec.Family(
    name="olmoe", hf_architectures=("OlmoeForCausalLM",), model_type="olmoe",
    layer_params=(*spec.attention(), *spec.whole_qk_norms(),
                  *spec.expert_mlp("mlp", "gate_proj", "up_proj", "down_proj", "gate"),
                  *spec.pre_norms()),
    global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf, moe=True,
)
