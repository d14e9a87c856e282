"""Statistics of growth studies: curves interpolated in log-FLOPs, the first crossing of the
control's final loss, t-intervals over seeds, and :func:`analyse`'s one row per arm."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# ----------------------------------------------------------------------------- curves and statistics


def log_interp(x: Sequence[float], y: Sequence[float], at: float) -> float | None:
    """``y`` at ``x = at``, linear in log x between the bracketing points (linear in x from a
    zero start); None outside them."""
    pts = list(zip(x, y))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= at <= x1:
            if x1 == x0:
                return y1
            t = (at - x0) / (x1 - x0) if x0 <= 0 else (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def first_crossing(flops: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                   target: float) -> tuple[float, float] | None:
    """``(FLOPs, tokens)`` where the curve first reaches ``target``: interpolated in log-FLOPs
    (linear from a zero-FLOP start); None if it never does."""
    if losses[0] <= target:
        return float(flops[0]), float(tokens[0])
    for i in range(len(losses) - 1):
        l0, l1 = losses[i], losses[i + 1]
        if not (l0 > target >= l1):
            continue
        f0, f1, t0, t1 = flops[i], flops[i + 1], tokens[i], tokens[i + 1]
        frac = (l0 - target) / (l0 - l1)
        if f1 == f0:
            return float(f1), float(t1)
        f = (f0 + frac * (f1 - f0)) if f0 <= 0 else math.exp(math.log(f0) + frac * (math.log(f1) - math.log(f0)))
        return float(f), float(t0 + (f - f0) / (f1 - f0) * (t1 - t0))
    return None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and Student-t interval over seeds (no interval from one value)."""
    x = np.asarray([v for v in values if v is not None], float)
    if x.size == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    mean = float(x.mean())
    if x.size < 2:
        return {"n": 1, "mean": mean, "lo": None, "hi": None}
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"n": int(x.size), "mean": mean, "lo": mean - half, "hi": mean + half}


# ----------------------------------------------------------------------------- running


# ----------------------------------------------------------------------------- analysis


def analyse(records: Sequence[dict[str, Any]], confidence: float = 0.95,
            reference: str | None = None) -> list[dict[str, Any]]:
    """One row per (arm, growth point): the control's numbers and each arm's, seed by seed
    against that seed's control (and ``reference`` arm), summarised as t-intervals."""
    controls = {r["seed"]: r for r in records if r["arm"] == "control"}
    if not controls:
        raise ValueError("no control runs to compare with")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["arm"] != "control":
            groups.setdefault((r["arm"], r["grow_step"]), []).append(r)
    refs = {(r["seed"], r["grow_step"]): r for r in records if r["arm"] == reference}
    ctrl = list(controls.values())
    rows = [{"arm": "control", "family": "from scratch", "what": f"{ctrl[0]['layers']} layers from scratch",
             "grow_step": None, "layers": ctrl[0]["layers"], "params": ctrl[0]["params"], "seeds": len(ctrl),
             "final_loss": t_interval([r["final_loss"] for r in ctrl], confidence),
             "total_flops": float(np.mean([r["total_flops"] for r in ctrl])),
             "total_tokens": float(np.mean([r["total_tokens"] for r in ctrl])), "reached": len(ctrl)}]
    for (arm, grow_step), runs in groups.items():
        runs = [r for r in runs if r["seed"] in controls]
        savings, speedups, flops_at, tokens_at, d_tokens, d_flops, d_ref = [], [], [], [], [], [], []
        for r in runs:
            c = controls[r["seed"]]
            f, t, losses = ([p[k] for p in r["curve"]] for k in ("flops", "tokens", "loss"))
            hit = first_crossing(f, t, losses, c["final_loss"])
            if hit is not None:
                flops_at.append(hit[0])
                tokens_at.append(hit[1])
                savings.append(1 - hit[0] / c["total_flops"])
                speedups.append(c["total_flops"] / hit[0])
            cf, cl, ct = ([p[k] for p in c["curve"]] for k in ("flops", "loss", "tokens"))
            d_tokens.append(r["final_loss"] - (log_interp(ct, cl, r["total_tokens"]) or c["final_loss"])
                            if r["total_tokens"] <= c["total_tokens"] else None)
            at_flops = log_interp(cf, cl, r["total_flops"])
            d_flops.append(None if at_flops is None else r["final_loss"] - at_flops)
            ref = refs.get((r["seed"], grow_step))
            d_ref.append(None if ref is None or arm == reference else r["final_loss"] - ref["final_loss"])
        first = runs[0]
        rows.append({
            "arm": arm, "family": first["family"], "what": first["what"], "grow_step": grow_step,
            "stages": first["stages"], "small_layers": first["small_layers"], "layers": first["layers"],
            "params": first["params"], "seeds": len(runs), "reached": len(flops_at),
            "final_loss": t_interval([r["final_loss"] for r in runs], confidence),
            "loss_after_growth": t_interval([r["loss_after_growth"][-1] for r in runs], confidence),
            "loss_before_growth": t_interval([_loss_before_last_growth(r["curve"]) for r in runs], confidence),
            "total_flops": float(np.mean([r["total_flops"] for r in runs])),
            "total_tokens": float(np.mean([r["total_tokens"] for r in runs])),
            "flops_to_target": t_interval(flops_at, confidence), "tokens_to_target": t_interval(tokens_at, confidence),
            "flop_saving": t_interval(savings, confidence), "speedup": t_interval(speedups, confidence),
            "delta_equal_tokens": t_interval(d_tokens, confidence), "delta_equal_flops": t_interval(d_flops, confidence),
            "delta_vs_reference": t_interval(d_ref, confidence) if reference else None,
        })
    return rows


def _loss_before_last_growth(curve: Sequence[dict[str, Any]]) -> float | None:
    """The loss just before the last growth: the first of the last two points at the same step."""
    for a, b in zip(reversed(curve[:-1]), reversed(curve[1:])):
        if a["step"] == b["step"]:
            return a["loss"]
    return None


