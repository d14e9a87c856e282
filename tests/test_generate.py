"""KV-cache generation against transformers: greedy ids, cached logits, sampling filters, CLI."""

from __future__ import annotations

import shutil
import string

import numpy as np
import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two?\nAnswer: four.",
    "The following are multiple choice questions (with answers) about algebra.",
    "A. one\nB. two\nC. three\nD. four",
]


def make_tokenizer(vocab_size: int = 200):
    """A tiny BPE (Metaspace, like SentencePiece) with <unk>=0, <s>=1, </s>=2, vocab <= 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list(string.printable.strip()) + ["\n", "▁"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def with_tokenizer(src, dst):
    """A copy of an HF fixture dir with a tiny tokenizer.json beside the weights."""
    shutil.copytree(src, dst)
    make_tokenizer().save(str(dst / "tokenizer.json"))
    return dst


@pytest.fixture(scope="module")
def models(hf_llama_dir, hf_mistral_dir):
    """kind -> (transformers model, cfg, params)."""
    import transformers

    from solarjax.generate import load_model

    out = {}
    for kind, path in (("llama", hf_llama_dir), ("mistral", hf_mistral_dir)):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        hf.generation_config.eos_token_id = None  # compare full length; stop tokens are tested apart
        hf.generation_config.pad_token_id = 0
        cfg, params, _ = load_model(path)
        out[kind] = (hf, cfg, params)
    return out


PROMPTS = [[5, 17, 99, 3, 200], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 250], [42, 43, 44]]


def hf_greedy(hf, prompts, n):
    import torch

    length = max(map(len, prompts))
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.tensor(p)
        mask[row, length - len(p):] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n)
    return out[:, length:].tolist()


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_batched_left_padded_matches_transformers(models, kind):
    from solarjax.generate import generate

    hf, cfg, params = models[kind]
    expected = hf_greedy(hf, PROMPTS, 40)  # 40 > mistral's window of 8: the window is exercised
    assert generate(params, cfg, PROMPTS, max_new_tokens=40) == expected
    if kind == "mistral":  # the streaming path (one compiled step per token) gives the same ids
        seen = []
        assert generate(params, cfg, PROMPTS, max_new_tokens=40, on_token=seen.append) == expected
        assert np.stack(seen, axis=1).tolist() == expected


def test_cached_decode_logits_equal_full_forward(models):
    """Prefill a left-padded batch, then decode teacher-forced tokens one at a time."""
    import jax.numpy as jnp
    import torch

    from solarjax.generate import forward_cached, init_cache, left_pad

    hf, cfg, params = models["mistral"]
    rng = np.random.default_rng(0)
    full = [rng.integers(3, 256, n).tolist() for n in (14, 9)]
    n_decode = 6
    prompts = [f[:-n_decode] for f in full]
    tokens, segments, positions = left_pad(prompts, 16)
    cache = init_cache(cfg, 2, 16 + n_decode)
    logits, cache = forward_cached(params, cache, jnp.asarray(tokens), jnp.asarray(positions),
                                   jnp.asarray(segments), 0, cfg)
    steps = [np.asarray(logits[:, -1])]
    pos = positions[:, -1]
    for i in range(n_decode - 1):
        pos = pos + 1
        tok = np.array([[f[len(f) - n_decode + i]] for f in full])
        logits, cache = forward_cached(params, cache, jnp.asarray(tok), jnp.asarray(pos[:, None]),
                                       jnp.ones((2, 1), jnp.int32), 16 + i, cfg)
        steps.append(np.asarray(logits[:, -1]))
    ours = np.stack(steps, axis=1)  # logits predicting the last n_decode tokens of each row
    for row, f in enumerate(full):
        with torch.no_grad():
            ref = hf(torch.tensor([f])).logits[0].numpy()
        np.testing.assert_allclose(ours[row], ref[len(f) - n_decode - 1:len(f) - 1], atol=2e-5, rtol=1e-5)


def test_sampling_filters_and_stop_tokens(models):
    import jax
    import jax.numpy as jnp

    from solarjax.generate import GenerationError, generate, sample_logits

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draws = np.asarray(sample_logits(logits, keys, jnp.float32(1.0), top_k=2))
    assert set(draws.tolist()) == {0, 1}  # top-k keeps the two most likely
    draws = np.asarray(sample_logits(logits, keys, jnp.float32(1.0), top_p=jnp.float32(0.7)))
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    draws = np.asarray(sample_logits(logits, keys, jnp.float32(1.0)))
    assert set(draws.tolist()) == {0, 1, 2, 3}
    assert np.all(np.asarray(sample_logits(logits, keys, jnp.float32(0.0))) == 0)  # greedy

    hf, cfg, params = models["llama"]
    greedy = generate(params, cfg, PROMPTS, max_new_tokens=12)
    assert generate(params, cfg, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1, seed=3) == greedy
    stop = greedy[0][4]
    stopped = generate(params, cfg, PROMPTS, max_new_tokens=12, stop_tokens=[stop])
    first = greedy[0].index(stop)
    assert stopped[0] == greedy[0][:first + 1]
    for got, full in zip(stopped, greedy):
        assert got == (full[:full.index(stop) + 1] if stop in full else full)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(params, cfg, [[cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(params, cfg, [[]], max_new_tokens=2)


def test_text_streaming_orbax_and_cli(hf_llama_dir, models, tmp_path, capsys):
    from solarjax.ckpt import save_params
    from solarjax.cli import main
    from solarjax.generate import generate_text, load_model

    model_dir = with_tokenizer(hf_llama_dir, tmp_path / "llama")
    cfg, params, tok = load_model(model_dir)
    pieces = []
    texts = generate_text(params, cfg, tok, ["The quick"], max_new_tokens=16, stream=pieces.append, stop_tokens=[])
    assert "".join(pieces) == texts[0] and texts[0]
    cut = texts[0][3:6]
    stopped = generate_text(params, cfg, tok, ["The quick"], max_new_tokens=16, stop_tokens=[],
                            stop_strings=[cut])
    assert stopped[0] == texts[0][:texts[0].find(cut)]

    save_params(tmp_path / "orbax", params, cfg)
    cfg2, params2, tok2 = load_model(tmp_path / "orbax", model_dir / "tokenizer.json")
    assert generate_text(params2, cfg2, tok2, ["The quick"], max_new_tokens=16, stop_tokens=[]) == texts

    assert main(["generate", "--model", str(model_dir), "--prompt", "The quick", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.startswith("The quick")
    assert main(["generate", "--model", str(hf_llama_dir), "--prompt", "x"]) == 1  # no tokenizer.json
    assert "--tokenizer" in capsys.readouterr().err
    long_prompt = ["--model", str(model_dir), "--prompt", "The quick brown fox. " * 40, "--max-new-tokens", "4"]
    assert main(["generate", *long_prompt]) == 1  # longer than the context (128): one line, never silent
    err = capsys.readouterr().err.strip()
    assert "exceeds the model's context of 128 tokens" in err and "--truncate left" in err and len(err.splitlines()) == 1
    assert main(["generate", *long_prompt, "--truncate", "left", "--no-stream", "--quantize", "int8"]) == 0


def test_ring_cache_equals_full_cache_and_is_bounded_by_the_window(models):
    """Mistral (window 8): prompts up to 11 tokens and 24 new ones wrap the 8-slot ring several times."""
    import jax.numpy as jnp

    from solarjax.generate import cache_length, forward_cached, generate, init_cache, left_pad

    hf, cfg, params = models["mistral"]
    assert cache_length(cfg, 16 + 32) == cfg.sliding_window == 8 and cache_length(cfg, 48, ring=False) == 48
    assert generate(params, cfg, PROMPTS, max_new_tokens=24) == generate(params, cfg, PROMPTS, max_new_tokens=24,
                                                                         ring=False)
    # logits, step by step: an 8-slot ring and a 40-slot cache after a 16-column prefill
    rng = np.random.default_rng(3)
    tokens, segments, positions = left_pad([rng.integers(3, 256, 13).tolist(), [9, 10]], 16)
    import jax

    step = jax.jit(forward_cached, static_argnames=("cfg", "last_only", "fresh", "unroll"))
    caches = [init_cache(cfg, 2, 8), init_cache(cfg, 2, 40)]
    outs = [step(params, c, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), 0, cfg,
                 fresh=True) for c in caches]
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
    caches = [o[1] for o in outs]
    pos = positions[:, -1]
    for i in range(12):
        pos = pos + 1
        tok = jnp.asarray(rng.integers(3, 256, (2, 1)))
        outs = [step(params, c, tok, jnp.asarray(pos[:, None]), jnp.ones((2, 1), jnp.int32), 16 + i, cfg)
                for c in caches]
        np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
        caches = [o[1] for o in outs]
    assert caches[0].k.shape[2] == 8


def test_prompt_longer_than_context_is_an_error_or_explicit_truncation(models):
    from solarjax.generate import GenerationError, generate

    hf, cfg, params = models["llama"]  # max_seq_len 128
    long = list(range(3, 3 + 120))
    with pytest.raises(GenerationError, match=r"120 tokens plus max_new_tokens=16 exceeds the model's context of 128"):
        generate(params, cfg, [long], max_new_tokens=16)
    with pytest.raises(GenerationError, match="leaves no room"):
        generate(params, cfg, [[5]], max_new_tokens=128)
    assert generate(params, cfg, [long], max_new_tokens=4, truncate="left") == hf_greedy(hf, [long[-(128 - 4):]], 4)


def test_int8_generate_equals_transformers_on_the_dequantized_weights(models):
    """The int8 model is exactly the model whose weights are values * scale: transformers with those
    weights is the oracle (greedy ids over 20 steps)."""
    import copy

    import torch

    from solarjax.decode_layout import unstack_layers
    from solarjax.generate import generate
    from solarjax.hf import hf_tensors
    from solarjax.quant import dequantize_params, is_quantized, quantize_params

    hf, cfg, params = models["llama"]
    qparams = quantize_params(params)
    assert is_quantized(qparams) and qparams["layers"]["wq"].values.dtype == np.int8
    ref = copy.deepcopy(hf)
    state = {name: torch.tensor(np.array(w)) for name, w in hf_tensors(dequantize_params(qparams), cfg)}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    expected = hf_greedy(ref, PROMPTS, 20)
    assert generate(qparams, cfg, PROMPTS, max_new_tokens=20) == expected
    assert generate(unstack_layers(qparams), cfg, PROMPTS, max_new_tokens=20) == expected  # decode layout


def test_decode_layout_generates_what_transformers_does(models):
    """Each layer in its own arrays with fused projections (``unstack_layers``, the CLI's decode
    layout): the same greedy ids as transformers for a sliding-window model past its window, in
    one program and streamed; ``consume`` frees the stacked arrays it split."""
    import jax

    from solarjax.decode_layout import unstack_layers
    from solarjax.generate import generate

    hf, cfg, params = models["mistral"]
    stacked = jax.tree.map(lambda a: a.copy(), params)
    layout = unstack_layers(stacked, consume=True)
    assert len(layout["layers"]) == cfg.n_layers and stacked["layers"]["wq"].is_deleted()
    assert {"wqkv", "w_gate_up"} <= set(layout["layers"][1]) and not {"wq", "w_up"} & set(layout["layers"][1])
    expected = hf_greedy(hf, PROMPTS, 40)
    assert generate(layout, cfg, PROMPTS, max_new_tokens=40) == expected
    assert generate(layout, cfg, PROMPTS, max_new_tokens=40, on_token=lambda tokens: None) == expected


def test_chat_prompt_of_a_gguf_is_transformers():
    """``generate --chat`` on a .gguf renders the template it carries as transformers' GGUF tokenizer does."""
    from transformers import AutoTokenizer

    from solarjax.generate import chat_prompt
    from solarjax.gguf import default_gguf_path

    path = default_gguf_path()
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert chat_prompt(path, "Name a colour.", system="Be brief.") == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
