"""Resume integrity (issue 24 items 7, 8): a run directory records what it was started with and refuses
a resume that changes it (unless ``checkpoint.allow_changes``), has one writer (``run.lock``), and a
damaged latest checkpoint falls back to the newest intact one in one line.

One tiny run (2 steps, a checkpoint at each) is trained once; every test works on a copy of it and
resumes with ``stop_after`` at or before the restored step, so no test compiles a train step.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.train_fixtures import DOCS, tiny_config, word_tokenizer


def _config(root, out, **overrides):
    values = {"train.steps": 2, "train.out_dir": str(out), "checkpoint.every": 1, "checkpoint.async_save": False,
              "data.source": str(root / "data.jsonl"), "data.tokenizer": str(root / "tokenizer.json"),
              "data.shuffle": False}
    values.update(overrides)
    return tiny_config(**values)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """``(root, run)``: a finished 2-step run with checkpoints at steps 1 and 2, its data and tokenizer."""
    from solarjax.train import train

    root = tmp_path_factory.mktemp("resume")
    (root / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (root / "tokenizer.json").write_text(word_tokenizer().to_str())
    train(_config(root, root / "run"))
    return root, root / "run"


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the base run whose checkpoints a test may damage (the data stays where it was)."""
    root, run = base_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return root, copy


def _resume(root, out, stop_after=2, **overrides):
    from solarjax.train import train

    return train(_config(root, out, **overrides), stop_after=stop_after)


def test_fresh_run_records_config_data_and_tokenizer_and_releases_its_lock(base_run):
    root, run = base_run
    record = json.loads((run / "run.json").read_text())["record"]
    assert record["optim.lr"] == 3e-3 and record["train.batch_size"] == 8 and record["train.seq_len"] == 32
    data_key = f"data.files[{root / 'data.jsonl'}]"
    size = (root / "data.jsonl").stat().st_size
    import hashlib

    assert record[data_key] == f"{size} bytes, sha256 {hashlib.sha256((root / 'data.jsonl').read_bytes()).hexdigest()}"
    assert record["tokenizer.file"].endswith(hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest())
    assert not (run / "run.lock").exists()


@pytest.mark.parametrize("key,value", [("optim.lr", 1e-3), ("train.batch_size", 16), ("train.seq_len", 16)])
def test_a_changed_setting_is_refused_naming_it(run_copy, key, value):
    from solarjax.run_record import RunRecordError

    root, run = run_copy
    with pytest.raises(RunRecordError) as err:
        _resume(root, run, **{key: value})
    message = str(err.value)
    assert "\n" not in message
    recorded = {"optim.lr": 0.003, "train.batch_size": 8, "train.seq_len": 32}[key]
    assert f"{key}: {json.dumps(recorded)} -> {json.dumps(value)}" in message
    assert f"--allow-changes {key}" in message


def test_a_data_file_cut_short_is_refused(run_copy):
    from solarjax.run_record import RunRecordError

    root, run = run_copy
    data = root / "data.jsonl"
    original = data.read_bytes()
    try:
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[:5]))
        with pytest.raises(RunRecordError, match=rf"data\.files\[{data}\]: {len(original)} bytes, sha256 \w{{12}} -> "
                           rf"{data.stat().st_size} bytes"):
            _resume(root, run)
    finally:
        data.write_bytes(original)


def test_allow_changes_lets_the_named_change_through_and_records_it(run_copy, capfd):
    root, run = run_copy
    summary = _resume(root, run, **{"optim.lr": 1e-3, "checkpoint.allow_changes": "optim.lr", "train.steps": 3})
    assert summary["start_step"] == 2
    assert "resuming with changed optim.lr: 0.003 -> 0.001; train.steps: 2 -> 3" in capfd.readouterr().err
    assert json.loads((run / "run.json").read_text())["record"]["optim.lr"] == 1e-3
    _resume(root, run, **{"optim.lr": 1e-3, "train.steps": 3})  # the next resume compares with the new record


def test_a_second_trainer_on_the_same_run_is_refused_naming_the_holder(run_copy):
    from solarjax.run_record import RunRecordError

    root, run = run_copy
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from solarjax.run_record import hold\n"
         f"with hold({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunRecordError) as err:
            _resume(root, run)
        assert "\n" not in str(err.value)
        assert f"in use by process {holder.pid} on {socket.gethostname()}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(run_copy, capfd):
    root, run = run_copy
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "1",
                                              "since": "2026-01-01T00:00:00Z"}))
    _resume(root, run)
    assert f"took over {run / 'run.lock'}: its holder, process {dead.pid}" in capfd.readouterr().err
    assert not (run / "run.lock").exists()


def _biggest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_in_one_line(run_copy, capfd):
    root, run = run_copy
    damaged = _biggest_file(run / "checkpoints" / "2")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capfd.readouterr()
    summary = _resume(root, run, stop_after=1)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "checkpoint step 2" in line]
    assert len(lines) == 1 and "resumed from step 1, the newest intact one" in lines[0], err
    assert "Traceback" not in err
    assert summary["start_step"] == 1
    assert (run / "checkpoints" / "2.unreadable").is_dir()  # kept aside, not deleted


def test_a_deleted_file_in_the_latest_checkpoint_falls_back_too(run_copy, capfd):
    root, run = run_copy
    _biggest_file(run / "checkpoints" / "2").unlink()
    summary = _resume(root, run, stop_after=1)
    assert summary["start_step"] == 1
    assert "resumed from step 1, the newest intact one" in capfd.readouterr().err


def test_no_intact_checkpoint_is_one_line(run_copy, capfd):
    from solarjax.hf import CheckpointError

    root, run = run_copy
    for step in ("1", "2"):
        damaged = _biggest_file(run / "checkpoints" / step)
        damaged.write_bytes(damaged.read_bytes()[:10])
    capfd.readouterr()
    with pytest.raises(CheckpointError) as err:
        _resume(root, run, stop_after=1)
    message = str(err.value)
    assert "\n" not in message and "no checkpoint is intact" in message
    assert "step 2: " in message and "step 1: " in message
    assert "Traceback" not in capfd.readouterr().err
    assert not (run / "run.lock").exists()  # released on the way out
