"""``solarjax ablate``: where should the seam be? DUS arms with the same training budget, compared.

The SOLAR paper fixed m = 8 without testing other values (its Limitations say so). Each arm
applies a layer plan to the base model, is scored on held-out text, trains for the same number
of steps on the same batches, and is scored again. Finished arms are not rerun (each writes
``arms/NAME/result.json``), so an interrupted sweep resumes; ``--arm`` runs a single arm, so a
TPU pod can run arms as separate jobs that share one output directory, and ``--report-only``
collects whatever has finished.

Arms may also be Mixtures of Experts upcycled from the base model (``--plans
'upcycle:experts=8,k=2'``, alone or after a DUS plan with ``+``): with ``--equal-flops`` every arm
trains for the base model's training FLOPs (active parameters counted) and ``--latency`` adds each
arm's decode ms/token and peak memory, so DUS and MoE compare at equal compute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from solarjax.commands._flags import add_run_args, add_verb, budget_from_args, comma_list, paths, report


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_verb(
        subparsers, "ablate", __doc__,
        help="seam-position (m) and depth-growth ablations under one training budget",
        epilog="example: solarjax ablate --m 0,2,4,6,8,10 --plans 'repeat:k=2;llama_pro:new=6' --steps 200",
    )
    add_run_args(parser, default_out="runs/ablate")
    parser.add_argument("--m", type=comma_list(int, "integers"), default=(), help="SOLAR seam sizes, e.g. 0,2,4,6,8,10")
    parser.add_argument("--plans", default="", help="other layer plans, ';'-separated, e.g. "
                        "'repeat:k=2;llama_pro:new=6;0:20,10:30'")
    parser.add_argument("--no-base", action="store_true", help="skip the un-scaled control arm")
    parser.add_argument("--arm", default=None, help="run only the arm with this name (for one job per arm)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; tabulate finished arms")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="save a resumable checkpoint every N steps inside each arm (default: only results)")
    parser.add_argument("--equal-flops", action="store_true",
                        help="equal training FLOPs instead of equal steps: --steps is the base model's, each arm "
                        "trains round(base FLOPs / its FLOPs per step) steps (active parameters counted; DUS vs MoE)")
    parser.add_argument("--latency", action="store_true",
                        help="also measure each trained arm's decode ms/token and peak memory (batch 1, short prompt)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax import research
    from solarjax.growth import grown_config

    paths(args)
    plans = [p.strip() for p in args.plans.split(";") if p.strip()]
    arms = research.arms_from_args(args.m, plans, include_base=not args.no_base)
    if not arms:
        raise ValueError("no arms: pass --m and/or --plans (or drop --no-base)")
    if args.arm is not None:
        arms = [a for a in arms if a.name == args.arm]
        if not arms:
            raise ValueError(f"no arm named {args.arm!r}; arms: {[a.name for a in research.arms_from_args(args.m, plans)]}")
    from solarjax.outputs import claim_run_dir, source_paths

    out = Path(args.out)
    budget = budget_from_args(args)
    claim_run_dir(out, verb="ablate", sources=source_paths(args.model, args.tokenizer))
    if args.report_only:
        records = [json.loads(p.read_text()) for p in sorted(out.glob("arms/*/result.json"))]
        if not records:
            raise ValueError(f"no finished arms under {out}/arms")
    else:
        base = research.load_base(args.model, args.tokenizer, progress=budget.progress)
        for arm in arms:  # fail on a bad spec before spending time on any arm
            if arm.spec:
                grown_config(base.cfg, arm.spec)
        budgets = research.flop_matched_budgets(arms, base.cfg, budget) if args.equal_flops else None
        each = (f"equal FLOPs ({budget.steps} base-model steps; steps: "
                f"{', '.join(f'{n} {b.steps}' for n, b in budgets.items())})" if budgets else f"{budget.steps} steps")
        print(f"ablation over {len(arms)} arm(s): {', '.join(a.name for a in arms)}; {each} x "
              f"{budget.batch_size} x {budget.seq_len} tokens each -> {out}")
        records = research.run_arms(arms, base, budget, out, prompt=research.PROMPT,
                                    checkpoint_every=args.checkpoint_every, budgets=budgets, latency=args.latency)
        finished = {r["arm"] for r in records}
        records += [json.loads(p.read_text()) for p in sorted(out.glob("arms/*/result.json"))
                    if p.parent.name not in finished]
    research.write_tables(records, out)
    research.plot_curves(records, out / "eval_loss.png", "held-out loss per arm")
    research.plot_final_vs_m(records, out / "final_loss_vs_m.png")
    if len({r.get("flops_per_token") for r in records}) > 1:  # arms differ in cost: loss against compute too
        research.plot_curves(records, out / "eval_loss_vs_flops.png", "held-out loss vs training FLOPs", x="flops")
    tables = [str(out / "results.csv"), str(out / "results.md")]
    arms = [{k: r.get(k) for k in research.COLUMNS} for r in records]
    report(args, {"out": str(out), "tables": tables, "arms": arms},
           f"{research.results_table(records)}\ntables: {', '.join(tables)}; plots in {out}")
    return 0
