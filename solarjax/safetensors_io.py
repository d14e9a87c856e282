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
import reprlib
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
# Everything a checkpoint says about itself is checked here, before a byte of it is used: the files
# an index names stay inside the checkpoint directory, a header is a JSON object of the shape the
# format defines, and every tensor's byte range lies in the data area, apart from the others, with
# exactly the bytes its shape and dtype need. Every reader (upscale, convert, merge, load, info)
# comes through :func:`scan`.

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound on a header's length
HF_HUB_BLOBS = "blobs"  # a Hugging Face hub cache keeps snapshots/<rev>/<file> as links to ../../blobs/<hash>


def short(text: Any, limit: int = 80) -> str:
    """``repr(text)``, cut to ``limit`` characters: error messages never repeat unbounded input. Only
    what is shown is ever repr'd: a string's first ``limit`` characters, a few items of a few levels
    of a container (``reprlib``), so a huge or self-sharing value (a YAML alias bomb) is never expanded."""
    if isinstance(text, (str, bytes)):
        shown = repr(text[: limit + 1])
    else:
        bounded = reprlib.Repr()  # (keyword arguments from Python 3.12)
        bounded.maxlevel, bounded.maxstring, bounded.maxother, bounded.maxlong = 3, limit, limit, 40
        bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = bounded.maxfrozenset = 4
        shown = bounded.repr(text)
    return shown if len(shown) <= limit else shown[: limit - 5] + ("...'" if isinstance(text, (str, bytes)) else "...")


def _allowed_roots(directory: Path) -> list[Path]:
    """Where the files of ``directory`` may resolve to: inside it, and for a Hugging Face hub
    snapshot (``models--X/snapshots/<rev>/``) the repository's ``blobs/`` its links point at."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / HF_HUB_BLOBS).is_dir():
        roots.append((root.parent.parent / HF_HUB_BLOBS).resolve())
    return roots


def contained_file(directory: str | os.PathLike, name: str, error: type[ValueError] | None = None) -> Path | None:
    """``directory / name`` when it is a regular file inside ``directory`` once symlinks are resolved;
    None when nothing has that name. A name that is absolute or climbs out (``../x``), a link that
    resolves elsewhere, or something that is not a regular file raises one line (``error``, default
    :class:`CheckpointError`): every file a checkpoint names, and every side file copied out of it
    (tokenizer, configs, chat template), goes through here."""
    error = error or CheckpointError
    directory = Path(directory)
    parts = Path(name).parts if isinstance(name, str) and name else ("..",)
    if Path(name if isinstance(name, str) else "").is_absolute() or ".." in parts or "\0" in str(name):
        raise error(f"{directory} names file {short(name)}, which is not a plain path inside the directory")
    path = directory / name
    if not os.path.lexists(path):
        return None
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(directory)):
        raise error(f"{path} resolves to {short(str(target))}, outside {directory}; refusing to read or copy it")
    if not target.is_file():
        raise error(f"{path} is not a regular file")
    return path


def read_json(file: Path, error: type[ValueError] | None = None) -> dict:
    """The JSON object in ``file``; a file that is not UTF-8 JSON, or holds something other than an
    object, is one line naming it."""
    error = error or CheckpointError
    try:
        value = json.loads(Path(file).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise error(f"{file} is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(value, dict):
        raise error(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a ``model.safetensors.index.json``."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index} has no weight_map object of tensor name -> file name")
    return weight_map


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The shard files of a checkpoint directory, checked against the index when there is one; every
    file named resolves inside ``path``."""
    path = Path(path)
    index = contained_file(path, SAFE_INDEX)
    if index is not None:
        names = sorted(set(read_index(index).values()))
        found = {name: contained_file(path, name) for name in names}
        missing = [short(name) for name, file in found.items() if file is None]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {missing[:5]}")
        if not found:
            raise CheckpointError(f"{index} lists no shards")
        return list(found.values())
    single = contained_file(path, SINGLE_FILE)
    if single is not None:
        return [single]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle weights {pickles}; solarjax reads safetensors only (pickles can run "
            "arbitrary code). Convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{path} has no {SINGLE_FILE} or {SAFE_INDEX}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise CheckpointError(f"key {short(next(k for k in keys if keys.count(k) > 1))} appears twice")
    return dict(pairs)


def read_header(file: Path) -> tuple[dict, int]:
    """``(header, byte offset where the data starts)``, the header checked by :func:`check_header`:
    a length beyond the file or :data:`MAX_HEADER_BYTES` is refused before it is read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: header length {n} does not fit the file ({size} bytes) or exceeds "
                                  f"{MAX_HEADER_BYTES} bytes; corrupt?")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors header ({str(err)[:120]})") from None
        except CheckpointError as err:
            raise CheckpointError(f"{file}: safetensors header: {err}") from None
    check_header(file, header, size - 8 - n)
    return header, 8 + n


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_header(file: Path, header: Any, data_size: int) -> None:
    """Refuse, naming ``file`` and the tensor, a header that is not ``{name: {dtype, shape,
    data_offsets}}`` (plus an optional ``__metadata__`` object of strings), a dtype not in
    :data:`ST_DTYPES`, offsets that are not ``0 <= begin <= end <= data_size``, a byte count other
    than shape x itemsize, or two tensors whose bytes overlap."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is a JSON {type(header).__name__}, not an object")
    ranges = []
    for name, info in header.items():
        where = f"{file}: tensor {short(name)}"
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{file}: __metadata__ is not an object of strings")
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: header entry is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {short(dtype)} (solarjax reads {', '.join(ST_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > 8 or not all(map(_is_count, shape)):
            raise CheckpointError(f"{where}: shape {short(shape)} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
            raise CheckpointError(f"{where}: data_offsets {short(offsets)} is not two non-negative integers")
        begin, end = offsets
        expected = math.prod(shape) * numpy_dtype(dtype).itemsize
        if not begin <= end <= data_size or end - begin != expected:
            raise CheckpointError(
                f"{where}: byte range [{begin}, {end}) does not match shape {tuple(shape)} {dtype} ({expected} bytes) "
                f"or the data area of {data_size} bytes (truncated or corrupt shard?)"
            )
        ranges.append((begin, end, name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise CheckpointError(f"{file}: tensors {short(first)} and {short(second)} overlap in the data area")


class StoredTensor(NamedTuple):
    """Where one tensor's bytes are: ``nbytes`` at absolute ``offset`` of ``file``."""

    file: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors code
    shape: tuple[int, ...]


HeaderCheck = Callable[[Path, str, tuple, str], None]  # (file, name, shape, dtype code) -> raise or not


def scan(path: str | os.PathLike, check: HeaderCheck | None = None) -> list[tuple[str, StoredTensor]]:
    """Every tensor of a checkpoint with its byte range, in file order, each header validated by
    :func:`read_header`; a name in two shards is refused, and ``check`` (e.g. against
    ``config.json``) runs on every tensor, so an inconsistent shard is refused before anything is written."""
    tensors: dict[str, StoredTensor] = {}
    for file in safetensors_files(path):
        header, data_start = read_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise CheckpointError(f"tensor {short(name)} is in both {tensors[name].file} and {file}")
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if check is not None:
                check(file, name, shape, info["dtype"])
            tensors[name] = StoredTensor(file, data_start + begin, end - begin, info["dtype"], shape)
    return list(tensors.items())


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
