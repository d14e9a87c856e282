"""``config.json`` fields every family shares (shapes, RoPE, norms, tokens), both ways.

Family modules call :func:`from_hf` / :func:`to_hf` and add or override their own fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from solarjax.config import ModelConfig

# RoPE variants solarjax computes exactly as transformers' modeling_rope_utils does
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def _error(message: str) -> Exception:
    from solarjax.config import ConfigError

    return ConfigError(message)


def rope_from_hf(params: dict[str, Any] | None, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """``(theta, scaling)`` from a ``rope_parameters`` / ``rope_scaling`` dict; ``scaling`` is None for
    plain RoPE. An unsupported rope type is one ConfigError naming it."""
    params = dict(params or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise _error(f"RoPE scaling {rope_type!r} is not supported (solarjax implements {', '.join(ROPE_TYPES)})")
    theta = float(params.get("rope_theta", default_theta))
    if rope_type == "default":
        return theta, None
    scaling = {"rope_type": rope_type, **{k: params[k] for k in ROPE_KEYS if params.get(k) is not None}}
    return theta, scaling


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's ``rope_parameters`` merged over a legacy ``rope_scaling`` and ``rope_theta``."""
    merged = dict(hf.get("rope_scaling") or {})
    if "rope_theta" in hf:
        merged.setdefault("rope_theta", hf["rope_theta"])
    merged.update(hf.get("rope_parameters") or {})
    return merged


def rope_to_hf(theta: float, scaling: Any) -> dict[str, Any]:
    out = {"rope_type": "default", "rope_theta": theta}
    if scaling:
        out.update(dict(scaling))
    return out


DROP = object()  # a to_hf value meaning: remove this key from the source's config.json


def first_token(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The ``ModelConfig`` fields every family reads the same way."""
    n_heads = hf["num_attention_heads"]
    if hf.get("mlp_bias"):
        raise _error("config.json sets mlp_bias=true; solarjax's MLP has no biases")
    partial = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _error(f"partial_rotary_factor={partial} is not supported (RoPE over the whole head only)")
    values = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_dim=hf["intermediate_size"],
        rms_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=first_token(hf.get("eos_token_id")),
    )
    values["rope_theta"], values["rope_scaling"] = rope_from_hf(rope_parameters(hf), 10000.0)
    return values


def to_hf(cfg: "ModelConfig", family) -> dict[str, Any]:
    """The ``config.json`` fields every family writes the same way."""
    return dict(
        architectures=[family.hf_architectures[0]],
        model_type=family.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps,
        rope_theta=cfg.rope_theta,
        rope_parameters=rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


def full_layer_types(hf: dict[str, Any]) -> None:
    """Refuse per-layer attention types a family without sliding layers cannot model."""
    types = hf.get("layer_types")
    if types and any(t != "full_attention" for t in types):
        raise _error(f"layer_types {sorted(set(types))} are not supported for {hf.get('architectures')}")
