"""Perplexity, log-likelihood scoring, offline MMLU and the lm-eval adapter against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_generate import with_tokenizer


@pytest.fixture(scope="module")
def mistral(hf_mistral_dir, tmp_path_factory):
    """(model dir with a tiny tokenizer, transformers model, cfg, params, tokenizer)."""
    import transformers

    from solarjax.generate import load_model

    path = with_tokenizer(hf_mistral_dir, tmp_path_factory.mktemp("eval") / "mistral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    cfg, params, tok = load_model(path)
    return path, hf, cfg, params, tok


def hf_logprobs(hf, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from transformers."""
    import torch

    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy(), logits.argmax(-1).numpy()


def hf_strided_nll(hf, ids, window, stride):
    """transformers' perplexity-guide loop: labels -100 on the context part of each window."""
    import torch

    nll, count, prev_end = 0.0, 0, 0
    x = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        labels = x[:, begin:end].clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf(x[:, begin:end], labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * n, count + n, end
        if end == len(ids):
            break
    return nll, count


def test_perplexity_matches_transformers_loss(mistral):
    import torch

    from solarjax.eval import perplexity

    _, hf, cfg, params, _ = mistral
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n).tolist() for n in (40, 23, 70)]
    one_window = perplexity(params, cfg, [docs[0]], window=64)
    with torch.no_grad():
        loss = hf(torch.tensor([docs[0]]), labels=torch.tensor([docs[0]])).loss.item()
    assert one_window.tokens == 39
    assert one_window.loss == pytest.approx(loss, abs=2e-5)

    strided = perplexity(params, cfg, docs, window=32, stride=12, batch_size=4)
    nll, count = map(sum, zip(*(hf_strided_nll(hf, d, 32, 12) for d in docs)))
    assert strided.tokens == count == sum(len(d) - 1 for d in docs)
    assert strided.loss == pytest.approx(nll / count, abs=2e-5)


def test_loglikelihoods_match_transformers(mistral):
    from solarjax.eval import EvalError, loglikelihoods

    _, hf, cfg, params, _ = mistral
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 256, n).tolist() for n in (12, 30, 7, 19)]
    requests = [(s[:-k], s[-k:]) for s, k in zip(seqs, (1, 5, 1, 3))]
    requests.append((seqs[0][:-1], [7]))  # shares a context with request 0: one forward for both
    got = loglikelihoods(params, cfg, requests, batch_size=2)
    for (ctx, cont), (logp, greedy) in zip(requests, got):
        ref, argmax = hf_logprobs(hf, ctx + cont)
        assert logp == pytest.approx(ref[-len(cont):].sum(), abs=5e-5)
        assert greedy == bool(np.all(argmax[len(ctx) - 1:-1] == cont))
    long = rng.integers(3, 256, 160).tolist()  # 256-long bucket: the head runs in two chunks of positions
    (logp, _), = loglikelihoods(params, cfg, [(long[:20], long[20:])], max_length=256)
    assert logp == pytest.approx(hf_logprobs(hf, long)[0][19:].sum(), abs=5e-4)
    (logp, _), = loglikelihoods(params, cfg, [(long[:20], long[20:])], max_length=100)  # keeps the last 101
    assert logp == pytest.approx(hf_logprobs(hf, long[-101:])[0].sum(), abs=5e-4)
    with pytest.raises(EvalError, match="empty continuation"):
        loglikelihoods(params, cfg, [([1], [])])


def test_mmlu_loader_parses_the_shipped_questions():
    from solarjax.eval import format_mmlu, load_mmlu, mmlu_file

    subjects = json.loads(mmlu_file().read_text())
    questions = load_mmlu()
    assert len(subjects) == 57 and len(questions) >= 270
    assert {q.subject for q in questions} == set(subjects)
    assert all(len(q.choices) == 4 and q.answer in "ABCD" and q.question and all(q.choices) for q in questions)
    first = load_mmlu(["abstract_algebra"])[0]
    assert first.choices == ("True, True", "False, False", "True, False", "False, True") and first.answer == "C"
    prompt = format_mmlu(first)
    assert prompt.endswith("C. True, False\nD. False, True\nAnswer:") and "about abstract algebra" in prompt
    with pytest.raises(ValueError, match="unknown MMLU subjects"):
        load_mmlu(["astrology"])


def test_mmlu_accuracy_picks_transformers_argmax_letter(mistral):
    from solarjax.eval import LETTERS, encode_pair, format_mmlu, load_mmlu, mmlu_accuracy

    _, hf, cfg, params, tok = mistral
    questions = load_mmlu(["astronomy", "virology", "marketing"])
    result = mmlu_accuracy(params, cfg, tok, limit=4, questions=questions, batch_size=4)
    assert result.total == 4 and len({s for s in result.per_subject}) == 3  # round-robin over subjects
    chosen = [questions[0], questions[5], questions[10], questions[1]]
    assert [q.subject for q in chosen] == ["astronomy", "virology", "marketing", "astronomy"]
    expected = []
    for q in chosen:
        scores = []
        for letter in LETTERS:
            ctx, cont = encode_pair(tok, format_mmlu(q), f" {letter}")
            scores.append(hf_logprobs(hf, ctx + cont)[0][-len(cont):].sum())
        expected.append(LETTERS[int(np.argmax(scores))])
    assert result.predictions == expected
    assert result.correct == sum(p == q.answer for p, q in zip(expected, chosen))

    from solarjax.eval import eval_suite, text_perplexity

    suite = eval_suite(params, cfg, tok, ["The quick brown fox jumps over the lazy dog."], mmlu_limit=2, window=16)
    assert suite["mmlu_n"] == 2 and 0 <= suite["mmlu_acc"] <= 1
    assert suite["ppl"] == text_perplexity(params, cfg, tok, ["The quick brown fox jumps over the lazy dog."],
                                           window=16).ppl


def test_lm_eval_adapter_against_transformers(mistral):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from solarjax.lm_eval_adapter import SolarJaxLM

    path, hf, cfg, params, tok = mistral
    assert get_model("solarjax") is SolarJaxLM
    lm = SolarJaxLM.create_from_arg_string(f"path={path},batch_size=4,max_length=24", {"device": "cpu"})

    # a tiny local multiple-choice task: one question, four answers
    doc = {"question": "Question: what is two plus two?\nAnswer:", "choices": [" four", " two", " one", " three"]}
    reqs = [Instance("loglikelihood", doc, (doc["question"], c), i) for i, c in enumerate(doc["choices"])]
    reqs.append(Instance("loglikelihood", doc, ("", "The quick brown fox"), 9))  # empty context -> BOS prefix
    assert lm.prefix_token_id == cfg.bos_token_id != lm.eot_token_id  # lm-eval's HFLM rule, not TemplateLM's EOT
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for req, (logp, _) in zip(reqs, got):
        ctx, cont = req.args
        ctx_ids = tok.encode(ctx, add_special_tokens=False).ids if ctx else [cfg.bos_token_id]
        whole = tok.encode(ctx + cont, add_special_tokens=False).ids if ctx else ctx_ids + tok.encode(cont).ids
        n = len(whole) - len(ctx_ids)  # lm-eval scores context ids + the tail of the whole encoding
        assert logp == pytest.approx(hf_logprobs(hf, ctx_ids + whole[-n:])[0][-n:].sum(), abs=5e-5)

    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 3)  # longer than max_length: rolls
    ids = [cfg.bos_token_id] + tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > 24 + 8  # at least two windows
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # lm-eval's own window rule is the spec: disjoint windows of max_length, prefixed by BOS
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids[1:], cfg.bos_token_id, 24, 1)]
    assert len(windows) == 2
    expected = sum(hf_logprobs(hf, ctx + cont)[0][-len(cont):].sum() for ctx, cont in windows)
    assert rolling[0] == pytest.approx(expected, abs=2e-4)

    gen = lm.generate_until([Instance("generate_until", {}, ("The quick", {"until": ["\n\n"], "max_gen_toks": 8}), 0)],
                            disable_tqdm=True)
    import torch

    prompt = tok.encode("The quick", add_special_tokens=False).ids
    hf.generation_config.eos_token_id = cfg.eos_token_id
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)[0, len(prompt):].tolist()
    out = out[:out.index(cfg.eos_token_id)] if cfg.eos_token_id in out else out
    assert gen == [tok.decode(out).split("\n\n")[0]]


def test_eval_cli(mistral, tmp_path, capsys):
    from solarjax.cli import main

    path = mistral[0]
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in ("The quick brown fox.", "Answer: four.")) + "\n")
    assert main(["eval", "ppl", "--model", str(path), "--data", str(data), "--window", "16", "--json"]) == 0
    result = result_ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["documents"] == 2 and result["ppl"] > 1
    assert main(["eval", "mmlu", "--model", str(path), "--limit", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total"] == 3 and 0 <= result["accuracy"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    assert main(["eval", "ppl", "--model", str(path), "--data", str(bad)]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err
    # nonsensical limits: one line naming the flag, before any model is loaded
    for argv, name in ((["ppl", "--data", str(data), "--batch-size", "0"], "batch_size must be a positive integer"),
                       (["ppl", "--data", str(data), "--window", "-4"], "window must be a positive integer"),
                       (["ppl", "--data", str(data), "--window", "1"], "window must be at least 2"),
                       (["mmlu", "--limit", "-1"], "--limit must be 0 (no limit) or a positive count"),
                       (["mmlu", "--shots", "-1"], "--shots must be 0 or more")):
        assert main(["eval", argv[0], "--model", str(path), *argv[1:]]) == 1
        err = capsys.readouterr().err
        assert name in err and len(err.strip().splitlines()) == 1, err
    # int8 weights: perplexity within a few percent of fp32 on this random model
    assert main(["eval", "ppl", "--model", str(path), "--data", str(data), "--window", "16", "--json",
                 "--quantize", "int8"]) == 0
    quantized = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert quantized["tokens"] == result_ppl["tokens"] and quantized["loss"] == pytest.approx(result_ppl["loss"], rel=0.02)


TASKS_DIR = __import__("pathlib").Path(__file__).parent / "lm_eval_tasks"


def test_lm_eval_harness_solarjax_equals_its_own_hf_model(tmp_path):
    """lm-eval as the client, its ``hf`` model as the oracle: the local multiple-choice,
    rolling-log-likelihood and generate_until tasks in tests/lm_eval_tasks give the same per-sample
    results for ``solarjax`` and ``hf`` on one tiny random Llama with a BOS/EOS tokenizer."""
    import lm_eval.models.huggingface  # noqa: F401  (registers "hf")
    import torch
    import transformers
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    import solarjax.lm_eval_adapter  # noqa: F401  (registers "solarjax")
    from test_generate import make_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(tmp_path)
    tasks = ["sjx_mc", "sjx_rolling", "sjx_gen"]
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    common = dict(tasks=tasks, task_manager=manager, log_samples=True)
    # HFLM's scores of one rolling window change with its batch composition; batch 1 is its exact answer
    ref = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path},dtype=float32,max_length=32",
                          device="cpu", batch_size=1, **common)
    ours = simple_evaluate(model="solarjax", model_args=f"path={tmp_path},max_length=32", batch_size=4, **common)
    for task in tasks:
        ref_samples, our_samples = ref["samples"][task], ours["samples"][task]
        assert len(ref_samples) == len(our_samples) > 0
        for a, b in zip(ref_samples, our_samples):
            if task == "sjx_gen":
                assert a["resps"] == b["resps"] and a["resps"][0][0]  # identical, non-empty text
            else:
                got = np.array([[float(x) for x in np.ravel(r)] for r in b["resps"]])
                want = np.array([[float(x) for x in np.ravel(r)] for r in a["resps"]])
                np.testing.assert_allclose(got, want, atol=2e-3)  # log-likelihoods (and greedy flags)
        for metric, value in ref["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
