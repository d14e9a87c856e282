"""Attention kernels by backend: no (T, T) mask or score tensor on TPU and GPU.

``cfg.attention`` picks the implementation; ``"auto"`` (the default) resolves per backend:

- **TPU: Pallas splash attention** (``jax.experimental.pallas.ops.tpu.splash_attention``), the
  kernel MaxText trains with. Causal or Mistral's local window as a lazily evaluated block mask,
  packed documents as ``SegmentIds``, GQA natively (K/V heads are never repeated). Inside a mesh
  it runs per shard in ``shard_map`` (batch over the data axes, heads over ``tensor``).
- **GPU: cuDNN flash attention** through ``jax.nn.dot_product_attention`` with ``is_causal`` and
  ``local_window_size``. Packed documents use cuDNN's *packed layout* (per-row segment lengths and
  offsets) rather than the Pallas Triton kernel: cuDNN is the faster kernel on Hopper, handles
  GQA and the sliding window in the same call, and the packed layout costs only two small
  ``(B, max_segments)`` int arrays. Its one price is a static bound on documents per row
  (``cfg.max_segments``); a row with more is a runtime error, never a silent merge.
  cuDNN needs half precision, so on a GPU ``auto`` with fp32 compute runs XLA attention.
- **CPU: XLA** (``jax.nn.dot_product_attention(implementation="xla")`` over a boolean mask), as
  before: at CPU shapes the mask is small and this path is the fastest there.

Every implementation is one row of :data:`IMPLEMENTATIONS` (name -> the platforms it runs on,
fused or mask-taking, the function); config validation (``ATTENTION_IMPLS``), :func:`resolve` and
the model's layer loop all read that table, so a new kernel is one function and one row here.
Explicit choices stay available; asking for a kernel the backend does not have is a
``ConfigError``, not a silent fallback. Pallas kernels run
on CPU only inside :func:`kernels_interpreted` (tests: the real kernel in interpret mode).

The fused paths take causality by *index* within a segment; the mask path takes it by
*position*. They agree whenever positions count up by one inside every segment, which holds for
every batch solarjax builds (packing, SFT, DPO, eval); KV-cache decoding uses the mask path.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from solarjax.errors import ConfigError


def score_scale(head_dim: int, scale: float | None) -> float:
    """What multiplies the scores: ``scale`` when the model sets one (Gemma), else ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("pallas_interpret", default=False)


@contextlib.contextmanager
def kernels_interpreted() -> Iterator[None]:
    """Run Pallas kernels (splash) in interpret mode on CPU: the real kernel, slowly, for tests."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def interpreting() -> bool:
    """Inside :func:`kernels_interpreted`: Pallas TPU kernels may run interpreted off TPU."""
    return _INTERPRET.get()


def resolve(impl: str, dtype: jnp.dtype, backend: str | None = None) -> str:
    """The concrete implementation for ``impl`` on ``backend`` (default: JAX's default backend).

    ``auto`` is the first fused kernel of :data:`IMPLEMENTATIONS` that runs on ``backend`` with
    ``dtype`` (splash on TPU, cuDNN on an NVIDIA GPU in half precision), else ``xla``."""
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        return next((name for name, entry in IMPLEMENTATIONS.items()
                     if entry.fused and entry.runs_on(backend) and (half or not entry.half_only)), "xla")
    entry = IMPLEMENTATIONS.get(impl)
    if entry is None:
        raise ConfigError(f"attention={impl!r} is not one of {ATTENTION_IMPLS}")
    if not entry.runs_on(backend) and not (entry.interpretable and _INTERPRET.get()):
        raise ConfigError(f"attention={impl!r} {entry.hardware} and the backend is {backend!r}; "
                          "use attention='auto' (or 'xla')")
    if entry.half_only and not half:
        raise ConfigError(f"attention={impl!r} needs bf16/fp16 compute, the model computes in {jnp.dtype(dtype)}; "
                          "set dtype='bfloat16' or attention='auto'")
    return impl


def mask_path(impl: str) -> str:
    """The implementation that runs where attention needs an explicit mask (KV-cache prefill and
    decode, quantized eval): ``impl`` itself when it takes a mask, ``xla`` for ``auto`` and the
    fused kernels (they have no masked form)."""
    entry = IMPLEMENTATIONS.get(impl)
    return impl if entry is not None and not entry.fused else "xla"


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str,
                     scale: float | None = None) -> jax.Array:
    """Grouped-query attention over (batch, seq, heads, head_dim) tensors with an explicit boolean
    mask, by :func:`mask_path` of ``impl``. ``scale`` multiplies the scores (default ``1 / sqrt(head_dim)``)."""
    return IMPLEMENTATIONS[mask_path(impl)].fn(q, k, v, mask, scale)


def xla_attention(q, k, v, mask, scale: float | None = None):
    """``jax.nn.dot_product_attention``'s XLA path over a boolean mask (CPU training, decoding)."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def reference_attention(q, k, v, mask, scale: float | None = None):
    """Plain einsum attention in float32: the readable oracle for the fused paths."""
    groups = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, groups, axis=2)
    v = jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqnh,bknh->bnqk", q.astype(jnp.float32), k.astype(jnp.float32))
    scores = scores * jnp.float32(score_scale(q.shape[-1], scale))
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v.astype(jnp.float32)).astype(q.dtype)


# ----------------------------------------------------------------------------- TPU: splash


def _block(seq: int) -> int:
    """The largest of MaxText's tile sizes dividing ``seq`` (a multiple of 128, the lane width)."""
    return next(block for block in (512, 256, 128) if seq % block == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, heads: int, window: int | None, interpret: bool):
    """Build (and cache: the mask's block structure is computed in NumPy) a splash kernel."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        base = sa.CausalMask((seq, seq))
    else:
        base = sa.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
    b = _block(seq)
    # The fused backward computes dq, dk, dv in one pass over the blocks (the separate dq kernel
    # would recompute the scores a third time).
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to reuse across traces
        return sa.make_splash_mha(sa.MultiHeadMask([base] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret, residual_checkpoint_name="attn_lse")


def _splash_local(q, k, v, segment_ids, window: int | None, interpret: bool, scale: float | None = None):
    """Splash on one shard: (B, T, H, D) in and out, batch by ``vmap``.

    The kernel tiles by multiples of 128, so a shorter or ragged sequence is padded at the end;
    causality keeps every real query away from the padding, and the padded rows are cut off.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, seq, heads, head_dim = q.shape
    padded = -(-seq // 128) * 128
    kernel = _splash_kernel(padded, heads, window, interpret)
    q = q * jnp.asarray(score_scale(head_dim, scale), q.dtype)  # the kernel does not scale

    def heads_first(x):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - seq), (0, 0))) if padded != seq else x

    if segment_ids is None:
        out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v))
    else:
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - seq)), constant_values=-1)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(q=s, kv=s)))(
            heads_first(q), heads_first(k), heads_first(v), segment_ids)
    return jnp.swapaxes(out[:, :, :seq], 1, 2)


def platform_of(batch_sharding=None) -> str:
    """The platform the traced program targets: the mesh's devices (TPU when compiling ahead of time
    for a TPU topology on a CPU host), else JAX's default backend."""
    if batch_sharding is not None:
        return batch_sharding.mesh.devices.flat[0].platform
    return jax.default_backend()


def splash_attention(q, k, v, segment_ids, window: int | None, batch_sharding=None, scale: float | None = None):
    """Causal (or windowed) splash attention with segment ids; ``shard_map`` over ``batch_sharding``'s mesh.
    ``scale`` multiplies the scores (default ``1 / sqrt(head_dim)``)."""
    interpret = _INTERPRET.get() or platform_of(batch_sharding) != "tpu"
    local = functools.partial(_splash_local, window=window, interpret=interpret, scale=scale)
    if batch_sharding is None:
        return local(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    mesh, batch_axes = batch_sharding.mesh, batch_sharding.spec[0]
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and k.shape[2] % tensor == 0 else None
    qkv_spec = P(batch_axes, None, heads, None)
    seg_spec = P(batch_axes, None)
    if segment_ids is None:
        fn = lambda q, k, v: local(q, k, v, None)  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)


# ----------------------------------------------------------------------------- GPU: cuDNN


def packed_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Segment ids (B, T) -> cuDNN's packed layout: lengths (B, M), offsets (B, M + 1), count (B,).

    Every run of equal ids is one segment, padding (id 0) included, so padded positions attend
    among themselves like the mask path does, and no row is ever fully masked (no NaN). Unused
    entries are -1, as ``cudnn`` documents.
    """
    batch, seq = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

    def row(start_row):
        begin = jnp.nonzero(start_row, size=max_segments, fill_value=-1)[0].astype(jnp.int32)
        following = jnp.concatenate([begin[1:], jnp.full((1,), -1, jnp.int32)])
        end = jnp.where(following >= 0, following, seq)
        lengths = jnp.where(begin >= 0, end - begin, -1)
        return lengths, jnp.concatenate([begin, jnp.full((1,), -1, jnp.int32)])

    lengths, offsets = jax.vmap(row)(starts)
    return lengths, offsets, jnp.sum(starts, axis=1, dtype=jnp.int32)


def _raise_if_too_many(count: np.ndarray, max_segments: int) -> None:
    worst = int(np.max(count))
    if worst > max_segments:
        raise ValueError(f"a batch row holds {worst} packed documents but cfg.max_segments={max_segments} "
                         "(cuDNN's packed layout needs a static bound); raise model.max_segments")


def checked_packed_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """:func:`packed_layout` plus a host check that no row has more than ``max_segments`` documents.

    Computed once per forward (outside the layer scan), so the check costs one scalar per step.
    """
    lengths, offsets, count = packed_layout(segment_ids, max_segments)
    jax.debug.callback(functools.partial(_raise_if_too_many, max_segments=max_segments), jnp.max(count))
    return lengths, offsets


def cudnn_attention(q, k, v, packed: tuple[jax.Array, jax.Array] | None, window: int | None,
                    scale: float | None = None):
    """cuDNN flash attention: causal (+ window); cuDNN's packed layout when ``packed`` is given.
    ``scale`` multiplies the scores (default ``1 / sqrt(head_dim)``)."""
    local_window = None if window is None else (window - 1, 0)
    if packed is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local_window, scale=scale,
                                            implementation="cudnn")
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    lengths, offsets = packed
    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                 kv_offsets=offsets, scale=score_scale(q.shape[-1], scale),
                                 mask_type=MaskType.PADDING_CAUSAL, sliding_window_length=window)


# ----------------------------------------------------------------------------- dispatch


def fused_attention_fn(segment_ids: jax.Array | None, *, impl: str, window: int | None, max_segments: int,
                       batch_sharding=None, scale: float | None = None
                       ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``(q, k, v) -> out``: causal self-attention over whole sequences with a fused kernel.

    Whatever depends only on the batch (cuDNN's packed layout) is computed here, once, and shared
    by every layer. ``scale`` multiplies the scores (default ``1 / sqrt(head_dim)``; Gemma's
    ``query_pre_attn_scalar ** -0.5``).
    """
    entry = IMPLEMENTATIONS.get(impl)
    if entry is None or not entry.fused:
        raise ConfigError(f"no fused attention kernel {impl!r}; fused kernels: {FUSED}")
    return entry.fn(segment_ids, window=window, max_segments=max_segments, batch_sharding=batch_sharding,
                    scale=scale)


def _splash_fn(segment_ids, *, window, max_segments, batch_sharding, scale):
    del max_segments  # splash takes segment ids as they are
    return lambda q, k, v: splash_attention(q, k, v, segment_ids, window, batch_sharding, scale)


def _cudnn_fn(segment_ids, *, window, max_segments, batch_sharding, scale):
    del batch_sharding  # cuDNN runs under XLA's partitioner
    packed = None if segment_ids is None else checked_packed_layout(segment_ids, max_segments)
    return lambda q, k, v: cudnn_attention(q, k, v, packed, window, scale)


def fused_attention(q, k, v, segment_ids, *, impl: str, window: int | None, max_segments: int,
                    batch_sharding=None, scale: float | None = None):
    """One call of :func:`fused_attention_fn` (tests, checks)."""
    return fused_attention_fn(segment_ids, impl=impl, window=window, max_segments=max_segments,
                              batch_sharding=batch_sharding, scale=scale)(q, k, v)


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One attention implementation: where it runs and how the layer loop calls it.

    ``fused``: a kernel that is causal by itself and takes segment ids (never a mask); ``fn`` is
    built once per forward, ``fn(segment_ids, window=, max_segments=, batch_sharding=, scale=)
    -> (q, k, v) -> out`` (:func:`fused_attention_fn`). Otherwise ``fn(q, k, v, mask, scale) -> out``
    over an explicit boolean mask (:func:`masked_attention`), which is also what KV-cache decoding takes.
    """

    platforms: tuple[str, ...] | None  # JAX platforms it runs on; None: every one
    fused: bool
    fn: Callable
    half_only: bool = False  # needs bf16/fp16 compute
    interpretable: bool = False  # a Pallas kernel that also runs off its platform in kernels_interpreted()
    hardware: str = ""  # what it needs, for the error on another platform

    def runs_on(self, backend: str) -> bool:
        return self.platforms is None or backend in self.platforms


IMPLEMENTATIONS: dict[str, Implementation] = {
    "xla": Implementation(None, fused=False, fn=xla_attention),
    "cudnn": Implementation(("gpu", "cuda"), fused=True, fn=_cudnn_fn, half_only=True, hardware="needs an NVIDIA GPU"),
    "splash": Implementation(("tpu",), fused=True, fn=_splash_fn, interpretable=True, hardware="is a TPU kernel"),
    "reference": Implementation(None, fused=False, fn=reference_attention),
}
ATTENTION_IMPLS = ("auto", *IMPLEMENTATIONS)  # what ModelConfig.attention may name
FUSED = tuple(name for name, entry in IMPLEMENTATIONS.items() if entry.fused)
