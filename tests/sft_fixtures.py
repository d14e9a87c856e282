"""Shared by the SFT and DPO tests: a tiny BPE tokenizer with a chat template, toy data, model dirs.

The tokenizer is trained in-test (``tokenizers``, vocab <= 256, ids 0/1/2 = <unk>/<s>/</s>) on the
Alpaca template and the toy data, and saved with a ``tokenizer_config.json`` whose chat template
marks assistant turns with ``{% generation %}``, so transformers' own assistant mask is an oracle.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

WORDS = "red green blue cat dog sun moon tree bird fish one two three four five".split()

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# the same layout without generation tags: responses are found by rendering prefixes
PLAIN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        if i % 3 == 2:
            out.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
        else:
            out.append({"instruction": "Repeat the words: " + " ".join(words), "input": "", "output": " ".join(words)})
    return out


def chat_records(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2), rng.sample(WORDS, 2)
        out.append({"messages": [
            {"role": "system", "content": "You repeat words."},
            {"role": "user", "content": "Repeat: " + " ".join(a)},
            {"role": "assistant", "content": " ".join(a)},
            {"role": "user", "content": "Repeat: " + " ".join(b)},
            {"role": "assistant", "content": " ".join(b)},
        ]})
    return out


def preference_records(n: int, seed: int = 2) -> list[dict]:
    """Prompts asking for words; chosen repeats them, rejected answers with other words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        out.append({"prompt": "Repeat the words: " + " ".join(words[:2]),
                    "chosen": " ".join(words[:2]), "rejected": " ".join(words[2:])})
    return out


def corpus() -> list[str]:
    from solarjax.sft import ALPACA_HEADER, ALPACA_HEADER_INPUT

    texts = [ALPACA_HEADER, ALPACA_HEADER_INPUT, "### Instruction: ### Input: ### Response: <|system|> <|user|> "
             "<|assistant|> Repeat: Repeat the words: Reverse the words. You repeat words."]
    texts += [json.dumps(r) for r in alpaca_records(30) + chat_records(10) + preference_records(10)]
    return texts


def build_tokenizer(out_dir: Path) -> Path:
    """Whitespace-split BPE (so a prompt's tokens are a prefix of prompt+response's), saved with its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    assert tok.get_vocab_size() <= 256
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    return out_dir


def model_with_tokenizer(hf_dir: Path, out_dir: Path) -> Path:
    """A copy of an HF model directory with the toy tokenizer beside it."""
    shutil.copytree(hf_dir, out_dir)
    build_tokenizer(out_dir)
    return out_dir


def hf_tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def alpaca_rows(tok, instruction: str, response: str, input: str = "", bos: int = 1, eos: int = 2) -> dict:
    """The oracle row of an Alpaca example, from the tokenizer alone: ``bos + ids(prompt + response) +
    eos`` shifted by one, the loss on the response tokens and eos (a Whitespace pre-tokenizer makes
    the prompt's ids a prefix of the whole text's)."""
    from solarjax.sft import alpaca_prompt

    prompt = alpaca_prompt(instruction, input)
    ids = [bos] + tok.encode(prompt + response, add_special_tokens=False).ids + [eos]
    prompt_len = 1 + len(tok.encode(prompt, add_special_tokens=False).ids)
    assert ids[:prompt_len][1:] == tok.encode(prompt, add_special_tokens=False).ids
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": [0] * (prompt_len - 1) + [1] * (len(ids) - prompt_len)}
