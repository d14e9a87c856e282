"""Every solarjax family as a Flax NNX module, for Tunix (post-training) and Qwix (LoRA, quantization).

The module tree is derived from the family spec (:mod:`solarjax.families`): each parameter sits
where its Hugging Face name puts it (``model.embed_tokens``, ``model.layers[i].self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ..., ``lm_head``). A matmul weight is a :class:`Linear`
with a 2-D ``kernel`` laid out (in, out), nnx.Linear's convention (solarjax's leaf, flattened: a
reshape, so conversion is bit-exact); every other leaf (norms, biases, a router, stacked experts)
keeps solarjax's layout under the last part of its HF name. :func:`from_params` and
:func:`to_params` convert both ways; ``nnx.split``/``nnx.merge``/``nnx.to_pure_dict`` work as usual
and :func:`params_from_pure_dict` reads a pure dict back.

The forward is solarjax's own: :func:`solarjax.model.run_layers` over per-layer dicts whose matmul
leaves are handles (:class:`_Product`) that run ``x @ w`` inside their :class:`Linear`'s
``__call__``, as a ``jax.lax.dot_general`` there. Qwix intercepts exactly that (it finds the module
by path and the weight among its params), so ``qwix.apply_lora_to_model`` and
``qwix.quantize_model`` with rules like ``.*q_proj`` act per projection. Mixture-of-Experts
experts stay stacked arrays in the MoE dispatch (not a per-module product: Qwix does not see them).

Needs ``flax`` (the ``nnx`` extra: ``pip install "solarjax[nnx]"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from solarjax import attention as attn
from solarjax import model
from solarjax.config import ModelConfig
from solarjax.families.spec import Param

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Place:
    """Where one solarjax leaf lives in the NNX tree: its module path under the root (layer
    params: under ``model.layers[i]``), its attribute, and whether it is a :class:`Linear` kernel."""

    param: Param
    path: tuple[str, ...]
    attr: str

    @property
    def linear(self) -> bool:
        return self.attr == "kernel"


def place(param: Param) -> Place:
    """The module path and attribute of ``param``, from its HF name."""
    parts = param.hf.split(".")
    if param.per_expert:  # "mlp.experts.{e}.gate_proj.weight" -> mlp.experts, stacked "gate_proj"
        e = parts.index("{e}")
        return Place(param, tuple(parts[:e]), parts[e + 1])
    if param.matmul:
        return Place(param, tuple(parts[:-1]), "kernel")
    return Place(param, tuple(parts[:-1]), parts[-1])


def places(cfg: ModelConfig) -> tuple[tuple[Place, ...], tuple[Place, ...]]:
    """(layer places, global places) of ``cfg``'s family."""
    layer, glob = model.family(cfg).params(cfg)
    return tuple(map(place, layer)), tuple(map(place, glob))


def kernel_shape(param: Param, cfg: ModelConfig) -> tuple[int, int]:
    """The (in, out) matrix of a matmul leaf: the output projection's (heads, head_dim) are its
    inputs, every other leaf's first dim is."""
    shape = tuple(param.shape(cfg))
    split = 2 if param.layout == "split_in" else 1
    return math.prod(shape[:split]), math.prod(shape[split:])


class Linear(nnx.Module):
    """``x @ kernel`` for one weight, kernel (in, out); its bias (if any) is added by solarjax's layer."""

    def __init__(self, kernel: jax.Array):
        self.kernel = nnx.Param(kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel.value  # a Qwix-quantized kernel is its own array-like here
        if kernel.dtype != x.dtype:
            kernel = kernel.astype(x.dtype)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class Block(nnx.Module):
    """A named container: submodules and non-matmul params, set by :func:`from_params`."""


class _Product:
    """A layer leaf standing in for a :class:`Linear`'s weight inside :func:`model.run_layers`:
    ``astype`` keeps the handle (the module casts its kernel to the activations' dtype), ``reshape``
    to the kernel's (in, out) matrix keeps it too, and ``x @ handle`` calls the module."""

    def __init__(self, module: Linear, shape: tuple[int, ...]):
        self.module, self.shape = module, shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def astype(self, dtype: Any) -> "_Product":
        return self

    def reshape(self, *shape: int) -> "_Product":
        kernel = tuple(self.module.kernel.value.shape)
        wanted = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        known = math.prod(w for w in wanted if w != -1)
        if tuple(math.prod(kernel) // known if w == -1 else w for w in wanted) != kernel:
            raise ValueError(f"solarjax.nnx: a {self.shape} weight reshaped to {wanted}, not its {kernel} kernel")
        return _Product(self.module, kernel)

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        return self.module(x)


def _child(root: nnx.Module, path: tuple[str, ...], create: bool = False) -> nnx.Module:
    node = root
    for name in path:
        if not hasattr(node, name):
            if not create:
                raise AttributeError(f"NNX model has no module {'.'.join(path)!r}")
            setattr(node, name, Block())
        node = getattr(node, name)
    return node


def _put(root: nnx.Module, where: Place, value: jax.Array, cfg: ModelConfig) -> None:
    if where.linear:
        parent = _child(root, where.path[:-1], create=True)
        existing = getattr(parent, where.path[-1], None)
        linear = Linear(value.reshape(kernel_shape(where.param, cfg)))
        if existing is not None:  # a bias placed first (it never is in the specs' order, but be safe)
            for name, var in vars(existing).items():
                if isinstance(var, nnx.Param):
                    setattr(linear, name, var)
        setattr(parent, where.path[-1], linear)
    else:
        setattr(_child(root, where.path, create=True), where.attr, nnx.Param(value))


def find(root: nnx.Module, where: Place) -> Any:
    """The :class:`Linear` of a matmul leaf, else the leaf's ``nnx.Param``."""
    module = _child(root, where.path)
    return module if where.linear else getattr(module, where.attr)


class CausalLM(nnx.Module):
    """A solarjax model as an NNX module, called the way Tunix calls its models:
    ``model(input_tokens, positions, cache, attention_mask) -> (logits, cache)``.

    ``attention_mask`` (batch, q, kv) boolean (Tunix's ``make_causal_attn_mask``) is honoured as
    given (and each layer's sliding window on top); None means causal within each row. No KV cache
    here (``cache`` must be None: decode with ``solarjax generate`` or llama.cpp); fp32 logits.
    """

    def __init__(self, params: Params, cfg: ModelConfig):
        # The layers run as a Python loop over per-layer modules (so Qwix sees each one); remat, a
        # scan-body policy, does not apply to that loop.
        self.config = dataclasses.replace(cfg, remat="none")
        layer_places, global_places = places(cfg)
        self.model = Block()
        for where in global_places:
            _put(self, where, params[where.param.name], cfg)
        layers = []
        for i in range(cfg.n_layers):
            layer = Block()
            for where in layer_places:
                _put(layer, where, params["layers"][where.param.name][i], cfg)
            layers.append(layer)
        self.model.layers = nnx.List(layers)

    def layer_leaves(self, layer: Block) -> Params:
        """One layer as :func:`model.run_layers` takes it: arrays, and :class:`_Product` handles for matmuls."""
        cfg, out = self.config, {}
        for where in places(cfg)[0]:
            leaf = find(layer, where)
            out[where.param.name] = _Product(leaf, tuple(where.param.shape(cfg))) if where.linear else leaf.value
        return out

    def __call__(self, input_tokens: jax.Array, positions: jax.Array | None = None, cache: Any = None,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
        if cache is not None:
            raise ValueError("solarjax.nnx.CausalLM keeps no KV cache: pass cache=None")
        cfg = self.config
        if positions is None:
            positions = model.default_positions(input_tokens, None)
        x = model.embed({"embed": self.model.embed_tokens.weight.value}, input_tokens, cfg)
        layers = tuple(self.layer_leaves(layer) for layer in self.model.layers)
        x, _, _ = model.run_layers(layers, x, positions, cfg, mask_attention(cfg, positions, attention_mask))
        if cfg.tie_embeddings:
            heads = {"embed": self.model.embed_tokens.weight.value, "final_norm": self.model.norm.weight.value}
            return model.lm_head(heads, x, cfg), None
        x = model.norm(x, self.model.norm.weight.value, cfg)
        return self.lm_head(x).astype(jnp.float32), None


def mask_attention(cfg: ModelConfig, positions: jax.Array, attention_mask: jax.Array | None) -> model.Attend:
    """The :data:`model.Attend` of a caller's (batch, q, kv) boolean mask, each attention kind's
    window applied on top; without a mask, solarjax's own causal attention."""
    if attention_mask is None:
        return model.sequence_attention(cfg, positions, None)
    impl, scale = attn.mask_path(cfg.attention), model.attention_scale(cfg)
    masks = [attention_mask[:, None].astype(bool) & model.attention_mask(positions, positions, None, None,
                                                                         cfg.kind_window(k))
             for k in range(cfg.n_kinds)]

    def attend(kind, layer_index, q, k, v, cache):
        return attn.masked_attention(q, k, v, masks[kind], impl, scale), cache

    return attend


# ----------------------------------------------------------------------------- conversion


def from_params(params: Params, cfg: ModelConfig) -> CausalLM:
    """solarjax params (layers stacked on axis 0) -> the NNX model holding the same values."""
    return CausalLM(params, cfg)


def params_from_pure_dict(pure: dict, cfg: ModelConfig) -> Params:
    """``nnx.to_pure_dict(nnx.state(m, nnx.Param))`` of a :class:`CausalLM` -> solarjax params, bit-exact."""
    layer_places, global_places = places(cfg)

    def read(node: dict, where: Place) -> jax.Array:
        for name in where.path:
            node = node[name]
        return jnp.asarray(node[where.attr])

    out: Params = {w.param.name: read(pure, w).reshape(w.param.shape(cfg)) for w in global_places}
    layers = pure["model"]["layers"]
    out["layers"] = {w.param.name: jnp.stack([read(layers[i], w) for i in range(cfg.n_layers)])
                     .reshape((cfg.n_layers, *w.param.shape(cfg))) for w in layer_places}
    return out


def to_params(module: CausalLM) -> Params:
    """The NNX model -> solarjax params (its LoRA adapters, if any, left out: see :func:`merge_lora`)."""
    return params_from_pure_dict(nnx.to_pure_dict(nnx.state(module, nnx.Param)), module.config)


def merge_lora(module: CausalLM, alpha: float) -> Params:
    """solarjax params with every Qwix LoRA adapter folded into its kernel: ``kernel + a @ b * alpha / rank``
    (Qwix's LoRA product for a 2-D kernel; rank is ``a``'s last dim), ready for :func:`solarjax.hf.save_hf`."""

    def fold(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: fold(v) for k, v in node.items()}
        if "kernel_lora_a" in node:
            kernel, a, b = node.pop("kernel"), node.pop("kernel_lora_a"), node.pop("kernel_lora_b")
            delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * (alpha / a.shape[-1])
            node["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        return node

    return params_from_pure_dict(fold(nnx.to_pure_dict(nnx.state(module, nnx.Param))), module.config)


def dequantized_params(module: CausalLM) -> Params:
    """solarjax params of a Qwix PTQ model: every quantized kernel replaced by its dequantized values
    (``qwix.dequantize``), to score or export what the quantized model computes."""
    import qwix

    pure = nnx.to_pure_dict(nnx.state(module))
    for path, sub in module.iter_modules():
        if isinstance(sub, Linear) and not isinstance(sub.kernel, nnx.Param):
            node = pure
            for name in path:
                node = node[name]
            node["kernel"] = qwix.dequantize(sub.kernel.array)
    return params_from_pure_dict(pure, module.config)
