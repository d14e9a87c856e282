"""Autoregressive generation with a preallocated, layer-stacked KV cache.

The cache is one ``(layers, batch, slots, kv_heads, head_dim)`` array for keys and one for values,
carried through the model's one layer loop (:func:`solarjax.model.run_layers`, the loop training
runs) and written in place; only the ``attend`` step handed to it is generation's. Every slot also records the
*position* and *segment* of the token it holds; attention is masked with the model's own
``attention_mask`` (causal by position, same segment, sliding window), which makes left-padded
batches and Mistral's sliding window work without special cases: pads are segment 0, real tokens
segment 1, and positions count real tokens only. Params in the decode layout
(:func:`solarjax.decode_layout.unstack_layers`, what ``solarjax generate`` uses) run the same loop
unrolled over per-layer arrays instead of the scan.

Shapes are rounded up to buckets so a prompt of 37 tokens and one of 50 share a compiled
program: prefill is compiled once per (batch, prompt bucket, cache length) and the decode loop
once per (batch, cache length, new-token bucket, top_k).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solarjax import attention as attn
from solarjax import model as M
from solarjax import quant as Q
from solarjax.config import ModelConfig
from solarjax.model import Params

EMPTY_POSITION = 2**30  # position of a slot nothing was written to: never causally visible


class GenerationError(ValueError):
    """A generation request that cannot run as asked; the message names the argument."""


# ----------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, *, dtype: str | None = None,
               progress: bool = False):
    """``(cfg, params, tokenizer)`` from any model ``solarjax.loading`` reads: an HF directory, a
    ``.gguf``, a solarjax Orbax checkpoint, a training run or one of its steps.

    The tokenizer is ``tokenizer`` (a ``tokenizer.json`` file or a directory holding one) when
    given, else the model's own (a GGUF's, a run's), else ``None`` (callers that need text raise).
    """
    from solarjax import loading

    return loading.load(path, tokenizer, dtype=dtype, progress=progress)


def tokenizer_config(path: str | os.PathLike) -> tuple[dict[str, Any], Path | None]:
    """The ``tokenizer_config.json`` of any model (inside a GGUF, or beside its tokenizer: a run's,
    a step's) and the directory it came from; ``({}, None)`` when it has none."""
    from solarjax import loading

    source = loading.detect(path)
    if source.kind == "gguf":
        from solarjax.gguf import load_gguf_tokenizer

        return json.loads(load_gguf_tokenizer(source.weights).hf_files().get("tokenizer_config.json", "{}")), None
    directory = source.tokenizer_dir
    if directory is None or not (directory / "tokenizer_config.json").is_file():
        return {}, directory
    from solarjax.safetensors_io import read_json

    return read_json(directory / "tokenizer_config.json"), directory


def require_tokenizer(tokenizer: Any, path: Any) -> Any:
    if tokenizer is None:
        raise GenerationError(f"no tokenizer.json in {path}; pass --tokenizer FILE_OR_DIR")
    return tokenizer


# ----------------------------------------------------------------------------- the cache


class KVCache(NamedTuple):
    k: jax.Array  # (L, B, S, K, hd)
    v: jax.Array  # (L, B, S, K, hd)
    positions: jax.Array  # (B, S) int32; EMPTY_POSITION where nothing is written yet
    segments: jax.Array  # (B, S) int32; 1 real token, 0 padding or empty


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of ``length`` slots per row, in the compute dtype."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, cfg.compute_dtype),
        v=jnp.zeros(shape, cfg.compute_dtype),
        positions=jnp.full((batch, length), EMPTY_POSITION, jnp.int32),
        segments=jnp.zeros((batch, length), jnp.int32),
    )


def cache_length(cfg: ModelConfig, columns: int, ring: bool | None = None) -> int:
    """Slots a cache needs for ``columns`` token columns: the sliding window when that is shorter.

    A query at position p sees keys at positions p - window + 1 .. p, so a ring of ``window``
    slots (column c lives in slot c mod window) holds everything a sliding-window model can see;
    memory stays bounded however long generation runs. ``ring=False`` forces the full cache.
    """
    if ring is False or cfg.ring_window is None:  # a model with full layers (Gemma 3) needs every column
        return columns
    return min(columns, cfg.ring_window)


def _decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None) -> jax.Array:
    """One query column against the cache, grouped-query, in the cache's own (B, S, KV, D) layout.

    The same product as ``jax.nn.dot_product_attention``, written so the query groups ride
    along each KV head: on CPU that one saves a transposed copy of every layer's cache per step.
    """
    batch, _, n_heads, head_dim = q.shape
    groups = n_heads // k.shape[2]
    qg = q.reshape(batch, k.shape[2], groups, head_dim)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(attn.score_scale(head_dim, scale))
    scores = jnp.where(mask[:, :, 0, None, :], scores, jnp.finfo(jnp.float32).min)  # mask (B, 1, 1, S)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgs,bskd->bkgd", probs, v).reshape(q.shape)


def forward_cached(
    params: Params,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    segments: jax.Array,
    index: jax.Array | int,
    cfg: ModelConfig,
    last_only: bool = False,
    *,
    fresh: bool = False,
    unroll: int | bool = 1,
) -> tuple[jax.Array, KVCache]:
    """Run ``tokens`` (B, T) as cache columns ``index..index+T``; returns fp32 logits and the cache.

    Column c is stored in slot ``c mod S`` (S = cache slots), so a cache shorter than the
    sequence is a ring buffer: right for sliding-window models when S >= window. Attention is
    masked by the positions and segments each slot records (causal, same segment, window).

    One token (decode): keys and values are written into the layer-stacked cache carried through
    the layer loop (an in-place ``dynamic_update_slice``), then the query attends to the cache.
    Several tokens (prefill): queries attend to the cache plus the new keys (only the new keys
    when ``fresh``: the cache is empty and ``index`` is 0), then the new columns are written.
    ``last_only`` computes logits for the final column only; ``unroll`` unrolls the layer scan.
    Params may be quantized (:mod:`solarjax.quant`): each layer is dequantized in the loop body.
    """
    index = jnp.asarray(index, jnp.int32)
    length, n_tokens = cache.k.shape[2], tokens.shape[1]
    positions, segments = positions.astype(jnp.int32), segments.astype(jnp.int32)
    impl, scale = attn.mask_path(cfg.attention), M.attention_scale(cfg)
    if n_tokens == 1:
        slot = index % length
        kv_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, slot, axis=1)
        kv_seg = jax.lax.dynamic_update_slice_in_dim(cache.segments, segments, slot, axis=1)
        masks = M.attention_masks(positions, kv_pos, segments, kv_seg, cfg)

        def attend(kind, i, q, k, v, kv):  # write the column into layer i's cache, attend to the cache
            at = (i, jnp.int32(0), slot, jnp.int32(0), jnp.int32(0))
            k_all, v_all = (jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), at) for c, new in
                            zip(kv, (k, v)))
            k_l, v_l = (jax.lax.dynamic_index_in_dim(c, i, keepdims=False).astype(q.dtype) for c in (k_all, v_all))
            mask = M.pick(masks, kind)
            out = attn.masked_attention(q, k_l, v_l, mask, impl, scale) if impl == "reference" else \
                _decode_attention(q, k_l, v_l, mask, scale)
            return out, (k_all, v_all)
    else:
        kv_pos = _write_columns(cache.positions, positions, index, fresh)
        kv_seg = _write_columns(cache.segments, segments, index, fresh)
        if fresh:
            masks = M.attention_masks(positions, positions, segments, segments, cfg)
        else:
            masks = M.attention_masks(positions, jnp.concatenate([cache.positions, positions], axis=1), segments,
                                      jnp.concatenate([cache.segments, segments], axis=1), cfg)

        def attend(kind, i, q, k, v, kv):  # attend to layer i's cache and the new keys, then write them
            k_att, v_att = k, v
            if not fresh:
                k_att, v_att = (jnp.concatenate([jax.lax.dynamic_index_in_dim(c, i, keepdims=False).astype(new.dtype),
                                                 new], axis=1) for c, new in zip(kv, (k, v)))
            out = attn.masked_attention(q, k_att, v_att, M.pick(masks, kind), impl, scale)
            return out, tuple(_write_layer_columns(c, i, new, index, fresh) for c, new in zip(kv, (k, v)))

    x, (k_all, v_all), _ = M.run_layers(params["layers"], Q.embed(params, tokens, cfg), positions, cfg, attend,
                                        (cache.k, cache.v), unroll=unroll)
    if last_only:
        x = x[:, -1:]
    return Q.lm_head(params, x, cfg), KVCache(k_all, v_all, kv_pos, kv_seg)


def _write_columns(old: jax.Array, new: jax.Array, index: jax.Array, fresh: bool) -> jax.Array:
    """``new``'s columns ``index..index+T`` (axis 1) written to slots ``c mod S`` of ``old`` (B, S, ...).

    A ring keeps only the last S columns. ``fresh`` (``index`` is 0): static slices (a scatter is
    slow on CPU)."""
    n, length = new.shape[1], old.shape[1]
    if fresh:
        if n <= length:
            return jax.lax.dynamic_update_slice_in_dim(old, new, 0, axis=1)
        tail = jax.lax.slice_in_dim(new, n - length, n, axis=1)  # every slot is overwritten
        return jnp.roll(tail, (n - length) % length, axis=1)
    keep = min(n, length)
    slots = (index + jnp.arange(n - keep, n, dtype=jnp.int32)) % length
    return old.at[:, slots].set(jax.lax.slice_in_dim(new, n - keep, n, axis=1))


def _write_layer_columns(stack: jax.Array, i: Any, new: jax.Array, index: jax.Array, fresh: bool) -> jax.Array:
    """:func:`_write_columns` of layer ``i``'s keys or values (B, T, K, hd) into the (L, B, S, K, hd) cache."""
    new = new.astype(stack.dtype)
    if fresh and new.shape[1] <= stack.shape[2]:  # in place: one dynamic_update_slice
        return jax.lax.dynamic_update_slice(stack, new[None], (i, 0, 0, 0, 0))
    layer = jax.lax.dynamic_index_in_dim(stack, i, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(stack, _write_columns(layer, new, index, fresh), i, axis=0)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad token lists to ``length``: (tokens, segments 0/1, positions counting real tokens)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segments = np.zeros((len(prompts), length), np.int32)
    for row, ids in enumerate(prompts):
        if len(ids):
            tokens[row, length - len(ids):] = ids
            segments[row, length - len(ids):] = 1
    positions = np.cumsum(segments, axis=1, dtype=np.int32) - 1
    return tokens, segments, positions


# ----------------------------------------------------------------------------- sampling


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int = 0,
                  top_p: jax.Array | float = 1.0, sampling: bool | None = None) -> jax.Array:
    """Next tokens (B,) from logits (B, V): greedy when ``temperature`` is 0, else filtered sampling.

    ``top_k`` is static (``lax.top_k`` needs it); temperature and top_p are traced so changing
    them does not recompile. ``sampling`` (static) picks the branch at trace time, so a greedy
    decode loop holds no conditional (on a GPU a ``cond`` costs a device-to-host copy per token);
    left ``None``, a traced ``cond`` on ``temperature > 0`` picks it.
    """

    def sample() -> jax.Array:
        x = logits / jnp.maximum(temperature, 1e-6)
        neg = jnp.finfo(x.dtype).min
        if top_k > 0:
            kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][..., -1:]
            x = jnp.where(x < kth, neg, x)
        # nucleus: keep the smallest set of tokens whose probability mass reaches top_p
        desc = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, neg, x)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    def greedy() -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if sampling is None:  # a real branch, so greedy decoding never pays for the vocabulary sort
        return jax.lax.cond(temperature > 0, sample, greedy)
    return sample() if sampling else greedy()


# ----------------------------------------------------------------------------- prefill + decode


class DecodeState(NamedTuple):
    cache: KVCache
    token: jax.Array  # (B,) last sampled token, fed at the next step
    position: jax.Array  # (B,) its position
    index: jax.Array  # () its cache column
    done: jax.Array  # (B,) hit a stop token
    key: jax.Array


class Sampler(NamedTuple):
    """The traced knobs of one generate call (changing them does not recompile)."""

    temperature: jax.Array
    top_p: jax.Array
    stop_ids: jax.Array  # fixed-size, padded with -1
    pad_id: jax.Array


class Static(NamedTuple):
    """What a compiled program is specialised on (hashable: a static jit argument)."""

    cfg: ModelConfig
    cache_len: int
    n_bucket: int
    top_k: int
    sampling: bool
    unroll: int | bool


def _prefill(params, tokens, segments, positions, key, sampler: Sampler, static: Static) -> DecodeState:
    cache = init_cache(static.cfg, tokens.shape[0], static.cache_len)
    logits, cache = forward_cached(params, cache, tokens, positions, segments, 0, static.cfg, last_only=True,
                                   fresh=True)
    key, sub = jax.random.split(key)
    token = sample_logits(logits[:, -1], sub, sampler.temperature, static.top_k, sampler.top_p, static.sampling)
    return DecodeState(cache, token, positions[:, -1], jnp.int32(tokens.shape[1]), jnp.isin(token, sampler.stop_ids),
                       key)


def _step(params, state: DecodeState, sampler: Sampler, static: Static) -> DecodeState:
    """Feed ``state.token``, sample the next one; finished rows emit ``pad_id``."""
    position = state.position + 1
    logits, cache = forward_cached(params, state.cache, state.token[:, None], position[:, None],
                                   jnp.ones_like(position)[:, None], state.index, static.cfg, last_only=True,
                                   unroll=static.unroll)
    key, sub = jax.random.split(state.key)
    token = sample_logits(logits[:, -1], sub, sampler.temperature, static.top_k, sampler.top_p, static.sampling)
    token = jnp.where(state.done, sampler.pad_id, token)
    done = state.done | jnp.isin(token, sampler.stop_ids)
    return DecodeState(cache, token, position, state.index + 1, done, key)


def _generate(params, tokens, segments, positions, key, max_new, sampler: Sampler, static: Static) -> jax.Array:
    """Prefill and every decode step in one program: one dispatch, no host round-trip per token.

    The decode steps run in a ``while_loop`` whose carry holds the cache, so XLA updates it in
    place; the loop ends at ``max_new`` tokens or as soon as every row has hit a stop token.
    Returns (B, n_bucket) tokens, ``pad_id`` past each row's end.
    """
    state = _prefill(params, tokens, segments, positions, key, sampler, static)
    out = jnp.full((tokens.shape[0], static.n_bucket), sampler.pad_id, jnp.int32).at[:, 0].set(state.token)

    def cond(carry):
        i, _, st = carry
        return (i < max_new) & ~jnp.all(st.done)

    def body(carry):
        i, out, st = carry
        st = _step(params, st, sampler, static)
        return i + 1, jax.lax.dynamic_update_slice_in_dim(out, st.token[:, None], i, axis=1), st

    _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, state))
    return out


_prefill_jit = jax.jit(_prefill, static_argnames=("static",))
_step_jit = jax.jit(_step, static_argnames=("static",), donate_argnames=("state",))
_generate_jit = jax.jit(_generate, static_argnames=("static",))


def bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a compile bucket: powers of two up to 512, then multiples of 512."""
    n = max(n, minimum)
    if n <= 512:
        return 1 << (n - 1).bit_length()
    return -(-n // 512) * 512


TRUNCATE_CHOICES = ("none", "left")


def fit_context(prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig,
                truncate: str = "none") -> list[list[int]]:
    """Prompts that leave room for ``max_new_tokens`` in the model's context (``cfg.max_seq_len``).

    Too long is an error naming the lengths, unless ``truncate="left"``, which keeps the last
    ``max_seq_len - max_new_tokens`` tokens of each prompt (the end is what a continuation needs).
    """
    if truncate not in TRUNCATE_CHOICES:
        raise GenerationError(f"truncate must be one of {TRUNCATE_CHOICES}, got {truncate!r}")
    room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {cfg.max_seq_len} tokens (max_seq_len)")
    longest = max(len(p) for p in prompts)
    if longest <= room:
        return [list(p) for p in prompts]
    if truncate == "left":
        return [list(p)[-room:] for p in prompts]
    raise GenerationError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                          f"context of {cfg.max_seq_len} tokens (max_seq_len); shorten it or truncate from the "
                          "left (--truncate left)")


def default_unroll(cfg: ModelConfig) -> int | bool:
    """Unroll the decode step's layer scan on accelerators (one fused program per token, no
    per-layer loop overhead); on CPU the loop is cheap and unrolling only lengthens compiles."""
    return True if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") and cfg.n_layers <= 96 else 1


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    on_token: Callable[[np.ndarray], bool | None] | None = None,
    truncate: str = "none",
    ring: bool | None = None,
    unroll: int | bool | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt (token-id lists, batched with left padding).

    Returns the new tokens of each row, ending with the stop token when one was produced.
    ``temperature=0`` is greedy. Without ``on_token`` the whole generation is one compiled
    program. ``on_token`` streams: it is called with the (B,) tokens of every step (finished
    rows give ``pad_id``) and switches to one compiled step per token (slower: a host round-trip
    each); it may return True to end generation early (e.g. a stop string appeared).
    ``truncate="left"`` cuts over-long prompts instead of raising; a sliding-window model keeps
    a ring-buffer cache of ``window`` slots unless ``ring=False``; params may be int8
    (:func:`solarjax.quant.quantize_params`).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (got an empty prompt or no prompts)")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise GenerationError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                              f"(got {temperature}, {top_p}, {top_k})")
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (size {cfg.vocab_size})")
    prompts = fit_context(prompts, max_new_tokens, cfg, truncate)
    p_len = bucket(max(len(p) for p in prompts))
    n_bucket = bucket(max_new_tokens, 32)
    tokens, segments, positions = left_pad(prompts, p_len, pad_id)
    stops = list(stop_tokens)
    stop_ids = jnp.asarray(stops + [-1] * (-len(stops) % 8 or (0 if stops else 8)), jnp.int32)  # fixed shape
    sampler = Sampler(jnp.float32(temperature), jnp.float32(top_p), stop_ids, jnp.int32(pad_id))
    static = Static(cfg, cache_length(cfg, p_len + n_bucket, ring), n_bucket, top_k, temperature > 0,
                    default_unroll(cfg) if unroll is None else unroll)
    key = jax.random.key(seed)
    if on_token is None:
        out = np.asarray(_generate_jit(params, tokens, segments, positions, key, jnp.int32(max_new_tokens), sampler,
                                       static=static))
    else:
        state = _prefill_jit(params, tokens, segments, positions, key, sampler, static=static)
        steps = [np.asarray(state.token)]
        stop = on_token(steps[-1])
        while not stop and len(steps) < max_new_tokens and not bool(np.all(state.done)):
            state = _step_jit(params, state, sampler, static=static)
            steps.append(np.asarray(state.token))
            stop = on_token(steps[-1])
        out = np.stack(steps, axis=1)
    stop_set = set(int(s) for s in stops)
    results = []
    for row in out[:, :max_new_tokens].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        results.append(row[:end])
    return results


def generate_text(
    params: Params,
    cfg: ModelConfig,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    stop_strings: Sequence[str] = (),
    stream: Callable[[str], None] | None = None,
    skip_special_tokens: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Text in, completions out (a ``tokenizers.Tokenizer``); cuts each at the first stop string.

    ``stream`` (batch of one only) receives each newly decoded piece of text as it is produced;
    stop tokens default to the config's EOS. Other keyword arguments go to :func:`generate`.
    """
    if stream is not None and len(prompts) != 1:
        raise GenerationError("streaming prints one completion; pass a single prompt or no stream callback")
    ids = [tokenizer.encode(p).ids for p in prompts]
    if "stop_tokens" not in kwargs:
        kwargs["stop_tokens"] = [cfg.eos_token_id] if cfg.eos_token_id is not None else []
    on_token: Callable[[np.ndarray], bool] | None = None
    if stream is not None:
        seen: list[int] = []
        printed = [""]

        def stream_piece(tokens: np.ndarray) -> bool:
            seen.append(int(tokens[0]))
            full = tokenizer.decode(seen, skip_special_tokens=skip_special_tokens)
            text = cut_at_stop(full, stop_strings)
            # a byte-level BPE token can end mid-character: wait for the rest before printing
            if text == full and text.endswith("\ufffd"):
                return False
            # hold back a tail that may be the start of a stop string
            hold = max((len(s) - 1 for s in stop_strings if s), default=0) if text == full else 0
            upto = max(len(text) - hold, len(printed[0]))
            stream(text[len(printed[0]):upto])
            printed[0] = text[:upto]
            return text != full

        on_token = stream_piece
    outs = generate(params, cfg, ids, on_token=on_token, **kwargs)
    texts = [cut_at_stop(tokenizer.decode(o, skip_special_tokens=skip_special_tokens), stop_strings) for o in outs]
    if stream is not None and len(texts[0]) > len(printed[0]):
        stream(texts[0][len(printed[0]):])  # the held-back tail when no stop string came
    return texts


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of ``stop_strings``."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def chat_prompt(model: str | os.PathLike, user_message: str, system: str | None = None,
                tokenizer: str | os.PathLike | None = None) -> str:
    """Render the chat template of ``tokenizer`` (a tokenizer file or directory) when given, else the
    model's (``tokenizer_config.json``, ``chat_template.jinja`` or the GGUF).

    Instruct models answer far better inside their template; it renders in the same sandbox as
    SFT's (``solarjax.data.ChatTemplate``, as transformers does): one user turn, generation prompt.
    """
    from solarjax.data import chat_template_from, load_chat_template

    if tokenizer is not None:
        template = load_chat_template(tokenizer)
    else:
        config, directory = tokenizer_config(model)
        template = load_chat_template(directory) if directory is not None else chat_template_from(config, model)
    if template is None:
        raise GenerationError(f"{tokenizer or model} has no chat template (tokenizer_config.json or "
                              "chat_template.jinja)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
    return template.render(messages, add_generation_prompt=True)
