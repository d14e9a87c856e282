"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with a
Mixture-of-Experts MLP plus a shared expert every token uses, scaled by a sigmoid gate."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu
from solarjax.families.mixtral import moe_from_hf, moe_to_hf
from solarjax.families.qwen2 import sliding_from_hf, sliding_to_hf


def all_layers_sparse(hf: dict[str, Any]) -> None:
    """Refuse dense layers among the experts (``mlp_only_layers``, ``decoder_sparse_step`` > 1)."""
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise common._error(f"dense layers among the experts (mlp_only_layers={hf.get('mlp_only_layers')}, "
                            f"decoder_sparse_step={hf.get('decoder_sparse_step')}) are not supported: every layer "
                            "must be sparse")


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    all_layers_sparse(hf)
    if not hf.get("qkv_bias", True):
        raise common._error("config.json sets qkv_bias=false; solarjax's qwen2_moe family has q/k/v biases")
    shared = hf.get("shared_expert_intermediate_size") or None
    return {**common.from_hf(hf), **sliding_from_hf(hf), **moe_from_hf(hf, "num_experts"),
            "moe_ffn_dim": hf["moe_intermediate_size"], "shared_expert_ffn_dim": shared,
            "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}


def _to_hf(cfg) -> dict[str, Any]:
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "qkv_bias": True, **sliding_to_hf(cfg),
            **moe_to_hf(cfg, "num_experts"), "intermediate_size": cfg.ffn_dim,
            "moe_intermediate_size": cfg.expert_ffn_dim, "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim or 0,
            "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": []}


FAMILY = spec.Family(
    name="qwen2_moe", hf_architectures=("Qwen2MoeForCausalLM",), model_type="qwen2_moe",
    layer_params=(*spec.attention(with_bias=True),
                  *spec.expert_mlp("mlp", "gate_proj", "up_proj", "down_proj", "gate"), *spec.shared_expert(),
                  *spec.pre_norms()),
    global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf, moe=True,
)
