"""Scoring text with the model: log-likelihoods, sliding-window perplexity, offline MMLU.

Everything reduces to one primitive, :func:`loglikelihoods` over ``(context ids, continuation
ids)`` pairs, the same request shape lm-eval-harness uses. Perplexity windows and multiple-choice
answers are such pairs, so the lm-eval adapter, ``solarjax eval ppl`` and ``solarjax eval mmlu``
share one batched, jit-compiled scorer (one compile per (batch, length bucket)).

Batches are left-padded like generation (segment 0 for padding, positions counting real
tokens), so the last column of every row is a real token and the single-token-continuation
shortcut (one forward per distinct context, e.g. the four answer letters of a question) is a
gather of the last logits.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solarjax import quant as Q
from solarjax.config import ModelConfig
from solarjax.generate import bucket, left_pad
from solarjax.model import Params

Request = tuple[Sequence[int], Sequence[int]]


class EvalError(ValueError):
    """Evaluation input that cannot be scored; the message names the file, line or argument."""


# ----------------------------------------------------------------------------- compiled scorers


LOGIT_CHUNK = 128  # positions per vocabulary projection: caps logits memory at B x 128 x V


@functools.partial(jax.jit, static_argnames=("cfg",))
def _target_logprobs(params: Params, tokens, positions, segments, targets, cfg: ModelConfig):
    """(B, T) log p(targets[t] | tokens[:t+1]) and whether each target is the argmax.

    The head runs over chunks of positions, so a (batch, 1024, 49152) float32 logits tensor is
    never materialized at once.
    """
    x = Q.hidden_states(params, tokens, cfg, positions=positions, segment_ids=segments)
    batch, length, width = x.shape
    chunk = LOGIT_CHUNK if length % LOGIT_CHUNK == 0 else length

    def score(args):
        xc, tc = args
        logits = Q.lm_head(params, xc, cfg)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tc

    xs = x.reshape(batch, length // chunk, chunk, width).swapaxes(0, 1)
    ts = targets.reshape(batch, length // chunk, chunk).swapaxes(0, 1)
    logp, hit = jax.lax.map(score, (xs, ts))
    return logp.swapaxes(0, 1).reshape(batch, length), hit.swapaxes(0, 1).reshape(batch, length)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_logprobs(params: Params, tokens, positions, segments, cfg: ModelConfig):
    """(B, V) log-softmax of the final column only: the head runs on one position per row."""
    x = Q.hidden_states(params, tokens, cfg, positions=positions, segment_ids=segments)
    return jax.nn.log_softmax(Q.lm_head(params, x[:, -1:], cfg)[:, 0], axis=-1)


def check_positive(**values: int | None) -> None:
    """Raise ``EvalError`` naming the first limit that is given but below 1 (batch size, window, ...)."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvalError(f"{name} must be a positive integer, got {value!r}")


def _batches(order: list[int], batch_size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def _pad_rows(rows: list[Sequence[int]], batch_size: int, length: int):
    """Left-pad to (batch_size, length), filling missing rows with one-token dummies (fixed shapes)."""
    rows = list(rows) + [[0]] * (batch_size - len(rows))
    return left_pad(rows, length)


def loglikelihoods(
    params: Params,
    cfg: ModelConfig,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy decode)`` per request.

    Inputs longer than ``max_length`` (default ``cfg.max_seq_len``) keep their last tokens, as
    lm-eval does. Requests whose continuation is one token are grouped by context and cost one
    forward per distinct context.
    """
    check_positive(batch_size=batch_size, max_length=max_length)
    max_length = max_length or cfg.max_seq_len
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    single: dict[tuple[int, ...], list[int]] = OrderedDict()
    multi: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        if len(cont) == 0:
            raise EvalError(f"request {i} has an empty continuation: nothing to score")
        if len(ctx) == 0:
            raise EvalError(f"request {i} has an empty context; prepend a BOS/EOS token to score from the start")
        for t in (*ctx, *cont):
            if not 0 <= t < cfg.vocab_size:
                raise EvalError(f"request {i} holds token id {t}, outside the vocabulary (size {cfg.vocab_size})")
        if len(cont) == 1:
            single.setdefault(tuple(ctx)[-max_length:], []).append(i)
        else:
            multi.append(i)

    bar = None
    if progress:
        from solarjax.progress import progress_bar

        bar = progress_bar(total=len(single) + len(multi), desc="scoring", unit="seq")

    contexts = list(single)
    order = sorted(range(len(contexts)), key=lambda j: -len(contexts[j]))
    for chunk in _batches(order, batch_size):
        rows = [contexts[j] for j in chunk]
        tokens, segments, positions = _pad_rows(rows, batch_size, bucket(len(rows[0])))
        logp = np.asarray(_last_logprobs(params, tokens, positions, segments, cfg=cfg))
        for r, j in enumerate(chunk):
            greedy = int(np.argmax(logp[r]))
            for i in single[contexts[j]]:
                t = requests[i][1][0]
                results[i] = (float(logp[r, t]), greedy == t)
        if bar is not None:
            bar.update(len(chunk))

    seqs = {i: (list(requests[i][0]) + list(requests[i][1]))[-(max_length + 1):] for i in multi}
    order = sorted(multi, key=lambda i: -len(seqs[i]))
    for chunk in _batches(order, batch_size):
        length = bucket(len(seqs[chunk[0]]) - 1)
        tokens, segments, positions = _pad_rows([seqs[i][:-1] for i in chunk], batch_size, length)
        targets, _, _ = _pad_rows([seqs[i][1:] for i in chunk], batch_size, length)
        logp, hit = _target_logprobs(params, tokens, positions, segments, targets, cfg=cfg)
        logp, hit = np.asarray(logp), np.asarray(hit)
        for r, i in enumerate(chunk):
            n = min(len(requests[i][1]), len(seqs[i]) - 1)
            results[i] = (float(logp[r, -n:].sum()), bool(hit[r, -n:].all()))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------- perplexity


@dataclasses.dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood, nats
    tokens: int  # predicted tokens
    documents: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens, "documents": self.documents}


def window_requests(ids: Sequence[int], window: int, stride: int) -> list[Request]:
    """Split one document into sliding windows as in transformers' perplexity guide.

    Each window of ``window`` tokens starts ``stride`` after the previous one and scores only the
    tokens no earlier window scored, so every token after the first is predicted exactly once,
    with up to ``window - stride`` tokens of extra context.
    """
    if not 0 < stride <= window:
        raise EvalError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    requests: list[Request] = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        n = min(end - prev_end, end - begin - 1)
        if n > 0:
            requests.append((ids[begin:end - n], ids[end - n:end]))
        prev_end = end
        if end == len(ids):
            break
    return requests


def perplexity(
    params: Params,
    cfg: ModelConfig,
    documents: Sequence[Sequence[int]],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Perplexity:
    """Token-level perplexity over token-id documents, each scored on its own (first token as context).

    ``window`` defaults to ``min(cfg.max_seq_len, 1024)`` and ``stride`` to ``window // 2``.
    """
    check_positive(window=window, stride=stride, batch_size=batch_size)
    if window is not None and window < 2:
        raise EvalError(f"window must be at least 2 tokens (one of context, one to score), got {window}")
    window = window or min(cfg.max_seq_len, 1024)
    stride = stride or max(window // 2, 1)
    requests = [r for doc in documents for r in window_requests(list(doc), window, stride)]
    scores = loglikelihoods(params, cfg, requests, batch_size=batch_size, max_length=window, progress=progress)
    return Perplexity(nll=-sum(s for s, _ in scores), tokens=sum(len(c) for _, c in requests),
                      documents=len(documents))


def text_perplexity(params: Params, cfg: ModelConfig, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> Perplexity:
    """:func:`perplexity` of raw texts, tokenized with a ``tokenizers.Tokenizer``."""
    docs = [ids for ids in (tokenizer.encode(t).ids for t in texts) if len(ids) > 1]
    if not docs:
        raise EvalError("no text with at least two tokens to score")
    return perplexity(params, cfg, docs, **kwargs)


# ----------------------------------------------------------------------------- MMLU (offline)

LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: str  # gold letter

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)


def mmlu_file() -> Path:
    """The MMLU dev questions that ship inside lm-eval (its chain-of-thought few-shot prompts)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("the MMLU questions ship with lm-eval: pip install --no-deps lm-eval")
    return Path(spec.submodule_search_locations[0]) / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"


_CHOICES_RE = re.compile(r"^(.*)\(A\)(.*?)\(B\)(.*?)\(C\)(.*?)\(D\)(.*)$", re.S)
_ANSWER_RE = re.compile(r"answer is \(?([ABCD])\)")


def parse_mmlu_prompts(subject: str, text: str) -> list[MCQuestion]:
    """Questions of one subject's CoT prompt (``Q: ... (A) .. (D) ..\\nA: ... The answer is (X).``).

    Items that are not four-way (one has five options) are skipped.
    """
    questions = []
    for block in re.split(r"\n\n(?=Q: )", text.strip())[1:]:
        q, sep, rationale = block[3:].partition("\nA:")
        match = _CHOICES_RE.match(q)
        answers = _ANSWER_RE.findall(rationale)
        if not sep or not match or not answers or "(E)" in match.group(5):
            continue
        choices = tuple(c.strip() for c in match.groups()[1:])
        questions.append(MCQuestion(subject, match.group(1).strip(), choices, answers[-1]))
    return questions


def load_mmlu(subjects: Sequence[str] | None = None, path: str | os.PathLike | None = None) -> list[MCQuestion]:
    """MMLU questions with gold letters, subject by subject (about 5 per subject, 57 subjects)."""
    path = Path(path) if path is not None else mmlu_file()
    if not path.is_file():
        raise FileNotFoundError(f"MMLU prompt file {path} does not exist")
    prompts = json.loads(path.read_text(encoding="utf-8"))
    if subjects:
        unknown = sorted(set(subjects) - set(prompts))
        if unknown:
            raise EvalError(f"unknown MMLU subjects {unknown}; known: {sorted(prompts)}")
    names = list(subjects) if subjects else sorted(prompts)
    return [q for name in names for q in parse_mmlu_prompts(name, prompts[name])]


def format_mmlu(q: MCQuestion, shots: Sequence[MCQuestion] = ()) -> str:
    """lm-eval's MMLU prompt: subject header, optional solved examples, then ``Answer:``."""
    subject = q.subject.replace("_", " ")

    def body(x: MCQuestion) -> str:
        options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, x.choices))
        return f"{x.question}{options}\nAnswer:"

    examples = "".join(f"{body(s)} {s.answer}\n\n" for s in shots)
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n{examples}{body(q)}"


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, split as lm-eval does (encode the whole, cut at the context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    ctx = tokenizer.encode(context).ids
    return ctx, whole[len(ctx):]


def _interleave(questions: list[MCQuestion]) -> list[MCQuestion]:
    """Round-robin over subjects so that a ``limit`` takes a spread of subjects, not the first few."""
    by_subject: dict[str, list[MCQuestion]] = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    out, groups = [], list(by_subject.values())
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


@dataclasses.dataclass
class MMLUResult:
    accuracy: float
    correct: int
    total: int
    per_subject: dict[str, tuple[int, int]]  # subject -> (correct, total)
    predictions: list[str]  # predicted letter per question, in the order scored

    @property
    def stderr(self) -> float:
        return math.sqrt(self.accuracy * (1 - self.accuracy) / max(self.total, 1))

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "stderr": self.stderr, "correct": self.correct, "total": self.total,
                "chance": 0.25}


def mmlu_accuracy(
    params: Params,
    cfg: ModelConfig,
    tokenizer: Any,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    *,
    shots: int = 0,
    batch_size: int = 8,
    progress: bool = False,
    questions: Sequence[MCQuestion] | None = None,
) -> MMLUResult:
    """Multiple-choice accuracy on the offline MMLU questions, scored by log-likelihood.

    Each question is lm-eval's MMLU prompt; the prediction is the letter (`` A`` .. `` D``) with
    the highest log-probability. ``limit`` keeps that many questions, taken round-robin across
    subjects; ``shots`` prepends that many other solved questions of the same subject.
    """
    check_positive(limit=limit, batch_size=batch_size)
    if shots < 0:
        raise EvalError(f"shots must be 0 or more, got {shots}")
    pool = list(questions) if questions is not None else load_mmlu(subjects)
    chosen = _interleave(pool)[:limit] if limit else _interleave(pool)
    if not chosen:
        raise EvalError("no MMLU questions selected")
    by_subject: dict[str, list[MCQuestion]] = defaultdict(list)
    for q in pool:
        by_subject[q.subject].append(q)
    requests: list[Request] = []
    for q in chosen:
        examples = [s for s in by_subject[q.subject] if s is not q][:shots]
        context = format_mmlu(q, examples)
        requests.extend(encode_pair(tokenizer, context, f" {letter}") for letter in LETTERS)
    scores = loglikelihoods(params, cfg, requests, batch_size=batch_size, progress=progress)
    per_subject: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    predictions = []
    for n, q in enumerate(chosen):
        logps = [s for s, _ in scores[4 * n:4 * n + 4]]
        predicted = LETTERS[int(np.argmax(logps))]
        predictions.append(predicted)
        per_subject[q.subject][0] += predicted == q.answer
        per_subject[q.subject][1] += 1
    correct = sum(c for c, _ in per_subject.values())
    return MMLUResult(correct / len(chosen), correct, len(chosen), {k: tuple(v) for k, v in per_subject.items()},
                      predictions)


def eval_suite(
    params: Params,
    cfg: ModelConfig,
    tokenizer: Any,
    held_out: Sequence[str],
    *,
    mmlu_limit: int | None = None,
    mmlu_subjects: Sequence[str] | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out perplexity plus offline MMLU in one flat dict (what the demo and ablations tabulate).

    Keys: ``loss``, ``ppl``, ``tokens`` (held-out text) and ``mmlu_acc``, ``mmlu_stderr``, ``mmlu_n``.
    ``mmlu_limit=0`` skips MMLU.
    """
    ppl = text_perplexity(params, cfg, tokenizer, held_out, window=window, stride=stride, batch_size=batch_size,
                          progress=progress)
    out: dict[str, Any] = {"loss": ppl.loss, "ppl": ppl.ppl, "tokens": ppl.tokens}
    if mmlu_limit != 0:
        mmlu = mmlu_accuracy(params, cfg, tokenizer, mmlu_subjects, mmlu_limit, batch_size=batch_size,
                             progress=progress)
        out.update(mmlu_acc=mmlu.accuracy, mmlu_stderr=mmlu.stderr, mmlu_n=mmlu.total)
    return out
