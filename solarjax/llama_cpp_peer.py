"""llama.cpp as the peer in CPU latency tables: load a GGUF through llama-cpp-python and time it.

Used by ``solarjax bench latency --llama-cpp TYPES`` and ``bench/generate.py``'s ``llama_cpp_*``
sides, so both time llama.cpp the same way solarjax is timed: prefill is one batch-1 ``eval`` of the
prompt (a fresh context each time), decode is ``(t(N) - t(1)) / (N - 1)`` of greedy ``generate``
calls. llama-cpp-python is optional (``pip install llama-cpp-python``); without it the caller gets
one :class:`PeerError` line.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


class PeerError(ValueError):
    """llama.cpp cannot be run as asked (not installed, or the file does not load)."""


@contextlib.contextmanager
def _no_repack(capi) -> Iterator[None]:
    """Load with weight repacking off: llama.cpp's repacked (AMX) int8 weights segfault on
    multi-token batches on these VMs (its CLI's ``--no-repack``)."""
    defaults = capi.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:
        yield
    finally:
        capi.llama_model_default_params = defaults


def load(path: str | os.PathLike, *, n_ctx: int, threads: int | None = None, n_batch: int = 512):
    """A ``llama_cpp.Llama`` for ``path`` on ``threads`` threads (default: the CPUs this process may use)."""
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as capi
    except ImportError as err:
        raise PeerError("llama.cpp rows need llama-cpp-python: pip install llama-cpp-python") from err
    n_threads = threads or len(os.sched_getaffinity(0))
    with _no_repack(capi):
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads,
                                   n_threads_batch=n_threads, verbose=False)
        except ValueError as err:
            raise PeerError(f"llama.cpp cannot load {path}: {err}") from err


def greedy(llm, prompt: Sequence[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (no repeat penalty), from a fresh context."""
    llm.reset()
    out = []
    for token in llm.generate(list(prompt), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(path: str | os.PathLike, prompt_lens: Sequence[int], new_tokens: int, repeats: int = 3,
            threads: int | None = None, seed: int = 0) -> tuple[dict[int, float], float]:
    """(prefill ms per prompt length, decode ms/token) of the GGUF at ``path``, batch 1, random prompt ids."""
    import numpy as np

    llm = load(path, n_ctx=max(prompt_lens) + new_tokens + 8, threads=threads)
    rng = np.random.default_rng(seed)
    prefill = {}
    for length in prompt_lens:
        prompt = rng.integers(3, llm.n_vocab(), length).tolist()

        def run() -> None:
            llm.reset()
            llm.eval(prompt)

        run()  # warm-up
        prefill[length] = best_ms(run, repeats)
    prompt = rng.integers(3, llm.n_vocab(), prompt_lens[0]).tolist()
    greedy(llm, prompt, new_tokens)  # warm-up
    one = best_ms(lambda: greedy(llm, prompt, 1), repeats)
    many = best_ms(lambda: greedy(llm, prompt, new_tokens), repeats)
    return prefill, max(many - one, 0.0) / (new_tokens - 1)


def placeholder_tokenizer(directory: Path) -> Path:
    """A 256-token byte-level BPE (255 bytes and one merge: llama.cpp refuses a byte-level vocabulary
    without merges) for random-weight models, whose GGUF needs some vocabulary; the exporter pads it
    to the model's vocabulary size with placeholder tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())[:255])}
    tok = Tokenizer(models.BPE(vocab={**vocab, "ab": 255}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory
