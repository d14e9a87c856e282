"""What every verb prints and refuses (issue 25 items 6-7): --json stdout is one JSON object, logs get
whole progress lines, a resume says where it resumed, Orbax's item-metadata warning stays quiet, the
lm-eval CLI keeps its scores without pytablewriter, and wrong input is one line naming the fix.

One tiny training run (two steps on eight CPU devices) is shared by the tests that need a model."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import re
import sys

import pytest

from solarjax.cli import main
from train_fixtures import DOCS

TRAIN = ["--config", "tiny", "--config.model.n_layers=2", "--config.train.batch_size=8", "--config.train.seq_len=32",
         "--config.train.eval_every=0", "--config.train.log_every=1", "--config.checkpoint.async_save=False"]


def cli(*argv: str) -> tuple[int, str, str]:
    """``solarjax ARGV`` in this process: (exit code, stdout, stderr). Neither stream is a terminal."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step run trained with ``--json --no-progress``: (run dir, stdout, stderr)."""
    root = tmp_path_factory.mktemp("discipline")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = root / "run"
    code, stdout, stderr = cli("train", *TRAIN, "--data", str(data), "--out", str(out), "--steps", "2",
                               "--json", "--no-progress")
    assert code == 0, stderr
    return out, data, stdout, stderr


def test_train_json_stdout_is_exactly_one_object(run):
    _, _, stdout, stderr = run
    facts = json.loads(stdout)  # the whole of stdout: one object, no step lines around it
    assert isinstance(facts, dict) and facts["steps"] == 2 and facts["final_loss"] > 0
    assert "step=2 loss=" in stderr  # the human lines went to stderr instead


def test_resume_says_where_and_logs_get_whole_progress_lines(run):
    out, data, _, _ = run
    code, stdout, stderr = cli("train", *TRAIN, "--data", str(data), "--out", str(out), "--steps", "3")
    assert code == 0, stderr
    assert "resumed from step 2 (of 3)" in stdout
    assert "\r" not in stdout + stderr  # stdout is not a terminal: no redrawn bar
    assert re.search(r"^train: 100% 3/3 ", stdout, re.M), stdout


def test_plain_progress_lines_off_a_terminal():
    from solarjax.progress import LineProgress, progress_bar

    stream = io.StringIO()
    bar = progress_bar(total=200, desc="scoring", unit="seq", file=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(200):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 10  # one per tenth of the work, the last one at 100%
    assert lines[-1].startswith("scoring: 100% 200/200 ")
    silent = io.StringIO()
    for _ in progress_bar(range(5), desc="x", enabled=False, file=silent):
        pass
    assert silent.getvalue() == ""


def test_loading_a_run_logs_no_orbax_metadata_warning(run, caplog):
    """Restoring a run's ``params`` item makes Orbax warn that the item has no metadata file of its
    own; ckpt's filter on the absl logger is what keeps that out of every load."""
    from solarjax import ckpt, loading

    source = loading.detect(run[0])
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl.removeFilter(ckpt._not_item_metadata_warning)
        try:
            loading.load(source)
        finally:
            absl.addFilter(ckpt._not_item_metadata_warning)
        assert any("Metadata file does not exist" in r.getMessage() for r in caplog.records)  # unfiltered: it is there
        caplog.clear()
        loading.load(source)
    assert not any("Metadata file does not exist" in r.getMessage() for r in caplog.records)


def test_lm_eval_cli_keeps_its_scores_without_pytablewriter(run, tmp_path, monkeypatch, capsys):
    """``python -m solarjax.lm_eval_adapter``, lm-eval installed without pytablewriter: the results are
    written (--output_path) and printed as a plain table instead of crashing after the scoring."""
    from pathlib import Path

    from solarjax import lm_eval_adapter

    monkeypatch.setitem(sys.modules, "pytablewriter", None)  # `import pytablewriter` raises ImportError
    tasks = Path(__file__).parent / "lm_eval_tasks"
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "solarjax", "--model_args", f"path={run[0]},progress=false",
                                      "--tasks", "sjx_mc", "--include_path", str(tasks), "--limit", "4",
                                      "--output_path", str(tmp_path / "results")])
    lm_eval_adapter.main()
    printed = capsys.readouterr().out
    (saved,) = glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)
    acc = json.loads(Path(saved).read_text())["results"]["sjx_mc"]["acc,none"]
    row = next(line.split() for line in printed.splitlines() if line.split()[:3] == ["sjx_mc", "none", "acc"])
    assert float(row[3]) == pytest.approx(acc, abs=5e-5)


def test_upscale_refuses_a_plan_that_does_not_deepen(hf_llama_dir, tmp_path):
    code, _, err = cli("upscale", "--model", str(hf_llama_dir), "--out", str(tmp_path / "same"), "--m", "2",
                       "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "makes 4 layers from 4" in err and "m <= 1" in err and "--allow-shallower" in err
    assert not (tmp_path / "same").exists()
    code, out, err = cli("upscale", "--model", str(hf_llama_dir), "--out", str(tmp_path / "same"), "--m", "2",
                         "--allow-shallower", "--no-progress", "--json")
    assert code == 0, err
    assert json.loads(out)["layers_out"] == json.loads((tmp_path / "same" / "config.json").read_text())[
        "num_hidden_layers"] == 4
    # the trainer's init.upscale takes the same check, and init.allow_shallower lifts it
    code, _, err = cli("train", "--init", str(hf_llama_dir), "--config.init.upscale=solar:m=3", "--print-config")
    assert code == 1 and "makes 2 layers from 4" in err and "init.allow_shallower" in err
    code, out, err = cli("train", "--init", str(hf_llama_dir), "--config.init.upscale=solar:m=3",
                         "--config.init.allow_shallower=true", "--print-config")
    assert code == 0 and re.search(r"n_layers: 2\b", out), err


@pytest.mark.parametrize("override, says", [
    ("--config.optim.lr=fast", "optim.lr takes a number, not 'fast'"),
    ("--config.train.steps=2.5", "train.steps takes an integer, not 2.5"),
    ("--config.train.progress=maybe", "train.progress takes true or false, not 'maybe'"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_type(override, says):
    code, _, err = cli("train", "--config", "tiny", override, "--print-config")
    assert code == 1 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_wrong_text_field_lists_the_fields_found(tmp_path):
    from solarjax import data

    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text(json.dumps({"body": "some text", "id": 3}) + "\n")
    with pytest.raises(data.DataError) as err:
        data.read_documents(str(jsonl))
    assert "chat.jsonl:1: no string field 'text' (fields found: body, id)" in str(err.value)
    assert "--config.data.text_field=body" in str(err.value)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"content": ["a document"], "n": [1]}), tmp_path / "docs.parquet")
    with pytest.raises(data.DataError, match=r"no column 'text' \(columns: content, n\); .*text_field=content"):
        data.read_documents(str(tmp_path / "docs.parquet"))


def test_a_logger_asked_for_and_missing_is_an_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    code, _, err = cli("train", *TRAIN, "--steps", "1", "--out", str(tmp_path / "run"),
                       "--config.logging.tensorboard=true", "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert 'pip install "solarjax[tensorboard]"' in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_generate_json_is_one_object_for_one_prompt_or_several(run):
    """``generate --json`` keeps the one-object rule with a batch of prompts: ``{"completions": [...]}``,
    one entry per prompt in order, each the completion that prompt gets alone (greedy)."""
    out = str(run[0])
    base = ("generate", "--model", out, "--max-new-tokens", "4", "--temperature", "0", "--json", "--no-progress")
    alone = []
    for prompt in ("To be", "or not"):
        code, stdout, stderr = cli(*base, "--prompt", prompt)
        assert code == 0, stderr
        alone.append(json.loads(stdout))
    assert [a["prompt"] for a in alone] == ["To be", "or not"]
    code, stdout, stderr = cli(*base, "--prompt", "To be", "--prompt", "or not")
    assert code == 0, stderr
    both = json.loads(stdout)  # the whole of stdout: one object
    assert both == {"completions": alone}
