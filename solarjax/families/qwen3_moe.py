"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k norms) with a
Mixture-of-Experts MLP of ``moe_intermediate_size`` experts, every layer sparse."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu
from solarjax.families.mixtral import moe_from_hf, moe_to_hf
from solarjax.families.qwen2 import sliding_from_hf, sliding_to_hf
from solarjax.families.qwen2_moe import all_layers_sparse


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    if hf.get("attention_bias"):
        raise common._error("config.json sets attention_bias=true; solarjax's qwen3_moe family has no biases")
    all_layers_sparse(hf)
    return {**common.from_hf(hf), **sliding_from_hf(hf), **moe_from_hf(hf, "num_experts"),
            "moe_ffn_dim": hf["moe_intermediate_size"], "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}


def _to_hf(cfg) -> dict[str, Any]:
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "attention_bias": False, **sliding_to_hf(cfg),
            **moe_to_hf(cfg, "num_experts"), "intermediate_size": cfg.ffn_dim,
            "moe_intermediate_size": cfg.expert_ffn_dim, "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


FAMILY = spec.Family(
    name="qwen3_moe", hf_architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe",
    layer_params=(*spec.attention(), *spec.qk_norms(),
                  *spec.expert_mlp("mlp", "gate_proj", "up_proj", "down_proj", "gate"),
                  *spec.pre_norms()),
    global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf, moe=True,
)
