"""Batch-1 CPU decode with int8 weights: an XLA FFI matrix-vector kernel instead of convert + dot.

XLA:CPU turns ``int8 * scale -> dot`` into a float copy of the weight on every decode step, so
weight-only int8 decode read more bytes than fp32 (issue 28). ``cpu_int8_matvec.cc`` multiplies the
int8 weights in registers (AVX-512 or AVX2 chosen at run time, scalar otherwise) for a few rows of
fp32 activations, one XLA thread per call. It is built by ``pip install`` when a C++ compiler is
there (``setup.py``, optional); :func:`available` says whether it loaded, and :func:`int8_matmul`
falls back to the pure-JAX dequantize-and-dot when it did not, off CPU, or for more than
:data:`MAX_ROWS` rows (prefill), where XLA's own matmul is the faster one.

The decode layout's layers (``model.dense_layer``) keep their int8 projections as
:class:`Int8Weight`, which ``h @ w`` sends here; nothing changes for other backends or layouts.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

TARGET = "solarjax_int8_matvec"
DISABLE_ENV = "SOLARJAX_CPU_INT8_KERNEL"
MAX_ROWS = 8  # batch x tokens at or below which the kernel runs (decode); above it XLA's matmul
ISA_NAMES = ("scalar", "avx2", "avx512")
# The decode layout's int8 projections the kernel multiplies in place, with their weight's rank
# (contraction axes first, output channels last: the layout solarjax.quant stores).
KERNEL_LEAVES = {"wqkv": 2, "w_gate_up": 2, "w_down": 2, "wo": 3}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The built kernel, its FFI target registered once; None when it was not built or does not load."""
    spec = importlib.util.find_spec("solarjax.kernels._cpu_int8_matvec")
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.cdll.LoadLibrary(spec.origin)
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SolarjaxInt8Matvec), platform="cpu")
    except (OSError, AttributeError):
        return None
    return lib


def available() -> bool:
    """Whether the C++ kernel is built and registered (it is then used for CPU decode);
    ``SOLARJAX_CPU_INT8_KERNEL=0`` turns it off (read when a program is traced)."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and _library() is not None


def isa() -> str | None:
    """The code path the kernel runs on this CPU (``avx512``, ``avx2`` or ``scalar``); None: not built."""
    lib = _library()
    return None if lib is None else ISA_NAMES[lib.solarjax_int8_matvec_isa()]


def _uses_kernel(x: jax.Array, values: jax.Array) -> bool:
    rows = math.prod(x.shape[:-1])
    return (available() and jax.default_backend() == "cpu" and values.dtype == jnp.int8
            and x.dtype == jnp.float32 and 0 < rows <= MAX_ROWS)


def int8_matmul(x: jax.Array, q: Any) -> jax.Array:
    """``x (..., K) @ (q.values * q.scale)`` with ``q.values`` flattened to ``(K, N)`` (a
    :class:`solarjax.quant.Quantized` leaf: contraction axes first, one scale per output channel):
    ``(..., N)``. The FFI kernel for a few fp32 rows on CPU, else dequantize and dot."""
    k_dim = x.shape[-1]
    values = q.values.reshape(k_dim, -1)
    scale = jnp.asarray(q.scale).reshape(-1)
    if not _uses_kernel(x, values):
        return x @ (values.astype(x.dtype) * scale.astype(x.dtype))
    rows = x.reshape(-1, k_dim)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], values.shape[1]), jnp.float32))(
        rows, values, scale.astype(jnp.float32))
    return out.reshape(*x.shape[:-1], values.shape[1])


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """An int8 projection kept as integers inside a traced layer: ``h @ w`` runs :func:`int8_matmul`.

    It answers the few things the layer functions ask of a weight (``astype``, ``shape``,
    ``reshape``, ``@`` from the right), so ``model.qkv_projection`` and ``ffn.mlp`` need no branch."""

    values: jax.Array
    scale: jax.Array  # broadcastable to values: size 1 on the contraction axes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def astype(self, dtype: Any) -> "Int8Weight":
        if jnp.dtype(dtype) != jnp.float32:
            raise TypeError(f"Int8Weight computes in float32, not {jnp.dtype(dtype)}")
        return self

    def reshape(self, *shape: int) -> "Int8Weight":
        """Flatten the contraction axes (the output axis stays last, so the scale follows)."""
        values = self.values.reshape(*shape)
        return Int8Weight(values, jnp.asarray(self.scale).reshape(-1).reshape((1,) * (values.ndim - 1) + (-1,)))

    def __rmatmul__(self, x: jax.Array) -> jax.Array:
        return int8_matmul(x, self)


def in_place_weights(layer: dict, dtype: Any) -> dict[str, Int8Weight]:
    """The leaves of one decode-layout layer that the kernel multiplies as int8 (empty when it is not
    built, off CPU, for a non-float32 compute dtype, or for the stacked training layout)."""
    if not available() or jax.default_backend() != "cpu" or jnp.dtype(dtype) != jnp.float32 or "wqkv" not in layer:
        return {}
    return {name: Int8Weight(leaf.values, leaf.scale) for name, leaf in layer.items()
            if name in KERNEL_LEAVES and hasattr(leaf, "dense") and leaf.values.ndim == KERNEL_LEAVES[name]
            and leaf.values.dtype == jnp.int8}

