"""The architecture spec: one record per parameter, one record per family.

A :class:`Param` says everything solarjax needs to know about one weight: its shape (from the
config), the logical axis name of every dimension (sharding), how it is initialised, whether
weight decay applies, whether it is a matmul weight (cast to the compute dtype once per step),
its Hugging Face name and layout, and its llama.cpp (GGUF) name. A :class:`Family` lists its
params and translates its ``config.json`` both ways. Init, abstract shapes, sharding specs,
parameter counts, HF/GGUF conversion, merge's tensor names and the weight-decay mask all derive
from these records, so a new family is one small module in this package plus its tests.

Layer params are stacked on a leading ``layers`` axis in the pytree; ``shape`` and ``axes`` here
describe one layer (the stacking axis is added by :func:`stacked_shape` / :func:`stacked_axes`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the config module imports this package lazily; no import cycle at run time
    from solarjax.config import ModelConfig

INITS = ("normal", "ones", "zeros")
# HF layout of a tensor relative to ours (only transposes and reshapes; RoPE is rotate-half in both):
#   identity: same array; transpose: 2-D transpose;
#   split_out: HF (n*hd, d) -> ours (d, n, hd)   (q/k/v projections)
#   split_in:  HF (d, n*hd) -> ours (n, hd, d)   (output projection)
#   flat:      HF (n*hd,)   -> ours (n, hd)      (q/k/v biases)
# An ``hf`` name with ``{e}`` is one HF tensor per expert (Mixture-of-Experts): our leaf has a
# leading experts axis and the layout applies to each expert's slice.
LAYOUTS = ("identity", "transpose", "split_out", "split_in", "flat")


@dataclasses.dataclass(frozen=True)
class Param:
    """One weight of a family, declared once."""

    name: str  # our leaf name (under params["layers"] for layer params)
    shape: Callable[["ModelConfig"], tuple[int, ...]]  # one layer's shape for layer params
    axes: tuple[str, ...]  # logical axis names, one per dim of ``shape``
    init: str  # one of INITS
    decay: bool  # AdamW weight decay applies (off for norms, biases, the embedding table)
    matmul: bool  # a matmul weight: cast to the compute dtype once per step
    hf: str  # HF tensor name; for layer params the suffix after "model.layers.{i}."
    layout: str = "identity"  # one of LAYOUTS
    gguf: str | None = None  # llama.cpp tensor name; for layer params the suffix after "blk.{i}."
    when: Callable[["ModelConfig"], bool] | None = None  # present only for some configs (untied head)

    def __post_init__(self) -> None:
        assert self.init in INITS and self.layout in LAYOUTS, self

    @property
    def per_expert(self) -> bool:
        """One HF tensor per expert (``{e}`` in the name), stacked on our leading experts axis."""
        return "{e}" in self.hf

    def present(self, cfg: "ModelConfig") -> bool:
        return self.when is None or self.when(cfg)


@dataclasses.dataclass(frozen=True)
class Family:
    """A decoder family: its params, numerics and config translation.

    ``from_hf(hf)`` returns ``ModelConfig`` field values from a ``config.json`` dict (raising
    ``ConfigError`` naming any unsupported feature); ``to_hf(cfg)`` returns the ``config.json``
    fields that describe ``cfg`` (the caller keeps any other fields of the source's config).
    """

    name: str  # ModelConfig.arch
    hf_architectures: tuple[str, ...]  # config.json "architectures" entries read as this family
    model_type: str  # config.json "model_type" written on export
    layer_params: tuple[Param, ...]  # in transformers' order within a layer
    global_params: tuple[Param, ...]  # embedding, final norm, head
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    to_hf: Callable[["ModelConfig"], dict[str, Any]]
    activation: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w) (Gemma) instead of w
    scale_embeddings: bool = False  # embeddings are multiplied by sqrt(d_model) (Gemma)
    gguf_architecture: str | None = None  # general.architecture of its llama.cpp files
    gguf_permute_qk: bool = False  # llama.cpp interleaves Q/K rows for RoPE (its "llama" arch only)
    gguf_norm_offset: float = 0.0  # llama.cpp stores (1 + w) for Gemma's norms
    # (meta(key, default) reading "<arch>.<key>", common values) -> extra ModelConfig values from GGUF
    from_gguf: Callable[[Callable, dict[str, Any]], dict[str, Any]] | None = None
    moe: bool = False  # its MLP is a Mixture of Experts (ModelConfig.n_experts > 0), else dense

    def params(self, cfg: "ModelConfig") -> tuple[tuple[Param, ...], tuple[Param, ...]]:
        """(layer params, global params) present for ``cfg``."""
        return (tuple(p for p in self.layer_params if p.present(cfg)),
                tuple(p for p in self.global_params if p.present(cfg)))

    def param(self, name: str) -> Param:
        """The declaration of leaf ``name`` (layer or global)."""
        for p in self.layer_params + self.global_params:
            if p.name == name:
                return p
        raise KeyError(f"family {self.name!r} has no parameter {name!r}")


# ----------------------------------------------------------------------------- building blocks
# Shared declarations the family modules compose; names are the same in every family so that
# model.py, quant.py and the DUS scale rule (wo, w_down) read one vocabulary.

def _d(c): return c.d_model  # noqa: E704


def matrix(name: str, shape, axes, hf: str, layout: str, gguf: str | None, when=None) -> Param:
    return Param(name, shape, axes, "normal", True, True, hf, layout, gguf, when)


def norm(name: str, hf: str, gguf: str | None, init: str = "ones", dim: Callable = _d, axes=("embed",)) -> Param:
    return Param(name, lambda c: (dim(c),), axes, init, False, False, hf, "identity", gguf)


def bias(name: str, heads: Callable, hf: str, gguf: str | None, axes: tuple[str, str]) -> Param:
    return Param(name, lambda c: (heads(c), c.head_dim), axes, "zeros", False, False, hf, "flat", gguf)


def attention(with_bias: bool = False) -> tuple[Param, ...]:
    """q/k/v/o projections (heads as their own axis), optionally with q/k/v biases, in HF order."""
    q_heads, kv_heads = (lambda c: c.n_heads), (lambda c: c.n_kv_heads)
    out = []
    for leaf, proj, gguf, heads, head_axis in (("q", "q_proj", "attn_q", q_heads, "heads"),
                                               ("k", "k_proj", "attn_k", kv_heads, "kv_heads"),
                                               ("v", "v_proj", "attn_v", kv_heads, "kv_heads")):
        out.append(matrix(f"w{leaf}", lambda c, h=heads: (c.d_model, h(c), c.head_dim),
                          ("embed", head_axis, "head_dim"), f"self_attn.{proj}.weight", "split_out", f"{gguf}.weight"))
        if with_bias:
            out.append(bias(f"b{leaf}", heads, f"self_attn.{proj}.bias", f"{gguf}.bias", (head_axis, "head_dim")))
    out.append(matrix("wo", lambda c: (c.n_heads, c.head_dim, c.d_model), ("heads", "head_dim", "embed"),
                      "self_attn.o_proj.weight", "split_in", "attn_output.weight"))
    return tuple(out)


def whole_qk_norms() -> tuple[Param, ...]:
    """RMSNorm over the whole query and key projections (all heads at once, OLMoE), before RoPE."""
    return (Param("q_norm", lambda c: (c.n_heads, c.head_dim), ("heads", "head_dim"), "ones", False, False,
                  "self_attn.q_norm.weight", "flat", "attn_q_norm.weight"),
            Param("k_norm", lambda c: (c.n_kv_heads, c.head_dim), ("kv_heads", "head_dim"), "ones", False, False,
                  "self_attn.k_norm.weight", "flat", "attn_k_norm.weight"))


def qk_norms(init: str = "ones") -> tuple[Param, ...]:
    """Per-head RMSNorm of queries and keys (over head_dim), applied before RoPE."""
    hd = lambda c: c.head_dim  # noqa: E731
    return (norm("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", init, hd, ("head_dim",)),
            norm("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", init, hd, ("head_dim",)))


def gated_mlp() -> tuple[Param, ...]:
    ffn = (lambda c: (c.d_model, c.ffn_dim), ("embed", "mlp"))
    return (matrix("w_gate", *ffn, "mlp.gate_proj.weight", "transpose", "ffn_gate.weight"),
            matrix("w_up", *ffn, "mlp.up_proj.weight", "transpose", "ffn_up.weight"),
            matrix("w_down", lambda c: (c.ffn_dim, c.d_model), ("mlp", "embed"), "mlp.down_proj.weight", "transpose",
                   "ffn_down.weight"))


def expert_mlp(prefix: str, gate: str, up: str, down: str, router: str) -> tuple[Param, ...]:
    """A Mixture-of-Experts MLP (:mod:`solarjax.moe`): the router and E stacked gated MLPs.

    ``prefix`` is the block's HF name (``block_sparse_moe`` for Mixtral, ``mlp`` for OLMoE);
    ``gate``/``up``/``down`` the experts' projection names, ``router`` the gate's. The router is
    kept in float32 (routing decisions are sensitive to rounding), so it is not a matmul weight.
    """
    e, f = (lambda c: c.n_experts), (lambda c: c.expert_ffn_dim)
    names = lambda proj: f"{prefix}.experts.{{e}}.{proj}.weight"  # noqa: E731
    return (
        Param("w_router", lambda c: (c.d_model, e(c)), ("embed", None), "normal", True, False,
              f"{prefix}.{router}.weight", "transpose", None),
        matrix("w_gate", lambda c: (e(c), c.d_model, f(c)), ("experts", "embed", "mlp"), names(gate), "transpose", None),
        matrix("w_up", lambda c: (e(c), c.d_model, f(c)), ("experts", "embed", "mlp"), names(up), "transpose", None),
        matrix("w_down", lambda c: (e(c), f(c), c.d_model), ("experts", "mlp", "embed"), names(down), "transpose",
               None),
    )


def shared_expert() -> tuple[Param, ...]:
    """Qwen2-MoE's shared expert: a gated MLP every token goes through, scaled by a sigmoid gate;
    present when ``shared_expert_ffn_dim`` is set."""
    has = lambda c: c.shared_expert_ffn_dim is not None  # noqa: E731
    f = lambda c: c.shared_expert_ffn_dim  # noqa: E731
    return (
        matrix("w_shared_gate", lambda c: (c.d_model, f(c)), ("embed", "mlp"), "mlp.shared_expert.gate_proj.weight",
               "transpose", None, when=has),
        matrix("w_shared_up", lambda c: (c.d_model, f(c)), ("embed", "mlp"), "mlp.shared_expert.up_proj.weight",
               "transpose", None, when=has),
        matrix("w_shared_down", lambda c: (f(c), c.d_model), ("mlp", "embed"), "mlp.shared_expert.down_proj.weight",
               "transpose", None, when=has),
        Param("w_shared_router", lambda c: (c.d_model, 1), ("embed", None), "normal", True, False,
              "mlp.shared_expert_gate.weight", "transpose", None, has),
    )


def globals_(norm_init: str = "ones") -> tuple[Param, ...]:
    """Embedding table, final norm and the (untied) head."""
    return (
        Param("embed", lambda c: (c.vocab_size, c.d_model), ("vocab", "embed"), "normal", False, False,
              "model.embed_tokens.weight", "identity", "token_embd.weight"),
        norm("final_norm", "model.norm.weight", "output_norm.weight", norm_init),
        matrix("lm_head", lambda c: (c.d_model, c.vocab_size), ("embed", "vocab"), "lm_head.weight", "transpose",
               "output.weight", when=lambda c: not c.tie_embeddings),
    )


def pre_norms() -> tuple[Param, ...]:
    """The Llama layer's two pre-norms (before attention, before the MLP), as HF and GGUF name them;
    the dense and the Mixture-of-Experts families share them."""
    return (norm("attn_norm", "input_layernorm.weight", "attn_norm.weight"),
            norm("mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight"))


def llama_layer(with_bias: bool = False, with_qk_norm: bool = False) -> tuple[Param, ...]:
    """The pre-norm Llama layer (Llama, Mistral, Qwen2 with biases, Qwen3 with q/k norms)."""
    return (*attention(with_bias), *(qk_norms() if with_qk_norm else ()), *gated_mlp(), *pre_norms())
