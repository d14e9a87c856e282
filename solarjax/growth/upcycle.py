"""Sparse upcycling (Komatsuzaki et al., 2023): a dense checkpoint becomes a Mixture of Experts.

Every layer's gated MLP is copied into E experts and a router is added, so a dense Llama or
Mistral becomes a Mixtral (the same attention, :mod:`solarjax.moe`'s MLP with renormalised top-k
weights). With identical experts the top-k weights sum to one and the upcycled model computes the
dense model's function exactly at step 0; training then makes the experts diverge. Options:

- ``noise``: multiplicative (``w * (1 + noise * eps)``) or, with ``noise_kind="add"``, additive
  (``w + noise * eps``) Gaussian noise on every expert weight, drawn per expert, to break symmetry;
- ``reinit_fraction``: in each expert, that fraction of the hidden units (a gate column, an up
  column and a down row each) is re-drawn from a normal with the dense matrix's own per-layer
  standard deviation (a trained checkpoint's scale, not the random init's);
- ``router_std``: the router is drawn from a normal with this std, or zeros when 0 (uniform
  probabilities; ``top_k`` then breaks the tie towards the lowest expert indices);
- ``split`` (fine-grained experts, OLMoE / Qwen-MoE style, scaled down): the dense hidden units are
  cut into ``split`` slices of ``ffn_dim / split`` units, expert ``e`` holds slice ``e % split`` and
  its down projection is multiplied by ``split``, so a token routed to one copy of every slice with
  equal weights (``experts_per_token == split``; a zero router does exactly that) gets the dense
  output. Such models have ``moe_ffn_dim != ffn_dim`` and cannot be saved as ``MixtralForCausalLM``.
  The equivalence is fragile: it holds only while routing picks one copy of every slice. Measured
  on SmolLM2-135M (16 experts top-4 of 4 slices, zero router, ``solarjax ablate --equal-flops``):
  held-out loss 3.98 at step 0 as the dense model, 7.35 after 6 steps, 5.20 after 20 (dense: 3.51).

Noise and re-initialisation are applied after the copy (re-drawn units first, then noise on all).
Like :func:`solarjax.growth.dus.upscale_params`, :func:`upcycle` runs under ``jax.jit`` and keeps each
leaf on the devices (mesh axes) of the dense leaf it came from. Depth up-scaling works on the
stacked layers of an MoE as well, so the two combine in either order; a *growth spec* chains
steps with ``+`` (``"solar:m=8+upcycle:experts=8,k=2"``), and :func:`solarjax.growth.grow` applies one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from solarjax.config import ConfigError, ModelConfig

Params = dict[str, Any]

UPCYCLABLE = ("llama", "mistral")  # dense families whose layer is Mixtral's with a dense MLP
WHY_NOT = {
    "qwen2": "its q/k/v projections have biases",
    "qwen3": "its attention has q/k norms",
    "gemma3": "its layers have GeGLU, sandwich norms and (1 + w) norm weights",
    "mixtral": "it is already a Mixture of Experts",
    "olmoe": "it is already a Mixture of Experts",
    "qwen3_moe": "it is already a Mixture of Experts",
    "qwen2_moe": "it is already a Mixture of Experts",
}
EXPERT_LEAVES = ("w_gate", "w_up", "w_down")
NOISE_KINDS = ("mult", "add")


@dataclasses.dataclass(frozen=True)
class Upcycling:
    """How to turn each dense MLP into experts (see the module docstring for every option)."""

    n_experts: int
    experts_per_token: int
    noise: float = 0.0
    noise_kind: str = "mult"
    reinit_fraction: float = 0.0
    router_std: float = 0.02
    split: int = 1

    def check(self) -> None:
        if not _positive_int(self.n_experts) or self.n_experts < 2:
            raise ConfigError(f"upcycle: experts={self.n_experts!r} must be an integer >= 2")
        if not _positive_int(self.experts_per_token) or self.experts_per_token > self.n_experts:
            raise ConfigError(f"upcycle: k={self.experts_per_token!r} must be an integer in [1, experts={self.n_experts}]")
        if not _positive_int(self.split) or self.n_experts % self.split:
            raise ConfigError(f"upcycle: split={self.split!r} must be a positive integer dividing experts={self.n_experts} "
                              "(every slice of the dense MLP needs the same number of copies)")
        if self.noise_kind not in NOISE_KINDS:
            raise ConfigError(f"upcycle: noise kind {self.noise_kind!r} is not one of {NOISE_KINDS}")
        for name in ("noise", "router_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"upcycle: {name}={value!r} must be a finite number >= 0")
        if not isinstance(self.reinit_fraction, (int, float)) or not 0 <= self.reinit_fraction <= 1:
            raise ConfigError(f"upcycle: reinit={self.reinit_fraction!r} must be a fraction in [0, 1]")


def upcycled_config(cfg: ModelConfig, how: Upcycling) -> ModelConfig:
    """The Mixtral config of ``cfg`` upcycled (no arrays); one ConfigError line for what cannot be."""
    how.check()
    if cfg.arch not in UPCYCLABLE:
        why = WHY_NOT.get(cfg.arch, "its layer is not Llama's")
        raise ConfigError(f"cannot upcycle arch={cfg.arch!r} into a Mixtral (Llama attention + MoE MLP): {why}; "
                          f"upcycling takes {' or '.join(UPCYCLABLE)}")
    if cfg.ffn_dim % how.split:
        raise ConfigError(f"upcycle: split={how.split} does not divide ffn_dim={cfg.ffn_dim}")
    return cfg.replace(arch="mixtral", n_experts=how.n_experts, experts_per_token=how.experts_per_token,
                       norm_topk_prob=True, moe_ffn_dim=None if how.split == 1 else cfg.ffn_dim // how.split)


def upcycle(cfg: ModelConfig, params: Params, n_experts: int, experts_per_token: int, *, noise: float = 0.0,
            noise_kind: str = "mult", reinit_fraction: float = 0.0, router_std: float = 0.02, split: int = 1,
            key: Any = None) -> tuple[ModelConfig, Params]:
    """``(moe_cfg, moe_params)``: each layer's MLP copied into ``n_experts`` experts, top-``experts_per_token``.

    ``key`` (a ``jax.random`` key; default ``key(0)``) draws the noise, re-drawn units and router.
    Runs under ``jax.jit``; sharded inputs stay on their devices (the experts axis is replicated).
    """
    import jax

    how = Upcycling(n_experts, experts_per_token, noise, noise_kind, reinit_fraction, router_std, split)
    moe_cfg = upcycled_config(cfg, how)
    layers = params["layers"]
    missing = [k for k in EXPERT_LEAVES if k not in layers]
    if missing:
        raise ConfigError(f"upcycle: params['layers'] has no dense MLP leaves {missing}")
    key = jax.random.key(0) if key is None else key
    shardings = {name: _sharding(leaf, name, moe_cfg) for name, leaf in layers.items()}
    shardings["w_router"] = _sharding(layers["w_gate"], "w_router", moe_cfg)
    build = jax.jit(lambda tree, k: _upcycle_layers(tree, k, moe_cfg, how), out_shardings=shardings)
    return moe_cfg, {**params, "layers": build(layers, key)}


def _upcycle_layers(layers: Params, key: Any, moe_cfg: ModelConfig, how: Upcycling) -> Params:
    """The traced body of :func:`upcycle`: copy (slice), re-draw, add noise, add the router."""
    import jax
    import jax.numpy as jnp

    n_layers, d, f = layers["w_gate"].shape
    fe, e = f // how.split, how.n_experts
    slice_of = jnp.arange(e) % how.split  # expert e holds slice e mod split
    k_reinit, k_noise, k_router = jax.random.split(key, 3)
    units = _reinit_mask(k_reinit, (n_layers, e, fe), how.reinit_fraction)  # (L, E, fe): units to re-draw
    out = {name: leaf for name, leaf in layers.items() if name not in EXPERT_LEAVES}
    for i, name in enumerate(EXPERT_LEAVES):
        dense = layers[name].astype(jnp.float32)
        down = name == "w_down"
        # (L, d, f) -> (L, split, d, fe) and (L, f, d) -> (L, split, fe, d), then one slice per expert
        sliced = (dense.reshape(n_layers, how.split, fe, d) if down
                  else jnp.moveaxis(dense.reshape(n_layers, d, how.split, fe), 2, 1))
        experts = jnp.take(sliced, slice_of, axis=1)
        if down and how.split > 1:
            experts = experts * how.split
        if units is not None:
            mask = units[:, :, :, None] if down else units[:, :, None, :]
            std = jnp.std(dense, axis=(1, 2))[:, None, None, None] * (how.split if down else 1)
            fresh = std * jax.random.normal(jax.random.fold_in(k_reinit, i), experts.shape, jnp.float32)
            experts = jnp.where(mask, fresh, experts)
        if how.noise:
            eps = jax.random.normal(jax.random.fold_in(k_noise, i), experts.shape, jnp.float32)
            experts = experts * (1 + how.noise * eps) if how.noise_kind == "mult" else experts + how.noise * eps
        out[name] = experts.astype(layers[name].dtype)
    dtype = layers["w_gate"].dtype
    out["w_router"] = (how.router_std * jax.random.normal(k_router, (n_layers, d, e), jnp.float32)).astype(dtype) \
        if how.router_std else jnp.zeros((n_layers, d, e), dtype)
    return out


def _reinit_mask(key: Any, shape: tuple[int, int, int], fraction: float):
    """Exactly ``round(fraction * units)`` of each expert's hidden units, chosen at random (None: none)."""
    import jax
    import jax.numpy as jnp

    count = round(fraction * shape[-1])
    if not count:
        return None
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(key, shape), axis=-1), axis=-1)
    return rank < count


def _sharding(leaf: Any, name: str, moe_cfg: ModelConfig):
    """The dense leaf's ``NamedSharding`` carried to the upcycled leaf (experts axis replicated; a mesh
    axis on a dim that no longer divides is dropped), or None (let XLA choose)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    spec = list(sharding.spec) + [None] * (leaf.ndim - len(sharding.spec))
    n, e, f = leaf.shape[0], moe_cfg.n_experts, moe_cfg.expert_ffn_dim
    if name == "w_router":  # from w_gate (L, d, f): keep the layer and embed axes
        spec, shape = spec[:2] + [None], (n, leaf.shape[1], e)
    elif name in EXPERT_LEAVES:
        spec = [spec[0], None, *spec[1:]]
        shape = (n, e, f, leaf.shape[2]) if name == "w_down" else (n, e, leaf.shape[1], f)
    else:
        return sharding
    for dim, axes in enumerate(spec):
        names = axes if isinstance(axes, tuple) else (axes,) if axes is not None else ()
        if shape[dim] % math.prod(sharding.mesh.shape[a] for a in names):
            spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


# ----------------------------------------------------------------------------- growth specs

# spec key -> (Upcycling field, type); "upcycle:experts=8,k=2,noise=0.01"
SPEC_KEYS = {"experts": ("n_experts", int), "k": ("experts_per_token", int), "noise": ("noise", float),
             "add_noise": ("noise", float), "reinit": ("reinit_fraction", float), "router": ("router_std", float),
             "split": ("split", int)}
SPEC_EXAMPLE = "upcycle:experts=8,k=2[,noise=0.01|add_noise=0.01][,reinit=0.5][,router=0.02|0][,split=4]"


def parse_upcycle_spec(spec: str) -> Upcycling:
    """``"upcycle:experts=8,k=2,noise=0.01"`` (or its arguments alone) -> :class:`Upcycling`, checked."""
    text = spec.strip().replace(" ", "")
    args = text.split(":", 1)[1] if text.startswith("upcycle:") else text
    values: dict[str, Any] = {}
    for item in filter(None, args.split(",")):
        name, eq, raw = item.partition("=")
        if not eq or name not in SPEC_KEYS:
            raise ConfigError(f"upcycle spec {spec!r}: bad argument {item!r}; write {SPEC_EXAMPLE}")
        field, kind = SPEC_KEYS[name]
        if field in values:
            raise ConfigError(f"upcycle spec {spec!r}: {field} given twice")
        try:
            values[field] = kind(raw)
        except ValueError as err:
            raise ConfigError(f"upcycle spec {spec!r}: {name}={raw!r} is not {'an integer' if kind is int else 'a number'}") \
                from err
        if name == "add_noise":
            values["noise_kind"] = "add"
    if "n_experts" not in values or "experts_per_token" not in values:
        raise ConfigError(f"upcycle spec {spec!r} needs experts= and k=; write {SPEC_EXAMPLE}")
    how = Upcycling(**values)
    how.check()
    return how
