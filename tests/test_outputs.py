"""No verb destroys what it did not write (solarjax.outputs), checked as a user meets it: the real CLI.

Every case runs in a fresh copy of a small "world" (sources, a user's own directory, earlier
solarjax outputs). After each case the whole world is hashed again: a refusal must change
nothing at all and print one line; a write may change only its destination, which must carry
the marker. Also: a real ``kill -9`` in the middle of ``solarjax upscale``, cleaned by the next run,
and headers whose shape or dtype contradict config.json (refused before any output exists).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from solarjax import hf
from solarjax.cli import main
from solarjax.outputs import MARKER, OutputError, check_destination, claim_run_dir, clean_leftovers, write_marker


# ----------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def template(hf_llama_dir, tmp_path_factory):
    """src/ (HF, Orbax, a GGUF-named file, a merge recipe, a corpus), a user's directory, one clean
    solarjax output and one the user added a file to. Built once; each case copies it."""
    from solarjax import ckpt

    root = tmp_path_factory.mktemp("outputs") / "world"
    src = root / "src"
    shutil.copytree(hf_llama_dir, src / "hf")
    shutil.copytree(hf_llama_dir, src / "hf2")
    cfg, params = hf.load_hf(src / "hf")
    ckpt.save_params(src / "orbax", params, cfg)
    (src / "model.gguf").write_bytes(b"GGUF-named bytes; refusals come before reading them")
    (src / "recipe.yml").write_text(json.dumps({"merge_method": "linear", "models": [  # relative to the recipe
        {"model": "hf", "parameters": {"weight": 0.5}}, {"model": "hf2", "parameters": {"weight": 0.5}}]}))
    (src / "texts").mkdir()
    (src / "texts" / "corpus.txt").write_text("".join(f"the quick brown fox {i} jumps over\n" for i in range(40)))
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("my own work")
    (root / "home").mkdir()
    (root / "a" / "b").mkdir(parents=True)
    assert main(["upscale", str(src / "hf"), str(root / "done"), "--m", "1", "--no-progress"]) == 0
    shutil.copytree(root / "done", root / "polluted")
    (root / "polluted" / "mine.txt").write_text("added by the user")
    return root


@pytest.fixture
def world(template, tmp_path, monkeypatch):
    root = Path(shutil.copytree(template, tmp_path / "world", symlinks=True))
    monkeypatch.chdir(root / "a" / "b")
    return root


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``root`` (except ``skip``'s subtree): content hash, link target or 'dir'."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(here) / name
            if skip is not None and (path == skip or skip in path.parents):
                continue
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], world: Path, capsys, reason: str) -> None:
    """The CLI exits 1 with one line naming the reason, and nothing in the world changed."""
    capsys.readouterr()
    before = snapshot(world)
    assert main(argv) == 1, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"solarjax {argv[0]}: error: ") and reason in err[0], (argv, err)
    assert snapshot(world) == before, argv


# ----------------------------------------------------------------------------- directory outputs

VERBS = {  # verb -> (argv with {src} and {dst}, the source a destination is related to, expected marker verb)
    "convert hf-to-orbax": (["convert", "hf-to-orbax", "{src}/hf", "{dst}"], "hf", "convert hf-to-orbax"),
    "convert orbax-to-hf": (["convert", "orbax-to-hf", "{src}/orbax", "{dst}"], "orbax", "convert orbax-to-hf"),
    "convert gguf-to-hf": (["convert", "gguf-to-hf", "{src}/model.gguf", "{dst}"], "model.gguf", None),
    "upscale": (["upscale", "{src}/hf", "{dst}", "--m", "1", "--no-progress"], "hf", "upscale"),
    "upscale orbax": (["upscale", "{src}/orbax", "{dst}", "--m", "1", "--no-progress"], "orbax", "upscale"),
    "merge": (["merge", "{src}/recipe.yml", "{dst}", "--no-progress"], "hf", "merge"),
    "merge orbax": (["merge", "{src}/recipe.yml", "{dst}", "--no-progress", "--format", "orbax"], "hf", "merge"),
}

REFUSALS = [  # (case, destination relative to the world or the source, --overwrite, what the line says)
    ("the source", "SRC", True, "is the source"),
    ("a symlink to the source", "link", True, "is the source"),
    ("the source's parent", "src", True, "contains the source"),
    ("inside the source", "SRC/out", False, "is inside the source"),
    ("the current directory", ".", True, "is the current directory"),
    ("an ancestor of the current directory", "a", True, "contains the current directory"),
    ("the home directory", "home", True, "is the home directory"),
    ("a user's directory", "user", True, "solarjax did not write it"),
    ("a user's file", "user/notes.txt", True, "is a file"),
    ("an output the user added files to", "polluted", True, "1 file(s) solarjax did not write"),
    ("an output, without --overwrite", "done", False, "already exists"),
]


def _argv(verb: str, world: Path, dst: str) -> list[str]:
    template, _, _ = VERBS[verb]
    return [a.format(src=world / "src", dst=dst) for a in template]


@pytest.mark.parametrize("verb", VERBS)
def test_refusals_change_nothing(verb, world, capsys, monkeypatch):
    source = world / "src" / VERBS[verb][1]
    (world / "link").symlink_to(source)
    for case, where, overwrite, reason in REFUSALS:
        dst = str(source / where[4:]) if where.startswith("SRC") else "." if where == "." else str(world / where)
        with monkeypatch.context() as env:
            env.setenv("HOME", str(world / "home"))
            refused(_argv(verb, world, dst) + (["--overwrite"] if overwrite else []), world, capsys, reason)


@pytest.mark.parametrize("verb", [v for v in VERBS if VERBS[v][2]])
def test_writes_only_the_destination(verb, world, capsys):
    """A new destination, then --overwrite of a clean solarjax output: both marked, nothing else touched."""
    for dst in (world / "new", world / "done"):
        before = snapshot(world, skip=dst)
        argv = _argv(verb, world, str(dst)) + (["--overwrite"] if dst.name == "done" else [])
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        assert snapshot(world, skip=dst) == before
        marker = json.loads((dst / MARKER).read_text())
        assert marker["verb"] == VERBS[verb][2]
        files = {str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file() and p.name != MARKER}
        assert set(marker["files"]) == files


def test_root_and_home_ancestors_are_refused(world, monkeypatch):
    with pytest.raises(OutputError, match="filesystem root"):
        check_destination("/", overwrite=True)
    monkeypatch.setenv("HOME", str(world / "user"))
    with pytest.raises(OutputError, match="contains the home directory"):
        check_destination(world, overwrite=True)


# ----------------------------------------------------------------------------- single-file output (tokenizer)


def test_tokenizer_file_output(world, capsys):
    texts = world / "src" / "texts"
    train = ["tokenizer", "train", "--source", str(texts), "--vocab-size", "40"]
    refused(train + ["--out", str(texts / "corpus.txt"), "--overwrite"], world, capsys, "is inside the source")
    refused(train + ["--out", str(texts / "tok.json")], world, capsys, "is inside the source")
    refused(train + ["--out", str(world / "user" / "notes.txt")], world, capsys, "already exists")
    refused(train + ["--out", str(world / "user" / "notes.txt"), "--overwrite"], world, capsys, "solarjax did not write")
    out = world / "user" / "tokenizer.json"
    for extra in ([], ["--overwrite"]):  # the second run replaces the file the first one wrote
        before = snapshot(world, skip=out)
        assert main(train + ["--out", str(out)] + extra) == 0
        changed = {k for k, v in snapshot(world, skip=out).items() if before.get(k) != v}
        assert changed <= {f"user/{MARKER}"} and json.loads((world / "user" / MARKER).read_text())["files"] == [
            "tokenizer.json"]
    assert (world / "user" / "notes.txt").read_text() == "my own work"
    refused(["convert", "hf-to-orbax", str(world / "src" / "hf"), str(world / "user"), "--overwrite"], world, capsys,
            "1 file(s) solarjax did not write")


# ----------------------------------------------------------------------------- run directories


RUN_VERBS = {
    "train": ["train", "--config", "tiny"],
    "sft": ["sft", "--data", "{src}/texts/corpus.txt"],
    "dpo": ["dpo", "--data", "{src}/texts/corpus.txt"],
    "demo": ["demo"],
    "ablate": ["ablate", "--m", "1"],
}


@pytest.mark.parametrize("verb", RUN_VERBS)
def test_run_directory_refusals(verb, world, capsys):
    argv = [a.format(src=world / "src") for a in RUN_VERBS[verb]]
    refused(argv + ["--out", "."], world, capsys, "is the current directory")
    refused(argv + ["--out", str(world / "user")], world, capsys, "solarjax did not create it")
    refused(argv + ["--out", str(world / "user" / "notes.txt")], world, capsys, "it is a file")
    if verb in ("sft", "dpo"):
        refused(argv + ["--out", str(world / "src")], world, capsys, "contains the source")


def test_claim_run_dir(world):
    new = claim_run_dir(world / "runs" / "x", verb="train")
    assert json.loads((new / MARKER).read_text())["kind"] == "run"
    (new / "metrics.jsonl").write_text("{}\n")
    assert claim_run_dir(new, verb="train") == new  # resumed, not refused
    (world / "empty").mkdir()
    claim_run_dir(world / "empty", verb="sft")
    assert (world / "empty" / MARKER).is_file()
    with pytest.raises(OutputError, match="is inside the source"):
        claim_run_dir(world / "src" / "hf" / "run", verb="train", sources=[world / "src" / "hf"])
    (world / "old").mkdir()
    (world / "old" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(OutputError, match=f"create an empty {MARKER}"):
        claim_run_dir(world / "old", verb="train")
    (world / "old" / MARKER).touch()  # what the message says to do for a run older than markers
    claim_run_dir(world / "old", verb="train")


# ----------------------------------------------------------------------------- leftovers of killed runs

SLOW_UPSCALE = textwrap.dedent("""
    import sys, time
    from solarjax import safetensors_io
    from solarjax.cli import main
    write_shard = safetensors_io.write_shard
    def first_shard_then_hang(*args, **kwargs):  # so the kill lands mid-output, not after it
        written = write_shard(*args, **kwargs)
        time.sleep(120)
        return written
    safetensors_io.write_shard = first_shard_then_hang
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_mid_upscale_is_cleaned_by_the_next_run(world, capsys):
    src, dst = world / "src" / "hf", world / "grown"
    argv = ["upscale", str(src), str(dst), "--m", "1", "--max-shard-size", "20KB", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_UPSCALE, *argv], cwd=world,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp = world.resolve() / f".grown.solarjax-tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not list(tmp.glob("*.safetensors")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir() and not dst.exists()  # a killed run leaves its recognisable partial output
    before = snapshot(world, skip=tmp)
    capsys.readouterr()
    assert main(argv) == 0
    assert f"removed {tmp}, left by a killed run (process {proc.pid})" in capsys.readouterr().err
    assert not tmp.exists() and snapshot(world, skip=dst) == before
    _, grown = hf.load_hf(dst)
    _, params = hf.load_hf(src)
    wq = np.asarray(params["layers"]["wq"])
    np.testing.assert_array_equal(np.asarray(grown["layers"]["wq"]), wq[[0, 1, 2, 1, 2, 3]])


def test_only_dead_solarjax_leftovers_are_removed(tmp_path):
    """Only marked directories of the exact names made for this destination, of dead processes
    (tests/test_os_errors.py has the files, links and unmarked look-alikes that must stay)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".out.solarjax-tmp-{dead.pid}": True,  # ours, process gone
             f".out.solarjax-old-{dead.pid}": True,
             f".out.solarjax-tmp-{dead.pid}-hf": True,  # merge's scratch
             f".out.solarjax-tmp-{dead.pid}.orbax-checkpoint-tmp-17": False,  # not a name we make (Orbax's goes inside)
             f".out.solarjax-tmp-{os.getpid()}": False,  # a live process (this one)
             f".other.solarjax-tmp-{dead.pid}": False,  # another destination's
             f".out.tmp-{dead.pid}": False, f"out.solarjax-tmp-{dead.pid}": False,  # not our pattern
             "out": False, "user-data": False}
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
        write_marker(tmp_path / name, "test", ["f"])
    clean_leftovers(tmp_path / "out")
    assert {p.name for p in tmp_path.iterdir()} == {n for n, gone in names.items() if not gone}


# ----------------------------------------------------------------------------- headers vs config.json


def _rewrite(src: Path, dst: Path, name: str, change) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda w: w.reshape(w.shape[::-1]), r"has shape \(64, 128\) in its header, but config.json implies \(128, 64\)"),
    (lambda w: w.astype(np.float16), r"is float16 in its header, but config.json says dtype float32"),
])
def test_bad_headers_are_refused_before_any_output(change, message, hf_llama_dir, tmp_path, capsys):
    """Same byte count, swapped dims (or another dtype): found from the header, named, nothing written."""
    from solarjax.merge import merge_checkpoints

    name = "model.layers.2.mlp.gate_proj.weight"
    bad = _rewrite(hf_llama_dir, tmp_path / "bad", name, change)
    where = re.escape(f"{bad / 'model.safetensors'}: tensor '{name}' ")
    assert main(["upscale", str(bad), str(tmp_path / "grown"), "--m", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(where + message, err[0]), err
    recipe = tmp_path / "r.yml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": str(hf_llama_dir), "parameters": {"weight": 0.5}}, {"model": str(bad), "parameters": {"weight": 0.5}}]}))
    with pytest.raises(ValueError, match=message):
        merge_checkpoints(recipe, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "r.yml"]
