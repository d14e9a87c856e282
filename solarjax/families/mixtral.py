"""Mixtral: Mistral's attention with a Mixture-of-Experts MLP (:mod:`solarjax.moe`): softmax
router, top-k renormalised, experts ``w1``/``w3``/``w2`` under ``block_sparse_moe``. Also the
family a dense Llama or Mistral becomes when it is sparsely upcycled (:mod:`solarjax.upcycle`)."""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec
from solarjax.families.llama import check_silu


def moe_from_hf(hf: dict[str, Any], experts_key: str) -> dict[str, Any]:
    """The ``ModelConfig`` MoE fields of a ``config.json`` (Mixtral and OLMoE name the count differently)."""
    if hf.get("router_jitter_noise"):
        raise common._error(f"router_jitter_noise={hf['router_jitter_noise']} is not supported (solarjax's router "
                            "has no input jitter)")
    # transformers 5 may save a family's expert count under Mixtral's key (its attribute_map)
    count = next((hf[k] for k in (experts_key, "num_local_experts", "num_experts") if hf.get(k) is not None), None)
    if count is None:
        raise common._error(f"config.json has no expert count ({experts_key})")
    return dict(n_experts=count, experts_per_token=hf["num_experts_per_tok"],
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))


def moe_to_hf(cfg, experts_key: str) -> dict[str, Any]:
    return {experts_key: cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
            "router_aux_loss_coef": cfg.router_aux_loss_coef, "intermediate_size": cfg.expert_ffn_dim}


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    check_silu(hf)
    common.full_layer_types(hf)
    return {**common.from_hf(hf), "sliding_window": hf.get("sliding_window"), **moe_from_hf(hf, "num_local_experts"),
            "norm_topk_prob": True}


def _to_hf(cfg) -> dict[str, Any]:
    if not cfg.norm_topk_prob:
        raise common._error("Mixtral renormalises the top-k router weights; norm_topk_prob=False cannot be exported "
                            "as MixtralForCausalLM (use arch='olmoe')")
    if cfg.moe_ffn_dim not in (None, cfg.ffn_dim):
        raise common._error("MixtralForCausalLM's experts use intermediate_size; set ffn_dim, not moe_ffn_dim")
    return {**common.to_hf(cfg, FAMILY), "hidden_act": "silu", "sliding_window": cfg.sliding_window,
            "layer_types": common.DROP, **moe_to_hf(cfg, "num_local_experts"), "router_jitter_noise": 0.0}


FAMILY = spec.Family(
    name="mixtral", hf_architectures=("MixtralForCausalLM",), model_type="mixtral",
    layer_params=(*spec.attention(), *spec.expert_mlp("block_sparse_moe", "w1", "w3", "w2", "gate"),
                  *spec.pre_norms()),
    global_params=spec.globals_(), from_hf=_from_hf, to_hf=_to_hf, moe=True,
)
