"""One loader for every model solarjax reads: Hugging Face directories, GGUF files, solarjax Orbax
params checkpoints and training run directories.

:func:`detect` says what a path is (one set of markers, one set of messages; a missing path is
reported as missing); :func:`load` returns ``(cfg, params, tokenizer)`` for any of them;
:func:`read_config` gives the config without reading weights; :func:`open_tensors` is the
streaming view by HF tensor name that merging reads one tensor at a time.

A training run directory (``solarjax train/sft/dpo`` with an output directory) holds
``checkpoints/<step>/`` and the whole tokenizer the run used (tokenizer.json, tokenizer_config.json
with its chat template, generation_config.json: :func:`copy_tokenizer`): its latest finished step is
loaded, with that tokenizer. A step directory inside a run finds the run's tokenizer too.

Paths may be URIs (``gs://bucket/run``: Orbax checkpoints and run directories live on GCS on TPU
pods): those are ``etils.epath`` paths, detected by the same markers as local ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from etils import epath

from solarjax.config import ModelConfig
from solarjax.model import Params
from solarjax.safetensors_io import CheckpointError

KINDS = {"hf": "Hugging Face directory", "gguf": "GGUF file", "orbax": "solarjax Orbax checkpoint",
         "run": "training run"}
RUN_CHECKPOINTS = "checkpoints"  # <run>/checkpoints/<step>/, as solarjax.train writes them
AnyPath = Union[Path, epath.Path]  # a local path, or a URI such as gs://bucket/run


@dataclasses.dataclass(frozen=True)
class Source:
    """What a model path is and where its parts are."""

    kind: str  # a key of KINDS
    path: AnyPath  # as named by the user
    weights: AnyPath  # the file or directory holding the weights (for a run: its latest step)
    tokenizer_dir: AnyPath | None  # the directory holding its tokenizer.json (and chat template), if any
    step: int | None = None  # the checkpoint step, for runs and step directories

    @property
    def description(self) -> str:
        return KINDS[self.kind] + (f", step {self.step}" if self.step is not None else "")


def _path(path: str | os.PathLike) -> AnyPath:
    """A URI (``gs://...``) as an ``etils.epath`` path, kept as it is (``ckpt.as_path``); a local path as
    a ``pathlib`` one, as named (the HF and GGUF readers memory-map local files). Both answer
    ``exists``/``is_dir``/``/`` alike, so detection is one code path."""
    text = os.fspath(path)
    if "://" in text:
        from solarjax import ckpt

        return ckpt.as_path(text)
    return Path(text)


def detect(path: str | os.PathLike) -> Source:
    """Classify ``path`` (local or a URI); a path that is none of the four raises one line saying what
    was looked for."""
    path = _path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return Source("gguf", path, path, None)
        raise CheckpointError(f"{path} is a file but not a .gguf; a model is a .gguf file or a directory")
    if (path / "config.json").is_file():
        return Source("hf", path, path, _tokenizer_dir(path))
    from solarjax import ckpt

    if (path / ckpt.PARAMS_ITEM).is_dir() or (path / ckpt.CONFIG_ITEM).is_dir():
        step = int(path.name) if path.name.isdigit() and path.parent.name == RUN_CHECKPOINTS else None
        return Source("orbax", path, path, _tokenizer_dir(path, path.parent.parent if step is not None else None), step)
    steps_dir = path / RUN_CHECKPOINTS if (path / RUN_CHECKPOINTS).is_dir() else path
    steps = ckpt.complete_steps(steps_dir)
    if steps:
        run = path if steps_dir != path else path.parent
        return Source("run", path, steps_dir / str(steps[-1]), _tokenizer_dir(run), steps[-1])
    if steps_dir != path:
        raise CheckpointError(f"{path} is a training run without a finished checkpoint in {steps_dir}")
    raise CheckpointError(f"{path} is not a model: no config.json (Hugging Face), no {ckpt.PARAMS_ITEM}/ "
                          f"(solarjax Orbax checkpoint) and no {RUN_CHECKPOINTS}/ (training run)")


def _tokenizer_dir(*candidates: AnyPath | None) -> AnyPath | None:
    return next((c for c in candidates if c is not None and (c / "tokenizer.json").is_file()), None)


def as_source(path_or_source: str | os.PathLike | Source) -> Source:
    return path_or_source if isinstance(path_or_source, Source) else detect(path_or_source)


def read_config(path: str | os.PathLike | Source) -> ModelConfig:
    """The ``ModelConfig`` of a model, from its metadata only (no weights read)."""
    source = as_source(path)
    if source.kind == "hf":
        from solarjax import hf

        raw = hf.read_hf_config(source.weights)
        return hf.config_from_hf(raw, param_dtype=raw.get("torch_dtype") or raw.get("dtype") or "float32")
    if source.kind == "gguf":
        from solarjax import gguf

        return gguf.config_from_gguf(gguf.open_gguf(source.weights))
    from solarjax import ckpt

    return ckpt.read_config(source.weights)


def check_weights(path: str | os.PathLike | Source, cfg: ModelConfig | None = None) -> None:
    """The weights' own headers agree with the config (HF: every header validated and checked against
    ``config.json``; GGUF: the tensor table against its metadata), reading headers only: what
    ``info`` runs so that an absurd or inconsistent config is refused, not described."""
    source = as_source(path)
    cfg = cfg or read_config(source)
    if source.kind == "hf":
        from solarjax import hf
        from solarjax.safetensors_io import scan

        raw = hf.read_hf_config(source.weights)
        stored = {name: s.shape for name, s in scan(source.weights, hf.header_checker(raw, shapes=False))}
        hf.check_stored_shapes(stored, raw, cfg, str(source.weights))
    elif source.kind == "gguf":
        from solarjax import gguf

        gguf.check_tensor_sizes(gguf.open_gguf(source.weights), cfg)


def load(path: str | os.PathLike | Source, tokenizer: str | os.PathLike | None = None, *, dtype: str | None = None,
         shardings: Any = None, progress: bool = False) -> tuple[ModelConfig, Params, Any]:
    """``(cfg, params, tokenizer)`` from any model path.

    ``dtype`` sets the param dtype (default: as stored; a GGUF dequantizes to float32);
    ``shardings`` places each leaf on a mesh as it is read. The tokenizer is ``tokenizer`` (a
    ``tokenizer.json`` or a directory holding one) when given, else the model's own (a GGUF
    carries one; a run keeps the one it trained with), else None: callers that need text raise.
    """
    source = as_source(path)
    own = None
    if source.kind == "gguf":
        from solarjax.gguf import load_gguf

        cfg, params, own = load_gguf(source.weights, dtype=dtype or "float32", shardings=shardings, progress=progress)
    elif source.kind == "hf":
        from solarjax.hf import load_hf

        cfg, params = load_hf(source.weights, dtype=dtype, shardings=shardings, progress=progress)
    else:
        from solarjax.ckpt import load_params

        cfg, params = load_params(source.weights, dtype=dtype, shardings=shardings)
    if tokenizer is not None:
        return cfg, params, load_tokenizer(tokenizer)
    if own is None and source.tokenizer_dir is not None:
        own = load_tokenizer(source.tokenizer_dir)
    return cfg, params, own


def load_tokenizer(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json``, a directory holding one or a ``.gguf``."""
    from solarjax.data import load_tokenizer as read

    if not _path(path).exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    if _is_gguf(_path(path)):
        from solarjax.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path).tokenizer
    return read(path)


def load_chat_template(path: str | os.PathLike | None):
    """The chat template of a tokenizer source (a directory, a tokenizer file, a ``.jinja`` or a
    ``.gguf``, whose metadata holds it) as a ``solarjax.data.ChatTemplate``; None when it has none."""
    from solarjax.data import chat_template_from
    from solarjax.data import load_chat_template as read

    if path is not None and _is_gguf(_path(path)):
        from solarjax.gguf import hf_side_files

        return chat_template_from(json.loads(hf_side_files(path)["tokenizer_config.json"]), path)
    return read(path)


def tokenizer_source(path: str | os.PathLike | Source) -> AnyPath | None:
    """Where a model's tokenizer side files are: the directory holding its ``tokenizer.json`` (an HF
    directory, a run, a run's step), or the ``.gguf`` itself (its metadata); None when it has none."""
    source = as_source(path)
    return source.weights if source.kind == "gguf" else source.tokenizer_dir


def tokenizer_copier(path: str | os.PathLike | Source):
    """``out_dir -> copy_tokenizer(<path's tokenizer>, out_dir)`` for a writer's ``beside`` hook
    (``ckpt.save_params``), so a converted or grown checkpoint keeps the whole tokenizer; None when
    the model has none."""
    tokenizer = tokenizer_source(path)
    return None if tokenizer is None else (lambda out_dir: copy_tokenizer(tokenizer, out_dir))


def _is_gguf(path: AnyPath) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def copy_tokenizer(path: str | os.PathLike, out_dir: AnyPath) -> list[str]:
    """Put the whole tokenizer of ``path`` into ``out_dir``: tokenizer.json, tokenizer_config.json
    (special tokens, chat template), special_tokens_map.json, generation_config.json,
    chat_template.jinja, whichever exist, byte for byte; returns their names. The one way a
    tokenizer travels (run directories, HF exports, merges), so every later verb finds it.

    ``path`` is a model (a run or run step: the run's files; an HF directory: its own), a tokenizer
    directory or file (its directory), or a GGUF, whose files are written from its metadata as
    ``convert gguf-to-hf`` writes them (:func:`solarjax.gguf.hf_side_files`). Files already in
    ``out_dir`` are kept (a resumed run keeps its own); each new one appears whole (written
    beside, then renamed)."""
    from solarjax.hf import TOKENIZER_FILES, copy_tokenizer_files

    path, out_dir = _path(path), _path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".tokenizer-{os.getpid()}.tmp"
    staging.mkdir(exist_ok=True)
    try:
        if _is_gguf(path):
            from solarjax.gguf import hf_side_files

            for name, text in hf_side_files(path).items():
                (staging / name).write_text(text, encoding="utf-8")
        else:
            if path.is_file():
                path = path.parent
            elif path.is_dir() and not any((path / n).is_file() for n in TOKENIZER_FILES):
                try:
                    path = detect(path).tokenizer_dir or path
                except CheckpointError:
                    pass
            copy_tokenizer_files(path, staging)
        names = sorted(f.name for f in staging.iterdir())
        for name in sorted(names, key=lambda n: n == "tokenizer.json"):  # tokenizer.json last: it marks "done"
            if not (out_dir / name).exists():
                (staging / name).rename(out_dir / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return names


# ----------------------------------------------------------------------------- streaming, by HF tensor name


class HFTensors:
    """The tensors of an HF safetensors directory, read one at a time by name; every header is
    checked against ``config.json`` when opened, before anything is written."""

    def __init__(self, path: Path):
        from solarjax.hf import header_checker, read_hf_config, unfused_index
        from solarjax.safetensors_io import Reader

        self.path = path
        self.hf_config = read_hf_config(path)
        self._reader = Reader(path, header_checker(self.hf_config))
        self._where = unfused_index(self._reader.shapes, self.hf_config)  # fused experts seen per expert
        self.shapes = {name: shape for name, (_, _, shape) in self._where.items()}
        self._fused: tuple[str, np.ndarray] | None = None  # the last fused tensor read (its experts come in a row)

    def dtype(self, name: str) -> np.dtype:
        return self._reader.dtype(self._where[name][0])

    def get(self, name: str) -> np.ndarray:
        stored, index, _ = self._where[name]
        if index is None:
            return self._reader.get(stored)
        if self._fused is None or self._fused[0] != stored:
            self._fused = (stored, self._reader.get(stored))
        return np.ascontiguousarray(self._fused[1][index])


class ParamsTensors:
    """A model loaded once (Orbax checkpoint, run, GGUF) seen through HF tensor names."""

    def __init__(self, source: Source):
        from solarjax.hf import config_to_hf, hf_shape, tensor_index

        self.path = source.path
        self.cfg, self.params, _ = load(source)
        self.hf_config = config_to_hf(self.cfg, torch_dtype=self.cfg.param_dtype)
        self._where = tensor_index(self.cfg)
        self.shapes = {name: hf_shape(spec, self.cfg) for name, spec in self._where.items()}

    def dtype(self, name: str) -> np.dtype:
        spec = self._where[name]
        leaf = self.params[spec.leaf] if spec.layer is None else self.params["layers"][spec.leaf]
        return np.dtype(leaf.dtype)

    def get(self, name: str) -> np.ndarray:
        from solarjax.hf import hf_tensor

        return hf_tensor(self.params, self._where[name])


def open_tensors(path: str | os.PathLike | Source) -> HFTensors | ParamsTensors:
    """A by-name tensor view of any model: HF directories stream from disk; the others load once."""
    source = as_source(path)
    return HFTensors(source.weights) if source.kind == "hf" else ParamsTensors(source)
