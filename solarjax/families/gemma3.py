"""Gemma 3 (text): GeGLU (tanh GELU), RMSNorm scaling by (1 + w), embeddings times sqrt(d_model),
sandwich norms around attention and MLP, per-head q/k norms, ``query_pre_attn_scalar`` as the
attention scale, and interleaved sliding / full layers with their own RoPE bases.

Per-layer attention types live in ``ModelConfig.layer_types`` (a tuple indexed by layer), which
DUS re-indexes with the same plan as the stacked weights, so an up-scaled Gemma keeps each copied
layer's type and its export writes the matching ``layer_types``.
"""

from __future__ import annotations

from typing import Any

from solarjax.families import common, spec

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise common._error(f"hidden_activation={act!r} is not supported for Gemma 3 (only tanh GELU)")
    for flag in ("attn_logit_softcapping", "final_logit_softcapping"):
        if hf.get(flag) is not None:
            raise common._error(f"config.json sets {flag}={hf[flag]}; logit soft-capping is not supported")
    if hf.get("attention_bias"):
        raise common._error("config.json sets attention_bias=true; solarjax's gemma3 family has no biases")
    if hf.get("use_bidirectional_attention"):
        raise common._error("use_bidirectional_attention=true (an encoder) is not supported")
    values = common.from_hf({k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")})
    rope = hf.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:  # transformers 5: one dict per layer type
        full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    else:  # legacy: rope_theta + rope_scaling for full layers, rope_local_base_freq for sliding ones
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    values["rope_theta"], values["rope_scaling"] = common.rope_from_hf(full, 1_000_000.0)
    local_theta, local_scaling = common.rope_from_hf(local, 10_000.0)
    if local_scaling is not None:
        raise common._error(f"RoPE scaling {local_scaling['rope_type']!r} on sliding layers is not supported")
    n = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", 6)
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    values.update(
        rms_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(types), rope_local_theta=local_theta,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
    )
    return values


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x  # transformers' Gemma3TextConfig wants an int


def _to_hf(cfg) -> dict[str, Any]:
    out = common.to_hf(cfg, FAMILY)
    out.update(
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar),
        sliding_window=cfg.sliding_window, layer_types=list(cfg.resolved_layer_types),
        rope_parameters={"full_attention": common.rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
                         "sliding_attention": common.rope_to_hf(cfg.sliding_rope_theta, None)},
        attention_bias=False, attn_logit_softcapping=None, final_logit_softcapping=None,
        rope_theta=common.DROP, rope_local_base_freq=common.DROP, sliding_window_pattern=common.DROP,
        hidden_act=common.DROP,
    )
    return out


LLAMA_CPP_LOCAL_THETA = 10000.0  # llama.cpp's gemma3 hard-codes the sliding layers' RoPE base


def llama_cpp_layer_types(n_layers: int) -> tuple[str, ...]:
    """The layer types llama.cpp's gemma3 runs (it stores none): every 6th layer full attention."""
    return tuple("sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers))


def _from_gguf(meta, values: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's Gemma 3 metadata: the window; every 6th layer full; local RoPE base 10000;
    the attention scale from head_dim."""
    return dict(sliding_window=int(meta("attention.sliding_window", 4096)), rope_local_theta=LLAMA_CPP_LOCAL_THETA,
                query_pre_attn_scalar=float(values["head_dim"]), layer_types=llama_cpp_layer_types(values["n_layers"]))


_LAYER = (
    *spec.attention(), *spec.qk_norms("zeros"), *spec.gated_mlp(),
    spec.norm("attn_norm", "input_layernorm.weight", "attn_norm.weight", "zeros"),
    spec.norm("post_attn_norm", "post_attention_layernorm.weight", "post_attention_norm.weight", "zeros"),
    spec.norm("mlp_norm", "pre_feedforward_layernorm.weight", "ffn_norm.weight", "zeros"),
    spec.norm("post_mlp_norm", "post_feedforward_layernorm.weight", "post_ffw_norm.weight", "zeros"),
)

FAMILY = spec.Family(
    name="gemma3", hf_architectures=("Gemma3ForCausalLM",), model_type="gemma3_text",
    layer_params=_LAYER, global_params=spec.globals_("zeros"), from_hf=_from_hf, to_hf=_to_hf,
    activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True,
    gguf_architecture="gemma3", gguf_norm_offset=1.0, from_gguf=_from_gguf,
)
