"""Real OS faults while writing, and the killed-run cleanup's rule.

The faults are made for real, cheaply: a full disk is a tiny tmpfs, a file-size limit is
``RLIMIT_FSIZE`` (EFBIG), a read-only file system is a tmpfs remounted read-only. Each verb runs
as a subprocess; the checks: exit status 1, stderr exactly one line naming the destination,
nothing left in the destination's parent but what was there before, and every file outside the
destination (the sources, a user's file beside it, an earlier output being replaced)
byte-identical. Mounting needs root and permission to mount; without them those cases skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from solarjax.outputs import MARKER, clean_leftovers, write_marker

ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
           HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------- faults


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, read_only: bool = False, fill=None):
    """A tmpfs of ``size`` mounted at ``where`` (``fill(where)`` runs before a read-only remount)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        if fill is not None:
            fill(where)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def solarjax(argv: list[str], *, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``solarjax ARGV`` in a fresh process, optionally with writes past ``fsize`` bytes failing (EFBIG)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "solarjax.cli", *argv], env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if fsize else None)


def snapshot(*roots: Path, skip: Path) -> dict[str, str]:
    """Every entry under ``roots`` but ``skip``: files by content hash, directories and links by kind."""
    found = {}
    for root in roots:
        for here, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if Path(here, d) != skip]
            for name in dirs + files:
                path = Path(here, name)
                if path == skip:
                    continue
                if path.is_symlink():
                    found[str(path)] = "link " + os.readlink(path)
                elif path.is_file():
                    found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    found[str(path)] = "dir"
    return found


def user_file(parent: Path) -> None:
    (parent / "notes.txt").write_text("a user's file beside the output\n")


def assert_one_line_and_nothing_changed(run, verb: str, dest: Path, before: dict, after: dict, reason: str):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-3000:]
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"solarjax {verb}: error: cannot write {dest}: {reason}"), lines[0]
    assert after == before  # sources, the user's file and any earlier output: untouched; no leftovers


# ----------------------------------------------------------------------------- verbs under each fault


def _upscale(src: Path, dest: Path) -> list[str]:
    return ["upscale", "--model", str(src), "--out", str(dest), "--m", "1", "--no-progress"]


def _hf_to_orbax(src: Path, dest: Path) -> list[str]:
    return ["convert", "hf-to-orbax", "--model", str(src), "--out", str(dest), "--no-progress"]


def _merge(src: Path, dest: Path) -> list[str]:
    recipe = src.parent / "recipe.yml"
    recipe.write_text(f"models:\n  - model: {src}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {src}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\ndtype: float32\n")
    return ["merge", str(recipe), "--out", str(dest), "--no-progress"]


def _tokenizer(src: Path, dest: Path) -> list[str]:
    corpus = src.parent / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over {i * 7}"}) + "\n"
                              for i in range(300)))
    return ["tokenizer", "train", "--source", str(corpus), "--vocab-size", "400", "--out", str(dest)]


VERBS = {"upscale": (_upscale, "upscale"), "convert hf-to-orbax": (_hf_to_orbax, "convert"),
         "merge": (_merge, "merge"), "tokenizer train": (_tokenizer, "tokenizer")}


@pytest.fixture
def source(hf_llama_dir, tmp_path) -> Path:
    """The tiny random Llama (untied, 4 layers, ~0.7 MB), in a directory of this test's own."""
    import shutil

    return Path(shutil.copytree(hf_llama_dir, tmp_path / "src" / "model"))


def _dest(verb: str, parent: Path) -> Path:
    """The destination for ``verb``: a directory, or the tokenizer's file."""
    return parent / ("tok.json" if verb == "tokenizer train" else "out")


@pytest.mark.parametrize("verb", list(VERBS))
def test_disk_full_is_one_line_and_leaves_nothing(verb, source, tmp_path):
    """ENOSPC: a tmpfs too small for the output (16 kB for the tokenizer, 256 kB for models)."""
    build, name = VERBS[verb]
    size = "16k" if verb == "tokenizer train" else "256k"
    with tmpfs(tmp_path / "disk", size, fill=user_file) as disk:
        dest = _dest(verb, disk)
        argv = build(source, dest)
        before = snapshot(disk, source.parent, skip=dest)
        run = solarjax(argv)
        assert_one_line_and_nothing_changed(run, name, dest, before, snapshot(disk, source.parent, skip=dest),
                                            "No space left on device (ENOSPC)")
        assert not dest.exists()


@pytest.mark.parametrize("verb", ["upscale"])
def test_file_too_large_is_one_line_and_leaves_nothing(verb, source, tmp_path):
    """EFBIG: RLIMIT_FSIZE of 100 kB in the writing process (the model's shard is ~0.7 MB)."""
    build, name = VERBS[verb]
    parent = tmp_path / "out_parent"
    parent.mkdir()
    user_file(parent)
    dest = _dest(verb, parent)
    argv = build(source, dest)
    before = snapshot(parent, source.parent, skip=dest)
    run = solarjax(argv, fsize=100_000)
    assert_one_line_and_nothing_changed(run, name, dest, before, snapshot(parent, source.parent, skip=dest),
                                        "File too large (EFBIG)")
    assert not dest.exists()


@pytest.mark.parametrize("verb", ["upscale", "tokenizer train"])
def test_read_only_file_system_is_one_line(verb, source, tmp_path):
    """EROFS: the destination's parent is a tmpfs remounted read-only, holding a user's file."""
    build, name = VERBS[verb]
    with tmpfs(tmp_path / "ro", "1m", read_only=True, fill=user_file) as ro:
        dest = _dest(verb, ro)
        argv = build(source, dest)
        before = snapshot(ro, source.parent, skip=dest)
        run = solarjax(argv)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1, run.stderr[-3000:]
        assert lines[0].startswith(f"solarjax {name}: error: cannot write {dest}"), lines[0]
        assert "Read-only file system (EROFS)" in lines[0], lines[0]
        assert snapshot(ro, source.parent, skip=dest) == before and not dest.exists()


def test_disk_full_while_replacing_keeps_the_previous_output(source, tmp_path):
    """--overwrite on a disk with room for one copy: the new one fails, the old one stays byte-identical."""
    with tmpfs(tmp_path / "disk", "1600k", fill=user_file) as disk:
        dest = disk / "out"
        first = solarjax(_upscale(source, dest))
        assert first.returncode == 0, first.stderr[-3000:]
        before = snapshot(disk, source.parent, skip=disk / "none")  # the earlier output included
        run = solarjax(["upscale", "--model", str(source), "--out", str(dest), "--plan", "repeat:k=2", "--overwrite",
                        "--no-progress"])
        assert_one_line_and_nothing_changed(run, "upscale", dest, before,
                                            snapshot(disk, source.parent, skip=disk / "none"),
                                            "No space left on device (ENOSPC)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions (the read-only mount case covers it)")
def test_permission_denied_is_one_line(source, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    user_file(parent)
    parent.chmod(0o555)
    try:
        before = snapshot(parent, skip=parent / "out")
        run = solarjax(_upscale(source, parent / "out"))
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and "Permission denied (EACCES)" in lines[0], run.stderr
        assert str(parent / "out") in lines[0] and snapshot(parent, skip=parent / "out") == before
    finally:
        parent.chmod(0o755)


# ----------------------------------------------------------------------------- the cleanup's rule


def test_cleanup_removes_only_this_destinations_dead_marked_temps(tmp_path):
    """A killed run's temp of this destination goes; a user's look-alike file, an unmarked or linked
    look-alike, another destination's temp and a live process' temp all stay, byte-identical."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent, dest = tmp_path, tmp_path / "X"

    def marked(name: str) -> Path:
        (parent / name).mkdir()
        (parent / name / "model.safetensors").write_bytes(b"partial")
        write_marker(parent / name, "upscale", [], kind="partial")
        return parent / name

    killed = marked(f".X.solarjax-tmp-{dead.pid}")
    killed_scratch = marked(f".X.solarjax-tmp-{dead.pid}-hf")
    (parent / f".X.solarjax-old-{dead.pid}.foo").write_text("a user's file with a look-alike name")
    (parent / f".X.solarjax-tmp-{dead.pid}.bak").write_text("another one")
    (parent / f".X.solarjax-old-{dead.pid}").write_text("a file of exactly our name is still not ours")
    unmarked = parent / f".X.solarjax-tmp-{dead.pid}-ab"
    unmarked.mkdir()
    (unmarked / "data").write_text("a directory without our marker")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    write_marker(outside, "upscale", [])
    (outside / "keep").write_text("reached through a link")
    (parent / f".X.solarjax-tmp-{dead.pid}-ln").symlink_to(outside, target_is_directory=True)
    marked(f".Y.solarjax-tmp-{dead.pid}")  # another destination's
    marked(f".XX.solarjax-tmp-{dead.pid}")
    marked(f".X.solarjax-tmp-{dead.pid}.solarjax-tmp-{dead.pid}")  # the temp of a destination named X.solarjax-...
    marked(f".X.solarjax-tmp-{os.getpid()}")  # a live process' (this one)
    marked(f".X.solarjax-tmp-0{dead.pid}")  # not a pid as solarjax writes one
    before = snapshot(parent, outside, skip=killed)
    del before[str(killed_scratch)], before[str(killed_scratch / "model.safetensors")]
    del before[str(killed_scratch / MARKER)]
    removed = clean_leftovers(dest)
    assert sorted(removed) == sorted([killed, killed_scratch])
    assert snapshot(parent, outside, skip=killed) == before


def test_cleanup_puts_back_an_output_a_killed_replace_had_moved_aside(tmp_path):
    """Killed between moving the previous output aside and the new one in: the next run restores it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.solarjax-old-{dead.pid}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    write_marker(old, "upscale", ["config.json"])
    assert clean_leftovers(tmp_path / "out") == []
    assert (tmp_path / "out" / "config.json").read_text() == "{}" and not old.exists()


def test_results_file_on_a_full_disk_keeps_the_previous_one(tmp_path):
    """``eval --out``'s writer (replace_text): the old results stay whole, nothing beside them."""
    from solarjax.outputs import OutputError, replace_text

    with tmpfs(tmp_path / "disk", "16k") as disk:
        results = disk / "results.json"
        replace_text(results, '{"old": 1}')
        before = snapshot(disk, skip=disk / "none")
        with pytest.raises(OutputError, match=rf"^cannot write {results}: No space left on device \(ENOSPC\)"):
            replace_text(results, "x" * 200_000)
        assert snapshot(disk, skip=disk / "none") == before
