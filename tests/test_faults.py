"""Real faults against the one training loop: kill -9 during saves, SIGTERM, NaN steps, a full disk.

The training process is a subprocess (``tests/train_fixtures.py fault``) that the test kills,
signals or limits with ``RLIMIT_FSIZE``; the oracle for every resume is the same run done
straight through in this process (same mesh, same batches), compared bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from solarjax import ckpt
from solarjax import sharding as shd
from solarjax import train as tr
from solarjax.hf import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import process_dataset, tiny_config, tree_digest  # noqa: E402

WORKER = Path(__file__).parent / "train_fixtures.py"


def _start(spec: dict, log: Path | None) -> subprocess.Popen:
    """The worker, its output to ``log`` (None: a pipe)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.Popen([sys.executable, str(WORKER), "fault", json.dumps(spec)], env=env,
                            stdout=log.open("wb") if log else subprocess.PIPE, stderr=subprocess.STDOUT)


def _logged(jsonl: Path) -> list[dict]:
    """Training records of the metrics file, strictly parsed (NaN/Infinity are not JSON)."""
    def reject(constant):
        raise ValueError(f"{constant} in {jsonl}")

    lines = jsonl.read_text().splitlines() if jsonl.is_file() else []
    return [r for r in (json.loads(line, parse_constant=reject) for line in lines) if "loss" in r]


def _unfinished(ck: Path) -> list[str]:
    return sorted(p.name for p in ck.iterdir() if ckpt.TMP_SUFFIX in p.name) if ck.is_dir() else []


def _wait(condition, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.005)


def test_kill9_during_saves_and_sigterm_resume_bit_exactly(tmp_path):
    """kill -9 twice while async saves are in flight, then SIGTERM: every restart resumes from the
    last complete step (leftovers of the killed saves deleted), SIGTERM loses no step, and the
    final params equal an uninterrupted run's bit for bit."""
    ck, jsonl = tmp_path / "ck", tmp_path / "metrics.jsonl"
    overrides = {"train.steps": 40, "checkpoint.dir": str(ck), "checkpoint.every": 1, "checkpoint.keep": 2,
                 "logging.jsonl": str(jsonl)}
    report = []
    for run, delay in enumerate([0.0, 0.03]):  # kill on sight of an unfinished step, and 30 ms later
        before = max(ckpt.complete_steps(ck), default=0)
        proc = _start({"overrides": overrides}, tmp_path / f"run{run}.log")
        _wait(lambda: any(int(n.split(".")[0]) > before + 1 for n in _unfinished(ck)), proc, tmp_path / f"run{run}.log")
        time.sleep(delay)
        proc.kill()
        proc.wait()
        logged, complete = _logged(jsonl)[-1]["step"], ckpt.complete_steps(ck)
        report.append({"kill": "SIGKILL", "delay_s": delay, "unfinished_at_kill": _unfinished(ck),
                       "last_step": logged, "resumable_step": complete[-1]})
        assert complete and complete[-1] > before and logged - complete[-1] <= 2, report
    assert any(r["unfinished_at_kill"] for r in report), f"no kill interrupted a save in flight: {report}"

    # SIGTERM: the step in progress finishes, is checkpointed and the process exits 143
    log = tmp_path / "run_term.log"
    proc = _start({"overrides": overrides}, log)
    restart = len(_logged(jsonl))
    _wait(lambda: len(_logged(jsonl)) >= restart + 2, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    stopped = _logged(jsonl)[-1]["step"]
    assert ckpt.complete_steps(ck)[-1] == stopped and not _unfinished(ck)  # zero steps lost
    assert f"after step {stopped} of 40" in log.read_text() and "run the same command again" in log.read_text()
    report.append({"kill": "SIGTERM", "last_step": stopped, "resumable_step": stopped})

    end = stopped + 2
    resumed = tr.train(tiny_config(**overrides), train_data=process_dataset(0, 1, 8), stop_after=end)
    straight = tr.train(tiny_config(**{"train.steps": 40}), train_data=process_dataset(0, 1, 8), stop_after=end)
    assert resumed["start_step"] == stopped and resumed["losses"] == straight["losses"][stopped:]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["params"]), jax.device_get(straight["params"]))
    assert not _unfinished(ck)
    print(json.dumps({"faults": report}))


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    """Batches with out-of-vocabulary ids make the loss NaN: one such step is skipped (weights as
    they were, as if the batch were absent); a run of them beyond the budget stops the run, no
    checkpoint holds a non-finite state, metrics stay valid JSON."""
    clean = list(zip(range(12), iter(process_dataset(0, 1, 8))))
    poisoned = {3, 6, 7, 8}  # one bad batch, then three in a row (budget 2)

    def batches(skip_poisoned: bool):
        for i, batch in clean:
            if i in poisoned:
                if skip_poisoned:
                    continue
                batch = dict(batch, tokens=batch["tokens"].copy())
                batch["tokens"][0, 5] = 10_000  # beyond vocab_size: the embedding lookup gives NaN
            yield batch

    ck, jsonl = tmp_path / "ck", tmp_path / "metrics.jsonl"
    config = tiny_config(**{"train.steps": 12, "train.max_nonfinite_skips": 2, "checkpoint.dir": str(ck),
                            "checkpoint.every": 2, "checkpoint.keep": 5, "logging.jsonl": str(jsonl)})
    with pytest.raises(tr.TrainingDiverged, match=r"step 9: loss nan .* 3 non-finite steps in a row"):
        tr.train(config, train_data=batches(False))
    records = _logged(jsonl)  # strict JSON: a NaN would not parse
    bad = [r["step"] for r in records if r.get("nonfinite")]
    assert bad == [4, 7, 8, 9] and all(r["loss"] is None and r["skipped_steps"] == 1 for r in records if r["step"] in bad)
    # step 4 was skipped: its save waited for step 5; nothing after the bad run of steps 7-9 was saved
    assert ckpt.complete_steps(ck) == [2, 5, 6] and not _unfinished(ck)
    _, saved = ckpt.load_params(ck / "6")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))
    # the oracle: the same run without the bad batches; a skipped step must have changed nothing.
    # Its start params are the caller's arrays, already on the mesh: the donating steps leave them alive.
    oracle_config = tiny_config(**{"train.steps": 12})
    cfg, start = tr.init_model(oracle_config, shd.mesh_from_config(oracle_config.mesh),
                               shd.rules_from_config(oracle_config.mesh.rules))
    oracle = tr.train(oracle_config, cfg=cfg, params=start, train_data=batches(True), stop_after=5)
    jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(oracle["params"]))
    assert not any(x.is_deleted() for x in jax.tree.leaves(start))

    # restarting into this run directory with another model shape: one line, naming the param
    other = tiny_config(**{"train.steps": 12, "checkpoint.dir": str(ck), "model.n_layers": 3})
    with pytest.raises(CheckpointError) as err:
        tr.train(other, train_data=batches(True))
    message = str(err.value)
    assert "\n" not in message and "['layers']" in message and "(2, " in message and "(3, " in message
    assert "new train.out_dir" in message


def test_failed_save_is_one_error_and_the_previous_checkpoint_survives(tmp_path):
    """A save that hits a full disk (RLIMIT_FSIZE: writes past 20 kB fail with EFBIG): one error line
    naming the cause, no traceback pages, the previous checkpoint byte-identical and restorable, and
    the failed save's temporary directory removed."""
    ck = tmp_path / "ck"
    spec = {"overrides": {"train.steps": 6, "checkpoint.dir": str(ck), "checkpoint.every": 2},
            "fsize_after": 2, "fsize_limit": 20_000, "digest_out": str(tmp_path / "digest.json")}
    proc = _start(spec, None)  # output to a pipe: a log file would hit the limit too
    out = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("solarjax train: error:")]
    assert len(errors) == 1, out[-3000:]
    assert "File too large" in errors[0] and "step 2, is intact" in errors[0], errors[0]
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    assert ckpt.complete_steps(ck) == [2] and not _unfinished(ck)
    assert tree_digest(str(ck)) == json.loads((tmp_path / "digest.json").read_text())
    cfg, params = ckpt.load_params(ck / "2")
    assert cfg.n_layers == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
