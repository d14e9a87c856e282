"""Safetensors checkpoints on disk: headers, readers, one streaming writer, shard names, the index.

A safetensors file is an 8-byte little-endian header length, a JSON header ``{name: {dtype,
shape, data_offsets}}`` and then raw bytes. Reading decodes through the ``safetensors`` library;
the header is parsed here too because up-scaling copies byte ranges it cannot expose.

Every checkpoint solarjax writes (HF export, up-scaling, merging) goes through
:func:`write_checkpoint`: shard boundaries are planned from sizes known up front, each file's
header is written first, then each tensor in turn, either copied as a byte range of a source file
(in-kernel where possible) or produced by a callable when its turn comes. Memory stays at one
tensor whatever the checkpoint's size, and a repeated layer is written as independent bytes (a
safetensors file cannot hold two names for one buffer).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

SAFE_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
COPY_CHUNK = 64 << 20  # bytes per copy_file_range call / fallback buffer

ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
ST_CODES = {name: code for code, name in ST_DTYPES.items()}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16", "f16": "float16",
                 "half": "float16", "bf16": "bfloat16"}
CAST_DTYPES = ("float32", "float16", "bfloat16")  # what a checkpoint may be cast to on the way out


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the culprit."""


# ----------------------------------------------------------------------------- dtypes

def canonical_dtype(dtype: str, allowed: Sequence[str] = CAST_DTYPES, error: type[ValueError] = CheckpointError) -> str:
    """``"bf16"``/``"BFloat16"``/``"bfloat16"`` -> ``"bfloat16"`` etc.; anything outside ``allowed`` raises."""
    name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in allowed:
        raise error(f"dtype {dtype!r} is not one of {', '.join(allowed)}")
    return name


def numpy_dtype(code_or_name: str) -> np.dtype:
    """The numpy dtype of a safetensors code (``BF16``) or a dtype name (``bfloat16``)."""
    name = ST_DTYPES.get(code_or_name, code_or_name)
    if name not in ST_CODES:
        raise CheckpointError(f"unsupported safetensors dtype {code_or_name}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a numpy/JAX dtype or dtype name."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in ST_CODES:
        raise CheckpointError(f"dtype {name} cannot be stored in safetensors")
    return ST_CODES[name]


def is_floating(code: str) -> bool:
    return ST_DTYPES.get(code, "").startswith(("float", "bfloat"))


# ----------------------------------------------------------------------------- reading

def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The shard files of a checkpoint directory, checked against the index when there is one."""
    path = Path(path)
    index = path / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights {pickles}; solarjax reads safetensors only (pickles can run "
            "arbitrary code). Convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path} has no {SINGLE_FILE} or {SAFE_INDEX}")


def read_header(file: Path) -> tuple[dict, int]:
    """``(header, byte offset where the data starts)``; a header that does not fit the file raises."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 1 << 28):
            raise CheckpointError(f"{file}: header length {n} does not fit the file ({size} bytes); corrupt?")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{file}: unreadable safetensors header ({err})") from err
    return header, 8 + n


class StoredTensor(NamedTuple):
    """Where one tensor's bytes are: ``nbytes`` at absolute ``offset`` of ``file``."""

    file: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors code
    shape: tuple[int, ...]


HeaderCheck = Callable[[Path, str, tuple, str], None]  # (file, name, shape, dtype code) -> raise or not


def scan(path: str | os.PathLike, check: HeaderCheck | None = None) -> list[tuple[str, StoredTensor]]:
    """Every tensor of a checkpoint with its byte range, in file order. Each range is checked against
    its shape, dtype and the file size, and ``check`` (e.g. against ``config.json``) runs on every
    header, so a truncated or inconsistent shard is refused before anything is written."""
    tensors = []
    for file in safetensors_files(path):
        header, data_start = read_header(file)
        size = file.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            expected = math.prod(shape) * numpy_dtype(info["dtype"]).itemsize
            if end - begin != expected or data_start + end > size:
                raise CheckpointError(
                    f"tensor {name!r} in {file}: byte range [{begin}, {end}) does not match shape {shape} "
                    f"{info['dtype']} or the file size {size} (truncated or corrupt shard?)"
                )
            if check is not None:
                check(file, name, shape, info["dtype"])
            tensors.append((name, StoredTensor(file, data_start + begin, end - begin, info["dtype"], shape)))
    return tensors


class Reader:
    """Random access by name to a checkpoint's tensors: headers scanned (and checked) up front,
    arrays decoded by ``safetensors`` only when asked for."""

    def __init__(self, path: str | os.PathLike, check: HeaderCheck | None = None):
        from safetensors import safe_open

        self.path = Path(path)
        self.stored = dict(scan(self.path, check))
        self._handles: dict[Path, Any] = {}
        for file in dict.fromkeys(s.file for s in self.stored.values()):
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except Exception as err:  # safetensors raises its own error types on truncation
                raise CheckpointError(f"cannot read {file}: {err} (truncated or corrupt shard?)") from err

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: s.shape for name, s in self.stored.items()}

    def dtype(self, name: str) -> np.dtype:
        return numpy_dtype(self.stored[name].dtype)

    def get(self, name: str) -> np.ndarray:
        file = self.stored[name].file
        try:
            return self._handles[file].get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {err}") from err

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for every tensor, one at a time, in file order."""
        for name in self.stored:
            yield name, self.get(name)


# ----------------------------------------------------------------------------- writing

class OutTensor(NamedTuple):
    """One tensor to write: its bytes copied from ``source`` (stored in ``dtype`` already) or the
    array ``make()`` returns when its turn comes."""

    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    source: StoredTensor | None = None
    make: Callable[[], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def parse_size(size: int | str) -> int:
    """``"5GB"``, ``"500MB"``, ``"10KB"`` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a byte count")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


def shard_names(n: int) -> list[str]:
    """transformers' file names for ``n`` shards."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(tensors: Sequence[OutTensor], max_shard_size: int | str) -> list[list[OutTensor]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_size`` bytes (a larger tensor
    gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(out_dir: Path, tensors: Sequence[OutTensor], max_shard_size: int | str = "5GB", *,
                     progress: bool = False, desc: str = "write", chunk_bytes: int = COPY_CHUNK) -> list[str]:
    """Write ``tensors`` into ``out_dir`` as transformers-named shards (plus the index when there is
    more than one); returns the file names. ``out_dir`` is expected to be a fresh (temporary) directory."""
    from solarjax.progress import progress_bar

    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"tensor(s) {twice[:3]} written twice")
    shards = plan_shards(tensors, max_shard_size)
    files = shard_names(len(shards))
    sources = dict.fromkeys(t.source.file for t in tensors if t.source is not None)
    fds = {f: os.open(f, os.O_RDONLY) for f in sources}
    try:
        with progress_bar(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=desc,
                          enabled=progress) as bar:
            for file, shard in zip(files, shards):
                write_shard(out_dir / file, shard, fds, chunk_bytes, bar)
    finally:
        for fd in fds.values():
            os.close(fd)
    if len(shards) > 1:
        write_index(out_dir, {t.name: file for file, shard in zip(files, shards) for t in shard},
                    sum(t.nbytes for t in tensors))
    return files


def write_shard(file: Path, tensors: Sequence[OutTensor], fds: dict[Path, int], chunk: int, bar) -> int:
    """One safetensors file: the header first (every offset is known), then tensor by tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_shard_body(fd, blob, tensors, fds, chunk, bar)
    except OSError as err:
        if err.filename is None:  # os.write's errors name no file
            err.filename = os.fspath(file)
        raise
    finally:
        os.close(fd)
    return offset


def _write_shard_body(fd: int, blob: bytes, tensors: Sequence[OutTensor], fds: dict[Path, int], chunk: int,
                      bar) -> None:
    _write_all(fd, struct.pack("<Q", len(blob)) + blob)
    for t in tensors:
        if t.source is not None:
            _copy_range(fds[t.source.file], fd, t.source.offset, t.source.nbytes, chunk, bar)
            continue
        array = np.ascontiguousarray(t.make())
        if tuple(array.shape) != tuple(t.shape) or array.dtype != numpy_dtype(t.dtype):
            raise CheckpointError(f"tensor {t.name!r}: produced {array.dtype} {tuple(array.shape)}, "
                                  f"expected {ST_DTYPES[t.dtype]} {tuple(t.shape)}")
        _write_all(fd, array.reshape(-1).view(np.uint8))  # no copy; works for bf16 too
        bar.update(array.nbytes)
        del array


def read_stored(stored: StoredTensor) -> np.ndarray:
    """One stored tensor decoded from its byte range, in its stored dtype and shape."""
    fd = os.open(stored.file, os.O_RDONLY)
    try:
        data = _pread_all(fd, stored.nbytes, stored.offset)
    finally:
        os.close(fd)
    return np.frombuffer(data, numpy_dtype(stored.dtype)).reshape(stored.shape)


def _pread_all(fd: int, nbytes: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < nbytes:
        chunk = os.pread(fd, min(nbytes - done, 1 << 30), offset + done)
        if not chunk:
            raise CheckpointError(f"unexpected end of file reading {nbytes} bytes at {offset}")
        parts.append(chunk)
        done += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# the destination's own faults: copying by hand would only meet them again
_WRITE_FAULTS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO})


def _copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int, chunk: int, bar) -> None:
    """Copy bytes in-kernel when possible; otherwise through one bounded buffer.

    Both paths write at ``dst_fd``'s position, so callers must use unbuffered writes too.
    """
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(chunk, nbytes - done)
        copied = 0
        if use_kernel:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError as err:  # EXDEV/ENOSYS on old kernels or odd file systems: copy by hand
                if err.errno in _WRITE_FAULTS:
                    raise
                use_kernel = False
            else:
                if copied == 0:
                    raise CheckpointError(f"unexpected end of source file at byte {offset + done}")
        if not use_kernel:
            _write_all(dst_fd, _pread_all(src_fd, n, offset + done))
            copied = n
        done += copied
        bar.update(copied)
