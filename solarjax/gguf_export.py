"""solarjax params -> a llama.cpp GGUF file (weights, config metadata, tokenizer, chat template).

The inverse of :mod:`solarjax.gguf`: tensor names and the Q/K row permutation come from the same
family spec (``Param.gguf``, ``Family.gguf_permute_qk``, ``gguf_norm_offset``), so reading an
exported file gives the params back. Tensors are written one at a time (info first, then the data
of each tensor as it is produced and quantized), so memory holds one tensor, not the model.

Types (``--dtype``): ``f32`` (lossless), ``f16``, ``bf16``, ``q8_0``, and the 4-bit ``q4_0`` /
``q4_1`` that the ``gguf`` package quantizes in NumPy. As llama.cpp's own converter does, 1-D
tensors (norms, biases) stay F32, and a matrix whose rows do not divide into the type's blocks
falls back to F16 (F32 under ``f32``/``bf16``); for the 4-bit types the embedding and head are
Q8_0, as llama.cpp's quantized releases of small models ship them.

Tokenizers: byte-level BPE (``tokenizer.ggml.model = "gpt2"``: SmolLM, Llama 3, Qwen) with the
pre-tokenizer named from the ``tokenizer.json`` structure, and SentencePiece-style BPE with byte
fallback (``"llama"``: Mistral, Gemma), whose merge order becomes token scores. The chat template
and the special tokens come from ``tokenizer_config.json`` / ``generation_config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from solarjax.config import ModelConfig
from solarjax.gguf import GGUFError, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, _LLAMA3_SPLIT
from solarjax.model import Params

TOKEN_UNKNOWN, TOKEN_BYTE = 2, 6
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
_ALIASES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# Qwen2's split: Llama 3's with single digits
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def gguf_type(name: str | None) -> str:
    """The canonical GGUF type of a ``--dtype`` value (None: f32); anything else is one line."""
    key = _ALIASES.get((name or "f32").lower(), (name or "f32").lower())
    if key not in GGUF_TYPES:
        raise GGUFError(f"--dtype {name!r} is not a GGUF type solarjax writes; choose one of {', '.join(GGUF_TYPES)}")
    return key


def _quant_type(name: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[name]


def _file_type(name: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[name]


# ----------------------------------------------------------------------------- tensors

class GGUFTensor(NamedTuple):
    """One tensor to write: its GGUF name, numpy (HF-layout) shape, type, and how to produce it."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 in GGUF's numpy layout (HF's)

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved RoPE pairs) from HF's rotate-half halves;
    the inverse of :func:`solarjax.gguf.unpermute_qk`."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def export_architecture(cfg: ModelConfig) -> str:
    """``general.architecture`` for ``cfg``'s family; a family llama.cpp cannot run is one line."""
    from solarjax import families

    family = families.get(cfg.arch)
    if family.moe:
        raise GGUFError(f"GGUF export of the Mixture-of-Experts family {cfg.arch!r} is not supported "
                        "(solarjax writes the dense families: llama, mistral, qwen2, qwen3, gemma3)")
    # llama.cpp runs every Q/K-permuted family (Llama, Mistral) as its "llama" architecture
    arch = family.gguf_architecture or ("llama" if family.gguf_permute_qk else None)
    if arch is None:
        raise GGUFError(f"family {cfg.arch!r} has no llama.cpp architecture")
    return arch


def _tensor_type(name: str, shape: tuple[int, ...], want: str):
    from gguf import GGML_QUANT_SIZES

    if len(shape) == 1:
        return _quant_type("f32")
    if want in ("q4_0", "q4_1") and name in ("token_embd.weight", "output.weight"):
        want = "q8_0"
    qtype = _quant_type(want)
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:  # rows that do not divide into blocks
        return _quant_type("f32" if want in ("f32", "bf16") else "f16")
    return qtype


def gguf_tensors(params: Params, cfg: ModelConfig, want: str) -> list[GGUFTensor]:
    """Every tensor of ``params`` under its llama.cpp name, in the order transformers writes them."""
    from solarjax import families
    from solarjax.hf import hf_shape, hf_tensor, tensor_index

    family = families.get(cfg.arch)
    layer, glob = family.params(cfg)
    by_name = {p.name: p for p in (*layer, *glob)}
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    out = []
    for spec in tensor_index(cfg).values():
        p = by_name[spec.leaf]
        if p.gguf is None:
            raise GGUFError(f"parameter {p.name!r} of family {cfg.arch!r} has no GGUF name")
        name = p.gguf if spec.layer is None else f"blk.{spec.layer}.{p.gguf}"

        def make(spec=spec, p=p) -> np.ndarray:
            w = hf_tensor(params, spec, "float32")
            if family.gguf_permute_qk and p.name in heads:
                w = permute_qk(w, heads[p.name])
            if family.gguf_norm_offset and p.name.endswith("norm"):
                w = w + np.float32(family.gguf_norm_offset)  # llama.cpp stores Gemma's (1 + w)
            return np.ascontiguousarray(w)

        shape = hf_shape(spec, cfg)
        out.append(GGUFTensor(name, shape, _tensor_type(name, shape, want), make))
    return out


# ----------------------------------------------------------------------------- metadata

def _check_exportable(cfg: ModelConfig, arch: str) -> None:
    """Refuse what llama.cpp would run differently, rather than write a file that disagrees with us."""
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") != "linear":
        raise GGUFError(f"RoPE scaling {cfg.rope_scaling.get('rope_type')!r} is not written to GGUF by solarjax "
                        "(linear scaling is)")
    if arch == "gemma3":
        from solarjax.families import gemma3

        if tuple(cfg.resolved_layer_types) != gemma3.llama_cpp_layer_types(cfg.n_layers):
            raise GGUFError("llama.cpp's gemma3 makes every 6th layer a full-attention layer; this model's "
                            "layer_types differ (an up-scaled Gemma 3 re-indexes them), so its GGUF would "
                            "compute another model")
        scalar = float(cfg.query_pre_attn_scalar or cfg.head_dim)
        if scalar != float(cfg.head_dim) or cfg.sliding_rope_theta != gemma3.LLAMA_CPP_LOCAL_THETA:
            raise GGUFError("llama.cpp's gemma3 assumes query_pre_attn_scalar = head_dim and a local RoPE base "
                            f"of 10000; this model has {scalar} and {cfg.sliding_rope_theta}")


def _model_metadata(writer, cfg: ModelConfig, arch: str, want: str, name: str | None) -> None:
    p = f"{arch}."
    writer.add_name(name or f"solarjax {cfg.arch} {cfg.n_layers} layers")
    for key, value in (("context_length", cfg.max_seq_len), ("embedding_length", cfg.d_model),
                       ("block_count", cfg.n_layers), ("feed_forward_length", cfg.ffn_dim),
                       ("attention.head_count", cfg.n_heads), ("attention.head_count_kv", cfg.n_kv_heads),
                       ("attention.key_length", cfg.head_dim), ("attention.value_length", cfg.head_dim),
                       ("rope.dimension_count", cfg.head_dim), ("vocab_size", cfg.vocab_size)):
        writer.add_uint32(p + key, int(value))
    writer.add_float32(p + "rope.freq_base", float(cfg.rope_theta))
    writer.add_float32(p + "attention.layer_norm_rms_epsilon", float(cfg.rms_eps))
    if cfg.rope_scaling is not None:
        writer.add_string(p + "rope.scaling.type", "linear")
        writer.add_float32(p + "rope.scaling.factor", float(cfg.rope_scaling["factor"]))
    if arch == "gemma3":
        writer.add_uint32(p + "attention.sliding_window", int(cfg.sliding_window))
    writer.add_uint32("general.file_type", int(_file_type(want)))
    writer.add_uint32("general.quantization_version", 2)  # GGML_QUANT_VERSION


# ----------------------------------------------------------------------------- tokenizer

def _pre_name(tok: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level ``tokenizer.json``, from its pre-tokenizer."""
    pre = tok.get("pre_tokenizer") or {}
    parts = _parts(pre)
    kinds = [q.get("type") for q in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one llama.cpp names "
                    "(solarjax recognises GPT-2, SmolLM, Llama 3 and Qwen2 splits)")


def _parts(component: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The steps of a ``tokenizer.json`` pre-tokenizer or normalizer (a ``Sequence`` or one step)."""
    component = component or {}
    if component.get("type") != "Sequence":
        return [component]
    return component.get("pretokenizers") or component.get("normalizers") or []


def _sentencepiece_style(tok: dict[str, Any]) -> bool:
    """A SentencePiece-style BPE (``▁`` for spaces, Mistral/Gemma, solarjax's own trained tokenizers),
    as opposed to byte-level BPE (GPT-2 spelling of bytes)."""
    kinds = {p.get("type") for p in _parts(tok.get("pre_tokenizer")) + _parts(tok.get("normalizer"))}
    return bool((tok.get("model") or {}).get("byte_fallback")) or "Metaspace" in kinds


def _prepends_space(tok: dict[str, Any]) -> bool:
    metaspace = [p for p in _parts(tok.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
    if metaspace:
        return metaspace[0].get("prepend_scheme", "always") in ("always", "first")
    return any(p.get("type") == "Prepend" for p in _parts(tok.get("normalizer")))


def _merges(model: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _tokens(tok) -> tuple[list[str], dict[int, Any]]:
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        if not 0 <= i < len(tokens):
            raise GGUFError(f"token ids are not contiguous: {text!r} has id {i} in a vocabulary of {len(tokens)}")
        tokens[i] = text
    return tokens, tok.get_added_tokens_decoder()


def _add_bos(tok_json: dict[str, Any], config: dict[str, Any]) -> bool:
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    post = tok_json.get("post_processor") or {}
    single = post.get("single") or []
    return bool(single) and "SpecialToken" in single[0]


def tokenizer_metadata(writer, directory: Path, cfg: ModelConfig) -> None:
    """Write the tokenizer in ``directory`` (HF files) as GGUF ``tokenizer.*`` metadata."""
    from tokenizers import Tokenizer

    from solarjax.data import chat_template_text, token_text
    from solarjax.safetensors_io import read_json

    def read(name: str) -> dict[str, Any]:
        return read_json(directory / name, GGUFError) if (directory / name).is_file() else {}

    if not (directory / "tokenizer.json").is_file():
        raise GGUFError("the model has no tokenizer.json; a GGUF needs its tokenizer (pass --tokenizer)")
    tok_json, config, generation = read("tokenizer.json"), read("tokenizer_config.json"), read("generation_config.json")
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokens, added = _tokens(tok)
    if len(tokens) > cfg.vocab_size:
        raise GGUFError(f"the tokenizer has {len(tokens)} tokens for a model with vocab_size {cfg.vocab_size}")
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(f"tokenizer model {model.get('type')!r} is not written to GGUF by solarjax (BPE is)")
    types = [TOKEN_NORMAL] * len(tokens)
    for i, token in added.items():
        types[i] = TOKEN_CONTROL if token.special else TOKEN_USER_DEFINED
    merges = _merges(model)
    if _sentencepiece_style(tok_json):  # llama.cpp's SPM tokenizer merges by score
        writer.add_string("tokenizer.ggml.model", "llama")
        writer.add_bool("tokenizer.ggml.add_space_prefix", _prepends_space(tok_json))
        rank = {a.replace(" ", "", 1): -float(r) for r, a in reversed(list(enumerate(merges)))}
        scores = [rank.get(t, -float(len(merges) + 1)) for t in tokens]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = TOKEN_BYTE
        if model.get("unk_token") in tokens:
            types[tokens.index(model["unk_token"])] = TOKEN_UNKNOWN
        writer.add_array("tokenizer.ggml.scores", scores)
    else:
        writer.add_string("tokenizer.ggml.model", "gpt2")
        writer.add_string("tokenizer.ggml.pre", _pre_name(tok_json))
    pad = cfg.vocab_size - len(tokens)  # a model whose table is larger than its vocabulary
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [TOKEN_USER_DEFINED] * pad
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", merges)
    ids = {t: i for i, t in enumerate(tokens)}
    for key, value in (("bos", config.get("bos_token")), ("eos", config.get("eos_token")),
                       ("unknown", config.get("unk_token")), ("padding", config.get("pad_token"))):
        name = token_text(value)
        if name in ids:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", ids[name])
    eos = generation.get("eos_token_id", cfg.eos_token_id)
    if "eos_token" not in config and eos is not None:
        writer.add_uint32("tokenizer.ggml.eos_token_id", int(eos[0] if isinstance(eos, list) else eos))
    writer.add_bool("tokenizer.ggml.add_bos_token", _add_bos(tok_json, config))
    writer.add_bool("tokenizer.ggml.add_eos_token", bool(config.get("add_eos_token", False)))
    jinja = directory / "chat_template.jinja"
    template, _ = chat_template_text(config, directory / "tokenizer_config.json", jinja if jinja.is_file() else None)
    if template:
        writer.add_string("tokenizer.chat_template", template)


# ----------------------------------------------------------------------------- writing

def write_gguf(path: str | os.PathLike, params: Params, cfg: ModelConfig, tokenizer_dir: str | os.PathLike,
               dtype: str | None = None, *, name: str | None = None, progress: bool = False) -> Path:
    """Write ``params`` (and the HF tokenizer files in ``tokenizer_dir``) to the GGUF file ``path``.

    Not atomic by itself: :func:`hf_to_gguf` writes through :class:`solarjax.outputs.atomic_output_file`.
    """
    import gguf
    from gguf.quants import quantize

    want = gguf_type(dtype)
    arch = export_architecture(cfg)
    _check_exportable(cfg, arch)
    tensors = gguf_tensors(params, cfg, want)
    writer = gguf.GGUFWriter(str(path), arch)
    try:
        _model_metadata(writer, cfg, arch, want, name)
        tokenizer_metadata(writer, Path(tokenizer_dir), cfg)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in _progress(tensors, progress):
            data = quantize(t.make(), t.qtype)
            if data.nbytes != t.nbytes:  # the planned layout and the quantizer disagree: never write it
                raise GGUFError(f"tensor {t.name}: {data.nbytes} bytes quantized, {t.nbytes} planned")
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return Path(path)


def _progress(tensors: list[GGUFTensor], progress: bool) -> Iterator[GGUFTensor]:
    if not progress:
        return iter(tensors)
    from solarjax.progress import progress_bar

    return iter(progress_bar(tensors, desc="gguf", unit="tensor"))


def hf_to_gguf(src: str | os.PathLike, dst: str | os.PathLike, dtype: str | None = None, *,
               tokenizer: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = False,
               verb: str = "convert hf-to-gguf") -> Path:
    """Any model solarjax reads (HF directory, GGUF, Orbax checkpoint, training run) -> one GGUF file,
    written atomically with the model's own tokenizer and chat template inside."""
    from solarjax import loading
    from solarjax.outputs import atomic_output_file, scratch_dir

    want = gguf_type(dtype)  # a bad type is named before anything is read
    source = loading.detect(src)
    with atomic_output_file(dst, overwrite=overwrite, sources=(src, tokenizer), verb=verb) as tmp:
        cfg, params, _ = loading.load(source, progress=progress)
        with scratch_dir(dst, "gguf-tokenizer") as files:
            loading.copy_tokenizer(tokenizer or src, files)
            write_gguf(tmp, params, cfg, files, want, progress=progress)
    return Path(dst)
