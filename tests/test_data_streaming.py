"""Long documents are tokenized in bounded pieces (issue 24 item 6), and bad bytes name file and line.

Oracle for the pieces: the tokenizer itself on the whole text. Cuts fall at whitespace, where the
pre-tokenizers used here (Metaspace, ByteLevel, and a SentencePiece-style normalizer that prepends
a word marker) split anyway, so the concatenated pieces must give exactly the whole text's ids.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from solarjax import data
from tests.train_fixtures import DOCS, word_tokenizer


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["the", "a", "cat", "sat", "on", "mat", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and"]
    return " ".join(rng.choice(vocab) + ("\n" if rng.random() < 0.02 else "") for _ in range(n))


def _metaspace():
    return data.train_tokenizer([_words(3000, seed=1)], 64)


def _byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_words(3000, seed=1)], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _sentencepiece_style():
    """Llama/Mistral as transformers converts them: the normalizer prepends "▁" to every input and
    replaces spaces, there is no pre-tokenizer (merges learnt within words)."""
    from tokenizers import normalizers

    tok = _metaspace()
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    return tok


@pytest.mark.parametrize("make,drops", [(_metaspace, False), (_byte_level, False), (_sentencepiece_style, True)])
def test_pieces_give_the_whole_texts_tokens(make, drops):
    tokenizer = make()
    text = _words(6000, seed=2)  # ~25 KB: 100 pieces of at most 256 characters
    tokenize = data._Tokenize(tokenizer, 1, 2, piece_chars=256)
    assert tokenize.drop_space is drops
    pieces = tokenize.pieces(text)
    assert len(pieces) > 50
    bounds = pieces.bounds
    assert max(b - a for a, b in zip(bounds, bounds[1:])) <= 256 and bounds[-1] == len(text)
    rows = [pieces[i] for i in range(len(pieces))]
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    assert np.concatenate([r["inputs"] for r in rows]).tolist() == [1] + whole
    assert np.concatenate([r["targets"] for r in rows]).tolist() == whole + [2]  # no target lost at a cut
    # a piece read out of order (a restored iterator) gets its carried token all the same
    again = tokenize.pieces(text)
    assert [again[i]["inputs"].tolist() for i in (7, 3)] == [rows[7]["inputs"].tolist(), rows[3]["inputs"].tolist()]


def test_piece_bounds_cut_at_whitespace_and_split_overlong_words():
    text = "ab " * 10 + "x" * 10_000 + " tail"
    bounds = data.piece_bounds(text, limit=16)
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert "".join(pieces) == text and all(len(p) <= 16 for p in pieces)
    assert all(p[0] == " " for p in pieces[1:] if "x" not in p)  # word pieces start at their space
    long = data.piece_bounds("y" * 20_000)
    assert max(b - a for a, b in zip(long, long[1:])) <= data.MAX_WORD_CHARS + 1


def test_a_long_document_resumes_mid_document_exactly():
    docs = [" ".join(DOCS) * 6] + DOCS[:5]  # one ~20 KB document among short ones
    make = lambda: data.make_dataset(docs, word_tokenizer(), seq_len=64, batch_size=4, seed=1,  # noqa: E731
                                     piece_chars=512)
    it = iter(make())
    data.take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as Orbax's JSON item stores it
    expected = data.take(it, 6)
    restored = iter(make())
    restored.set_state(state)
    for want, got in zip(expected, data.take(restored, 6), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


MEMORY_SCRIPT = r"""
import json, sys
from solarjax import data
from tests.train_fixtures import word_tokenizer

def peak_mb():  # VmHWM: this program's own peak (ru_maxrss keeps a forking parent's across exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

# one document of 5.6 MB x argv[2] (built without a list of words: the peak RSS stays low until now)
doc = (" ".join(f"w{i}" for i in range(23)) + " ") * 65_000 * int(sys.argv[2])
tok = word_tokenizer()
tok.encode("w1 w2")
import grain
grain.MapDataset.range(4).to_iter_dataset()  # grain's own import and threads are not the pipeline's
base = peak_mb()
if sys.argv[1] == "pipeline":
    it = iter(data.make_dataset([doc], tok, seq_len=1024, batch_size=8))
    for _ in range(200):  # 1.6M tokens: through the whole document and into its next epoch
        next(it)
else:  # a quarter of the document tokenized whole, for scale
    tok.encode(doc[: len(doc) // 4])
print(json.dumps(peak_mb() - base))
"""


def test_streaming_memory_is_bounded_by_a_piece():
    """Packing a one-line document through the pipeline (8 tokenizing threads, 64 pieces ahead) costs
    the same peak RSS for 5.6 MB and for 22 MB, and less than tokenizing a quarter of the small one
    whole (1/16 of what the big one whole would cost), each measured in a fresh process (grain's old
    defaults tokenized it whole, 16 threads at a time)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def growth_mb(what: str, scale: int) -> float:
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, what, str(scale)], capture_output=True, text=True,
                             cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, big, quarter = growth_mb("pipeline", 1), growth_mb("pipeline", 4), growth_mb("quarter", 1)
    assert quarter > 100, quarter  # the scale is real
    assert big < 1.5 * small + 30 and big < quarter, (small, big, quarter)


def test_invalid_utf8_names_file_and_line(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9 \xff"}\n')
    with pytest.raises(data.DataError) as err:
        data.read_documents(str(jsonl))
    assert str(err.value) == f"{jsonl}:3: not valid UTF-8 (byte 0xe9 at column 14)"
    text = tmp_path / "bad.txt"
    text.write_bytes(b"one line\nsecond \x80 line\n")
    with pytest.raises(data.DataError) as err:
        data.read_documents(str(text))
    assert str(err.value) == f"{text}:2: not valid UTF-8 (byte 0x80 at column 8)"
