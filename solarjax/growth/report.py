"""Reports of growth studies: the speed-up table, the summary lines, the plots and ``report.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from solarjax.growth.stats import analyse
from solarjax.growth.study import StudyConfig, reference_arm

def _ci(s: dict[str, Any] | None, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if not s or s["mean"] is None:
        return "—"
    text = fmt.format(s["mean"] * scale)
    if s["lo"] is not None:
        text += f" [{fmt.format(s['lo'] * scale)}, {fmt.format(s['hi'] * scale)}]"
    return text


def _sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def speedup_table(rows: Sequence[dict[str, Any]], confidence: float = 0.95, reference: str | None = None) -> str:
    """Markdown: per arm the loss, FLOPs/tokens to reach the control's final loss, and differences."""
    pct = f"{confidence:.0%}"
    header = ["arm", "grown at step", "small → layers", "total FLOPs", "final loss", "reached",
              "FLOPs to control's loss", "FLOP saving %", "tokens to control's loss",
              "Δ loss, equal tokens", "Δ loss, equal FLOPs"]
    if reference:
        header.append(f"Δ loss vs {reference}")
    lines = [f"Mean over seeds [{pct} t-interval]; Δ = arm − control (negative: the arm is better).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["arm"] == "control":
            cells = ["**control**", "—", f"{r['layers']}", _sci(r["total_flops"]), _ci(r["final_loss"]),
                     f"{r['reached']}/{r['seeds']}", _sci(r["total_flops"]), "0", f"{r['total_tokens']:.3g}", "0", "0"]
            if reference:
                cells.append("—")
        else:
            f = r["flops_to_target"]
            cells = [r["arm"], str(r["grow_step"]), f"{r['small_layers']} → {r['layers']}", _sci(r["total_flops"]),
                     _ci(r["final_loss"]), f"{r['reached']}/{r['seeds']}",
                     "not reached" if f["mean"] is None else _sci(f["mean"]) + (
                         f" [{_sci(f['lo'])}, {_sci(f['hi'])}]" if f["lo"] is not None else ""),
                     _ci(r["flop_saving"], "{:.1f}", 100), _ci(r["tokens_to_target"], "{:.3g}"),
                     _ci(r["delta_equal_tokens"], "{:+.3f}"), _ci(r["delta_equal_flops"], "{:+.3f}")]
            if reference:
                cells.append(_ci(r["delta_vs_reference"], "{:+.3f}") if r["arm"] != reference else "0")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _excludes_zero(s: dict[str, Any] | None) -> int:
    """+1 / -1 when the interval lies above / below zero, 0 when it straddles it (or is missing)."""
    if not s or s["lo"] is None:
        return 0
    return 1 if s["lo"] > 0 else -1 if s["hi"] < 0 else 0


def summary_lines(rows: Sequence[dict[str, Any]], config: StudyConfig, reference: str | None = None) -> list[str]:
    """What the data supports, arm by arm, and what it does not."""
    pct = f"{config.confidence:.0%}"
    ctrl = rows[0]
    n = ctrl["seeds"]
    lines = [f"- Control: {ctrl['layers']} layers from scratch, final held-out loss {_ci(ctrl['final_loss'])} "
             f"({_sci(ctrl['total_flops'])} FLOPs, {ctrl['total_tokens']:.3g} tokens), {n} seed(s)."]
    if n < 2:
        lines.append("- One seed: no interval can be computed, so no difference below can be called real.")
    for r in rows[1:]:
        head = f"- **{r['arm']}** (grown at step {r['grow_step']}): "
        saving = r["flop_saving"]
        if r["reached"] == 0:
            text = f"never reached the control's final loss within its {r['total_tokens']:.3g} tokens in any seed"
        elif r["reached"] < r["seeds"]:
            text = (f"reached the control's final loss in only {r['reached']}/{r['seeds']} seeds, "
                    "so no FLOP saving is claimed")
        else:
            sign = _excludes_zero(saving)
            text = (f"reached the control's final loss with {saving['mean']:.1%} "
                    f"{'fewer' if saving['mean'] >= 0 else 'more'} FLOPs ({pct} CI "
                    + (f"{saving['lo']:.1%} to {saving['hi']:.1%})" if saving["lo"] is not None else "n/a)")
                    + ("" if saving["lo"] is None else "; the saving is supported by the data" if sign > 0 else
                       "; it needs more compute than the control" if sign < 0 else
                       "; the interval includes 0: difference within noise"))
        eq = r["delta_equal_flops"]
        sign = _excludes_zero(eq)
        if eq["mean"] is not None:
            text += (f". At equal FLOPs its loss is {eq['mean']:+.3f} vs the control's curve"
                     + ("" if eq["lo"] is None else ": better, beyond noise" if sign < 0 else
                        ": worse, beyond noise" if sign > 0 else ": within noise"))
        if reference and r["arm"] != reference and r["delta_vs_reference"]:
            d = r["delta_vs_reference"]
            sign = _excludes_zero(d)
            text += (f". Against {reference} (same depth, parameters and FLOPs) its final loss differs by "
                     f"{d['mean']:+.3f}" + ("" if d["lo"] is None else ": better, beyond noise" if sign < 0 else
                                            ": worse, beyond noise" if sign > 0 else ": within noise"))
        lines.append(head + text + ".")
    lines += _paired_lines(rows[1:], reference) if reference else _ranking_lines(rows[1:])
    lines += [
        "",
        "What this does not show: these are tiny models on one corpus with short budgets; orderings can change "
        f"with scale, data and schedule. Each run has its own {config.schedule} schedule, so a grown arm's loss "
        "part-way through its schedule is compared with the control's annealed final loss (this favours the control "
        "in 'FLOPs to the control's loss', and favours the arm in 'Δ at equal FLOPs', which reads the control's "
        "curve mid-schedule). Evaluation FLOPs are not counted (the same for every arm).",
    ]
    return lines


def _paired_lines(arms: Sequence[dict[str, Any]], reference: str) -> list[str]:
    """The seed-paired comparison with the reference arm (same depth, parameters, FLOPs and batches):
    sharper than comparing FLOP-saving intervals, which carry every seed's control noise too."""
    groups: dict[str, list[str]] = {"better": [], "worse": [], "within noise": []}
    for r in arms:
        d = r.get("delta_vs_reference")
        if r["arm"] == reference or not d or d["lo"] is None:
            continue
        sign = _excludes_zero(d)
        groups["better" if sign < 0 else "worse" if sign > 0 else "within noise"].append(f"{r['arm']} ({d['mean']:+.3f})")
    return [f"- Paired with {reference} seed by seed (final loss): "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items() if v) + "."]


def _ranking_lines(arms: Sequence[dict[str, Any]]) -> list[str]:
    """Which arms the data ranks apart: the best FLOP saving against every other arm's interval."""
    scored = [r for r in arms if r["reached"] == r["seeds"] and r["flop_saving"]["lo"] is not None]
    if len(scored) < 2:
        return []
    best = max(scored, key=lambda r: r["flop_saving"]["mean"])
    tied = [r["arm"] for r in scored if r is not best and r["flop_saving"]["hi"] >= best["flop_saving"]["lo"]]
    apart = [r["arm"] for r in scored if r is not best and r["arm"] not in tied]
    text = f"- Between arms: the largest mean saving is {best['arm']}'s ({best['flop_saving']['mean']:.1%})"
    if tied:
        text += f"; its interval overlaps those of {', '.join(tied)}, so that ranking is not resolved by these seeds"
    if apart:
        text += f"; it is ahead of {', '.join(apart)} beyond overlap of the intervals"
    return [text + "."]


# ----------------------------------------------------------------------------- plots and the report


def mean_curves(records: Sequence[dict[str, Any]]) -> dict[tuple, dict[str, np.ndarray]]:
    """Per (arm, growth point): FLOPs and the losses of every seed on the shared evaluation grid."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["arm"], r["grow_step"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        n = min(len(r["curve"]) for r in runs)
        out[key] = {"flops": np.mean([[p["flops"] for p in r["curve"][:n]] for r in runs], axis=0),
                    "loss": np.asarray([[p["loss"] for p in r["curve"][:n]] for r in runs])}
    return out


def plot_loss_vs_flops(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Held-out loss against training FLOPs (log), one line per arm (mean over seeds, band = min..max),
    the control in black, its final loss dotted; one panel per growth point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(records)
    grow_steps = sorted({k[1] for k in curves if k[1] is not None})
    fig, axes = plt.subplots(1, max(1, len(grow_steps)), figsize=(7.5 * max(1, len(grow_steps)), 4.8), dpi=110,
                             squeeze=False)
    control = curves.get(("control", None))
    for ax, g in zip(axes[0], grow_steps or [None]):
        keys = [k for k in curves if k[1] == g and k[0] != "control"]
        colors = plt.cm.tab10(np.linspace(0, 1, 10))
        for i, key in enumerate(sorted(keys)):
            c = curves[key]
            keep = c["flops"] > 0
            ax.plot(c["flops"][keep], c["loss"].mean(0)[keep], color=colors[i % 10], label=key[0], lw=1.4)
            ax.fill_between(c["flops"][keep], c["loss"].min(0)[keep], c["loss"].max(0)[keep],
                            color=colors[i % 10], alpha=0.12 if len(keys) <= 6 else 0.05)
        if control is not None:
            keep = control["flops"] > 0
            ax.plot(control["flops"][keep], control["loss"].mean(0)[keep], color="black", lw=2.2,
                    label="control (from scratch)")
            ax.axhline(control["loss"].mean(0)[-1], color="black", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (small model's pretraining included)")
        ax.set_ylabel("held-out loss (nats/token)")
        finals = [curves[k]["loss"].mean(0)[-1] for k in keys] + ([control["loss"].mean(0)[-1]] if control else [])
        if finals:
            ax.set_ylim(min(finals) - 0.15, max(finals) + 1.2)
        ax.set_title(f"{title}" + (f" (grown at step {g})" if g is not None else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_paired(rows: Sequence[dict[str, Any]], path: Path, reference: str) -> Path | None:
    """Each arm's final loss minus the reference arm's, seed-paired, with its interval."""
    arms = [r for r in rows if r.get("delta_vs_reference") and r["delta_vs_reference"]["mean"] is not None]
    if not arms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(arms) + 1.4), dpi=110)
    for i, r in enumerate(arms):
        d = r["delta_vs_reference"]
        err = None if d["lo"] is None else [[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]]
        color = "gray" if _excludes_zero(d) == 0 else ("tab:green" if d["mean"] < 0 else "tab:red")
        ax.errorbar([d["mean"]], [i], xerr=err, fmt="o", color=color, capsize=4)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(arms)), [f"{r['arm']}" for r in arms])
    ax.invert_yaxis()
    ax.set_xlabel(f"final held-out loss minus {reference}'s (same seed; negative = better)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(records: Sequence[dict[str, Any]], config: StudyConfig, out_dir: Path, mode: str,
                 command: str, seconds: float | None) -> str:
    """``study.md`` (table, summary, plot), ``rows.json`` and ``loss_vs_flops.png`` in ``out_dir``."""
    reference = reference_arm(mode, config.target_layers)
    rows = analyse(records, config.confidence, reference)
    plot = plot_loss_vs_flops(records, out_dir / "loss_vs_flops.png",
                              "growth operators vs from scratch" if mode == "growth" else "seam ablation")
    small = sorted({r["small_layers"] for r in rows[1:]})
    lines = [
        f"# solarjax study {mode}",
        "",
        f"`{command}`" + (f" ({seconds / 60:.1f} min)" if seconds else ""),
        "",
        f"Target model: {config.target_layers} layers, d_model {config.d_model}, {config.n_heads} heads, ffn "
        f"{config.ffn_dim}, vocab {config.vocab_size} ({rows[0]['params'] / 1e6:.2f}M params); small models of "
        f"{', '.join(map(str, small))} layers. Every run: batch {config.batch_size} x {config.seq_len} tokens, lr "
        f"{config.lr}, {config.schedule} schedule with its own warmup; control {config.steps} steps; grown arms "
        f"{config.arm_steps()} steps in all (the small model's included), on the same batches in the same order "
        f"(checked by checksum); data `{config.source}`; {config.seeds} seed(s) (init and data order). FLOPs = "
        "6N + attention per token (`ModelConfig.flops_per_token`) x tokens, the small model's pretraining included.",
        "",
        speedup_table(rows, config.confidence, reference),
        "",
        "## What the data supports",
        "",
        *summary_lines(rows, config, reference),
        "",
        f"![held-out loss vs FLOPs]({plot.name})",
        "",
    ]
    paired = plot_paired(rows, out_dir / "paired_vs_reference.png", reference) if reference else None
    if paired is not None:
        lines += [f"![final loss vs {reference}, seed-paired]({paired.name})", ""]
    report = "\n".join(lines)
    for name, text in (("study.md", report), ("rows.json", json.dumps(rows, indent=1))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    return report


def read_records(out_dir: Path) -> tuple[StudyConfig | None, list[dict[str, Any]]]:
    """The study's saved config and every finished run under ``out_dir/runs`` (for ``--report-only``)."""
    saved = out_dir / "config.json"
    config = None
    if saved.is_file():
        values = json.loads(saved.read_text())
        config = StudyConfig(**{**values, "grow_at": tuple(values["grow_at"])})
    paths = sorted(out_dir.glob("runs/seed*/*/result.json"), key=lambda p: p.stat().st_mtime)  # run order
    return config, [json.loads(p.read_text()) for p in paths]
