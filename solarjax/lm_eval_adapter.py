"""lm-evaluation-harness model class ``solarjax``: the Open LLM Leaderboard tasks on our params.

Importing this module registers the class, so ``lm_eval.simple_evaluate(model="solarjax",
model_args="path=...")`` works after ``import solarjax.lm_eval_adapter``; the
``solarjax eval lm-eval`` verb does that import and then runs the harness (the plain ``lm_eval``
CLI never imports solarjax). Scoring goes through :func:`solarjax.eval.loglikelihoods` and
generation through :func:`solarjax.generate.generate`, so the harness sees the same numbers as
our own verbs.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from lm_eval.utils import make_table as _LM_EVAL_TABLE

from solarjax.eval import loglikelihoods
from solarjax.generate import cut_at_stop, generate, load_model, require_tokenizer


@register_model("solarjax")
class SolarJaxLM(TemplateLM):
    """A solarjax model (any path ``solarjax.loading`` reads) behind lm-eval's ``LM`` interface.

    ``model_args``: ``path`` (required unless ``params``/``cfg``/``tokenizer`` objects are
    passed), ``tokenizer`` (file or dir), ``batch_size``, ``max_length``, ``max_gen_toks``,
    ``dtype``, ``quantize`` (``int8``/``int4``: weight-only, :mod:`solarjax.quant`),
    ``add_bos_token`` and ``prefix_token_id``.

    Tokenization follows lm-eval's own ``hf`` model (HFLM), the reference this class is tested
    against: ``add_bos_token`` unset means the tokenizer's own post-processing (what
    ``AutoTokenizer.encode`` does), the prefix token for an empty context is the tokenizer's
    BOS (its EOS when it has none), and EOT is the tokenizer's EOS. Special tokens come from
    ``tokenizer_config.json`` beside the model (or inside a GGUF), else from the model config.
    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        add_bos_token: bool | str | None = None,
        prefix_token_id: int | None = None,
        quantize: str | None = None,
        params: Any = None,
        cfg: Any = None,
        progress: bool | str = True,
        **_ignored: Any,  # harness-wide options such as device / max_batch_size
    ) -> None:
        super().__init__()
        from solarjax.eval import check_positive

        self.progress = progress.lower() in ("1", "true", "yes") if isinstance(progress, str) else bool(progress)
        if params is not None and cfg is not None:
            self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        elif path is not None:
            tok_path = tokenizer if isinstance(tokenizer, str) else None
            self.cfg, self.params, loaded = load_model(path, tok_path, dtype=dtype)
            self.tokenizer = tokenizer if tokenizer is not None and tok_path is None else loaded
        else:
            raise ValueError("the solarjax lm-eval model needs model_args path=MODEL_DIR (or params=, cfg=)")
        require_tokenizer(self.tokenizer, path)
        if quantize:
            from solarjax.quant import quantize_params

            if quantize not in ("int8", "int4"):
                raise ValueError(f"quantize must be int8 or int4, got {quantize!r}")
            self.params = quantize_params(self.params, bits=int(quantize[3:]))
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length) if max_length else self.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        check_positive(batch_size=self.batch_size, max_length=self._max_length, max_gen_toks=self.max_gen_toks)
        if isinstance(add_bos_token, str):  # from a model_args string
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        self.add_bos_token = add_bos_token
        self.bos_id, self.eos_id = special_token_ids(path, self.tokenizer, self.cfg)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)

    # --------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.eos_id if self.eos_id is not None else 0

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS, else EOS (lm-eval's HFLM rule, not TemplateLM's EOT)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.bos_id if self.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is not None:
            special = add_special_tokens
        elif self.add_bos_token is not None:
            special = self.add_bos_token
        else:  # the tokenizer's default, unless the text already starts with the prefix token (as HFLM)
            prefix = self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)
            special = not (prefix and string.startswith(prefix))
        return self.tokenizer.encode(string, add_special_tokens=special).ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # --------------------------------------------------------------- scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = loglikelihoods(self.params, self.cfg, pairs, batch_size=self.batch_size,
                                 max_length=self.max_length, progress=self.progress and not disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood in disjoint windows of ``max_length``, prefixed by EOT."""
        per_doc, pairs = [], []
        for (string,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            per_doc.append(len(windows))
            pairs.extend(windows)
        scores = loglikelihoods(self.params, self.cfg, pairs, batch_size=self.batch_size,
                                max_length=self.max_length, progress=self.progress and not disable_tqdm)
        out, i = [], 0
        for (string,), n in zip((r.args for r in requests), per_doc):
            total = sum(s for s, _ in scores[i:i + n])
            i += n
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # --------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches requests that share generation settings; stops at ``until`` strings and EOT."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            options = dict(temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                           top_p=float(kwargs.pop("top_p", 1.0) or 1.0), seed=int(kwargs.pop("seed", 0) or 0))
            keep = max(self.max_length - max_new, 1)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in chunk]
                outs = generate(self.params, self.cfg, prompts, max_new_tokens=max_new, truncate="left",
                                stop_tokens=[self.eot_token_id], pad_id=self.eot_token_id, **options)
                for i, ids in zip(chunk, outs):
                    if ids and ids[-1] == self.eot_token_id:
                        ids = ids[:-1]
                    text = cut_at_stop(self.tok_decode(ids), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    results[i] = text
        return results  # type: ignore[return-value]


def special_token_ids(path: Any, tokenizer: Any, cfg: Any) -> tuple[int | None, int | None]:
    """(BOS, EOS) ids as an HF tokenizer would report them: the model's ``tokenizer_config.json``
    (beside its tokenizer, a run's included, or inside a GGUF), else the model config's ``bos_token_id`` / ``eos_token_id``."""
    from solarjax.generate import tokenizer_config

    config = tokenizer_config(path)[0] if path is not None else {}
    ids = []
    for name, fallback in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id)):
        if name in config:  # present (possibly null: no such token)
            token = config[name]
            token = token.get("content") if isinstance(token, dict) else token
            ids.append(tokenizer.token_to_id(token) if token else None)
        else:
            ids.append(fallback)
    return ids[0], ids[1]


def main() -> None:
    """``python -m solarjax.lm_eval_adapter --model solarjax --model_args path=DIR --tasks ...``.

    lm-eval's own ``lm_eval`` command only knows the models it imports itself and has no plugin
    hook; this entry point registers ``solarjax`` and then hands every argument to lm-eval's CLI,
    so the usual ``lm_eval`` flags (tasks, few-shot, limits, output paths) all work unchanged. Its
    closing table goes through :func:`results_table`, which needs no ``pytablewriter``.
    """
    import lm_eval.utils
    from lm_eval.__main__ import cli_evaluate

    lm_eval.utils.make_table = results_table  # the CLI prints its table after the scores are computed
    cli_evaluate()


def results_table(result_dict: dict[str, Any], column: str = "results", sort_results: bool = False) -> str:
    """lm-eval's own results table (``lm_eval.utils.make_table``, which needs ``pytablewriter``), or
    the same numbers as plain columns when that package is missing (lm-eval installed without its
    dependencies): a missing table writer must not lose scores that took the whole run to compute."""
    try:
        import pytablewriter  # noqa: F401
    except ImportError:
        return plain_table(result_dict, column, sort_results)
    return _LM_EVAL_TABLE(result_dict, column, sort_results)


def plain_table(result_dict: dict[str, Any], column: str = "results", sort_results: bool = False) -> str:
    """One row per task (or group) and metric: name, filter, value, stderr; columns padded with spaces."""
    rows = [("Groups" if column == "groups" else "Tasks", "Filter", "Metric", "Value", "Stderr")]
    tasks = result_dict.get(column, {})
    for task in sorted(tasks) if sort_results else tasks:
        metrics = tasks[task]
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # a metric's key is "name,filter"; others (alias, sample_len) describe the task
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append((task, filter_name, metric, f"{value:.4f}",
                         f"{stderr:.4f}" if isinstance(stderr, (int, float)) else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


if __name__ == "__main__":
    main()
