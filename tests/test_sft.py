"""SFT: response masks vs transformers' tokenizer/chat template, packed loss vs transformers, bad data, CLI run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sft_fixtures import (PLAIN_CHAT_TEMPLATE, alpaca_records, alpaca_rows, chat_records, hf_tokenizer,  # noqa: E402
                          model_with_tokenizer, write_jsonl)

from solarjax import sft  # noqa: E402
from solarjax.data import load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(hf_llama_dir, tmp_path_factory):
    return model_with_tokenizer(hf_llama_dir, tmp_path_factory.mktemp("sft") / "model")


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def test_alpaca_prompt_text():
    assert sft.alpaca_prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")


def test_alpaca_mask_is_exactly_the_response(model_dir, tok):
    """Tokens = bos + tokenize(prompt + output) + eos; mask = the tokens after tokenize(prompt) (transformers)."""
    hf = hf_tokenizer(model_dir)
    encoder = sft.Encoder(tok, 128, "alpaca", bos_id=1, eos_id=2)
    for i, record in enumerate(alpaca_records(6)):
        example = encoder.encode(sft.record_messages(record, f"r:{i}"))
        prompt = sft.alpaca_prompt(record["instruction"], record["input"])
        full = [1] + hf(prompt + record["output"], add_special_tokens=False)["input_ids"] + [2]
        n_prompt = 1 + len(hf(prompt, add_special_tokens=False)["input_ids"])
        np.testing.assert_array_equal(example["inputs"], full[:-1])
        np.testing.assert_array_equal(example["targets"], full[1:])
        expected = (np.arange(1, len(full)) >= n_prompt).astype(np.int32)
        np.testing.assert_array_equal(example["loss_mask"], expected)
        assert example["loss_mask"].sum() == len(hf(record["output"], add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize("tagged", [True, False], ids=["generation-tags", "prefix-rendering"])
def test_chat_mask_matches_transformers_assistant_mask(model_dir, tok, tagged):
    """Multi-turn chats: ids and every assistant turn's mask equal apply_chat_template's assistant_masks."""
    hf = hf_tokenizer(model_dir)
    template = sft.load_chat_template(model_dir)
    if not tagged:
        template = sft.ChatTemplate(PLAIN_CHAT_TEMPLATE, "<s>", "</s>")
    encoder = sft.Encoder(tok, 128, "chat", template)
    for record in chat_records(3):
        example = encoder.encode(sft.record_messages(record, "c:1"))
        ref = hf.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        np.testing.assert_array_equal(example["inputs"], ref["input_ids"][:-1])
        np.testing.assert_array_equal(example["targets"], ref["input_ids"][1:])
        np.testing.assert_array_equal(example["loss_mask"], ref["assistant_masks"][1:])
        assert example["loss_mask"].sum() > 0


def test_packed_loss_equals_unpacked_transformers_loss(model_dir, tok):
    """Several examples per row (segment ids, restarted positions): loss = transformers' per-example sums."""
    import jax
    import torch
    import transformers

    from solarjax.hf import load_hf
    from solarjax.train import next_token_loss

    encoder = sft.Encoder(tok, 96, "alpaca", bos_id=1, eos_id=2)
    records = alpaca_records(7, seed=5)
    examples = [encoder.encode(sft.record_messages(r, "p:1")) for r in records]
    batches = list(sft.make_sft_dataset(examples, seq_len=96, batch_size=2, shuffle=False, repeat=False))
    assert max(b["segment_ids"].max() for b in batches) >= 2, "expected several examples in a row"
    cfg, params = load_hf(model_dir)
    ours_sum, ours_tokens = 0.0, 0.0
    loss_fn = jax.jit(lambda p, b: next_token_loss(p, b, cfg)[1])
    for b in batches:
        m = loss_fn(params, b)
        ours_sum += float(m["loss"]) * float(m["tokens"])
        ours_tokens += float(m["tokens"])

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = hf_tokenizer(model_dir)
    ref_sum, ref_tokens = 0.0, 0
    for r in records:
        prompt = sft.alpaca_prompt(r["instruction"], r["input"])
        ids = [1] + hf(prompt + r["output"], add_special_tokens=False)["input_ids"] + [2]
        n_prompt = 1 + len(hf(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
        ref_sum += float(nll[n_prompt - 1:].sum())
        ref_tokens += len(ids) - n_prompt
    assert ours_tokens == ref_tokens
    np.testing.assert_allclose(ours_sum / ours_tokens, ref_sum / ref_tokens, rtol=1e-5)


def test_unpacked_rows_hold_one_example(tok):
    encoder = sft.Encoder(tok, 96, "alpaca")
    examples = [encoder.encode(sft.record_messages(r, "u:1")) for r in alpaca_records(5)]
    batches = list(sft.make_sft_dataset(examples, seq_len=96, batch_size=2, pack=False, shuffle=False, repeat=False))
    assert [b["tokens"].shape[0] for b in batches] == [2, 2, 2]  # the last one filled up with an empty row
    assert all(b["segment_ids"].max() == 1 for b in batches)
    assert batches[-1]["segment_ids"][1].max() == 0 and batches[-1]["loss_mask"][1].sum() == 0


def test_rows_from_a_file_are_the_tokenizers_ids_and_the_records_masks(tmp_path, tok):
    """JSONL -> load_examples -> unpacked eval batches, against the tokenizer applied to each record,
    the mask from the record's prompt/response split, and the padding arithmetic (5 rows in 3 x 2)."""
    records = alpaca_records(5)
    examples, stats = sft.load_examples(str(write_jsonl(tmp_path / "d.jsonl", records)), sft.Encoder(tok, 64))
    assert stats.kept == 5 and not stats.skipped and not stats.truncated
    batches = list(sft.make_sft_dataset(examples, seq_len=64, batch_size=2, pack=False, shuffle=False, repeat=False))
    assert len(batches) == 3 and all(b[k].shape == (2, 64) for b in batches for k in b)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)]
    for record, row in zip(records, rows):
        want = alpaca_rows(tok, record["instruction"], record["output"], record["input"])
        n = len(want["tokens"])
        for key in ("tokens", "targets", "loss_mask"):
            np.testing.assert_array_equal(row[key], want[key] + [0] * (64 - n), err_msg=key)
        np.testing.assert_array_equal(row["segment_ids"], [1] * n + [0] * (64 - n))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
    assert all(not row[k].any() for row in rows[5:] for k in row)  # the filler row: nothing at all


def test_a_long_line_is_a_bad_record_naming_its_line(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sft, "MAX_RECORD_BYTES", 200)
    good = alpaca_records(2)
    path = write_jsonl(tmp_path / "long.jsonl", [good[0], {"instruction": "Repeat.", "output": "red " * 60}, good[1]])
    with pytest.raises(sft.SFTDataError, match=rf"long\.jsonl:2: a line longer than 200 bytes"):
        sft.load_examples(str(path), sft.Encoder(tok, 64))
    examples, stats = sft.load_examples(str(path), sft.Encoder(tok, 64), skip_bad=True)
    assert len(examples) == 2 and sum(stats.skipped.values()) == 1


def test_bad_records_name_file_and_line(tmp_path, tok):
    good = alpaca_records(2)
    long_prompt = {"instruction": " ".join(["red"] * 200), "output": "blue"}
    bad = [
        ("{not json", "not valid JSON"),
        ({"instruction": "Repeat the words: red"}, "'output'"),
        ({"instruction": "Repeat.", "output": "   "}, "empty response"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "empty assistant"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"text": "hello"}, "needs 'instruction' and 'output'"),
        (long_prompt, "prompt has"),
    ]
    encoder = sft.Encoder(tok, 64, "alpaca")
    for i, (record, message) in enumerate(bad):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [good[0], record, good[1]])
        with pytest.raises(sft.SFTDataError, match=message) as err:
            sft.load_examples(str(path), encoder)
        assert f"{path}:2" in str(err.value)
    path = write_jsonl(tmp_path / "mixed.jsonl", good + [r for r, _ in bad])
    examples, stats = sft.load_examples(str(path), encoder, skip_bad=True)
    assert len(examples) == 2 and sum(stats.skipped.values()) == len(bad)
    assert "skipped 7 bad records" in stats.summary()
    # a long response is truncated to seq_len (prompt kept), not rejected
    long_out = {"instruction": "Repeat.", "output": " ".join(["red"] * 100)}
    examples, stats = sft.load_examples(str(write_jsonl(tmp_path / "long.jsonl", [long_out])), encoder)
    assert stats.truncated == 1 and len(examples[0]["inputs"]) == 64 and examples[0]["loss_mask"][-1] == 1


def test_parquet_rows_and_chat_template_choice(tmp_path, model_dir, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = alpaca_records(3) + [{"instruction": "", "input": "", "output": "red"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    encoder = sft.Encoder(tok, 96, "chat", sft.load_chat_template(model_dir))
    with pytest.raises(sft.SFTDataError, match=r"d\.parquet:row 4: field 'instruction' is empty"):
        sft.load_examples(str(tmp_path / "d.parquet"), encoder)
    with pytest.raises(sft.SFTDataError, match="Alpaca template takes one user turn"):
        sft.Encoder(tok, 96, "alpaca").encode(sft.record_messages(chat_records(1)[0], "c:1"), "c:1")


def test_sft_cli_lowers_response_loss(tmp_path, model_dir):
    """``solarjax sft`` from an HF dir (tokenizer + chat template beside it): loss falls, checkpoint written."""
    from solarjax.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_records(40) + chat_records(8))
    out = tmp_path / "run"
    rc = main(["sft", "--config", "sft_tiny", "--data", str(data), "--init", str(model_dir), "--out", str(out),
               "--steps", "12", "--config.train.seq_len=64", "--config.train.log_every=1",
               "--config.train.progress=False", "--config.optim.lr=3e-3", "--config.optim.warmup_steps=2",
               "--config.sft.template", "chat"])
    assert rc == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:2]), losses
    assert (out / "checkpoints" / "12" / "params").is_dir()
    assert (out / "tokenizer_config.json").is_file()


def test_a_sft_run_generates_by_its_directory_or_a_step(tmp_path, model_dir, hf_llama_dir, capsys):
    """After ``solarjax sft --out RUN``, ``generate --model RUN`` and ``--model RUN/checkpoints/N`` need
    nothing else (the run keeps its tokenizer and chat template); the chat prompt and the greedy
    continuation are transformers' for the same weights (the run's ``--export-hf`` directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from solarjax.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", alpaca_records(8))
    run = tmp_path / "run"
    assert main(["sft", "--data", str(data), "--init", str(model_dir), "--out", str(run), "--steps", "2",
                 "--config.train.seq_len=64", "--no-progress", "--export-hf", str(tmp_path / "hf")]) == 0
    prompt = "Repeat the words: red cat"
    completions = []
    for model in (run, run / "checkpoints" / "2"):
        capsys.readouterr()
        assert main(["generate", "--model", str(model), "--prompt", prompt, "--chat", "--no-stream",
                     "--max-new-tokens", "6"]) == 0, capsys.readouterr().err
        shown = capsys.readouterr().out
        assert shown.startswith(prompt + "\n"), shown
        completions.append(shown[len(prompt) + 1:].rstrip("\n"))
    assert completions[0] == completions[1]

    hf_tok = hf_tokenizer(tmp_path / "hf")
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=False)
    from solarjax.generate import chat_prompt

    assert chat_prompt(run, prompt) == rendered == chat_prompt(hf_llama_dir, prompt, tokenizer=model_dir)
    ids = torch.tensor([hf_tok(rendered).input_ids])
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    out = hf_model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                            pad_token_id=hf_tok.pad_token_id)
    assert completions[0] == hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
