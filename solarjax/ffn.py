"""The gated feed-forward block: one home for the MLP that dense layers and MoE experts share.

Its own module below both ``solarjax.model`` and ``solarjax.moe`` so that the model imports the
MoE block and the MoE block's shared expert uses this MLP, with imports going one way.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The gate's nonlinearity by a family's ``activation`` name."""
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    raise ValueError(f"activation {name!r} is not implemented")


def mlp(x: jax.Array, w_gate: jax.Array, w_up: jax.Array | None, w_down: jax.Array, activation: str = "silu") -> jax.Array:
    """Gated feed-forward: SwiGLU (``silu``) or GeGLU (``gelu_tanh``). ``w_up=None``: ``w_gate`` is
    the decode layout's fused ``(d, 2·ffn)`` gate-and-up matrix (solarjax.decode_layout).

    Written with ``@`` (the same dot_general as ``einsum("btd,df->btf")``) so a weight object with
    ``__rmatmul__`` computes its own product: :mod:`solarjax.nnx` runs each one in its named submodule."""
    if w_up is None:
        gate, up = jnp.split(x @ w_gate.astype(x.dtype), 2, axis=-1)
    else:
        gate = x @ w_gate.astype(x.dtype)
        up = x @ w_up.astype(x.dtype)
    return (activation_fn(activation)(gate) * up) @ w_down.astype(x.dtype)
