"""solarjax's TPU train step beside MaxText's ``train_compile``: the same model, slice, batch,
sequence length and nearest remat policy, each compiled ahead of time by its own stack on this CPU.

One JSON line per side (and per solarjax variant) and pair, appended to
``bench/results/aot_vs_maxtext.jsonl`` as each compile finishes (a cut-off loses nothing), then
one ``"side": "pair"`` line per pair: MaxText's figures beside the best solarjax variant that is
at the same or a lower executed-FLOP ratio. Per chip: arguments, temporaries, total (XLA's
``memory_analysis``; host-offloaded bytes separately), executed FLOPs and compile time.

Executed FLOPs are counted the same way on both sides: from the *traced* step with
``solarjax.aot.jaxpr_flops`` (every ``dot_general``, scan bodies times their length, remat
recomputation included, Pallas kernels once per grid point), divided by the chips. MaxText's
printed ``cost_analysis`` counts a scanned layer once; its step is traced in its own process (a hook
on ``maxtext_utils.maybe_dump_jaxpr``, which ``train_compile`` calls with the jitted step and its
abstract inputs) and counted by the same function. The ratio divides by solarjax's model FLOPs
(6N + 12 L d T per token, :meth:`ModelConfig.flops_per_token`) of the same shape on both sides.

Setting up MaxText's side (once, needs only the package registry; nothing is downloaded at run time):

    ~/.pyenv/versions/3.12.*/bin/python -m venv /work/maxtext-venv   # MaxText 0.2.5 needs Python >= 3.12
    /work/maxtext-venv/bin/pip install "maxtext[tpu]==0.2.5"
    /work/maxtext-venv/bin/pip install "jax[tpu]==0.12.0.1"   # libtpu 0.0.50.x: the extra pulls 0.0.52,
                                                              # which jax 0.12.0.1 refuses

solarjax's side is ``solarjax aot`` in this environment (libtpu in its private cache:
``solarjax aot --install-libtpu`` once). Then:

    python bench/aot_vs_maxtext.py --list
    nice -n 10 python bench/aot_vs_maxtext.py --pairs 'v5p-128:*' [--sides maxtext,solarjax] [--variants save_qkv_lse]

Each side compiles with its own flags: solarjax with :data:`solarjax.xla_flags.TPU_FLAGS` (libtpu
0.0.42), MaxText with its defaults (libtpu 0.0.50 refuses solarjax's async collective fusion on v5p:
"Continuation fusion for AllGather ... not supported ... other than TPU v5e").
Each compile takes 2-12 minutes on 2 busy cores: not part of CI (tests/test_aot.py only checks the
pair table and the command lines, compiling nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "aot_vs_maxtext.jsonl"
MAXTEXT_PYTHON = os.environ.get("MAXTEXT_PYTHON", "/work/maxtext-venv/bin/python")
MARKER = "AOT_VS_MAXTEXT "  # the MaxText child's result line
TOKENS_PER_CHIP = 8192  # 2 x 4096 or 1 x 8192 per chip: 524,288 tokens per step on v5p-128


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model both stacks know: MaxText's model args, solarjax's preset."""

    maxtext: tuple[str, ...]
    solarjax: str


SHAPES = {
    "llama2-7b": Shape(("model_name=llama2-7b",), "llama2_7b"),
    # SOLAR-10.7B is Mistral-7B's shape at 48 layers (no sliding window at 4096 tokens on either side)
    "solar": Shape(("model_name=mistral-7b", "override_model_config=True", "base_num_decoder_layers=48"),
                   "solar_10_7b"),
}

# remat name -> (MaxText's args, solarjax variants: name -> --config overrides). The first variant
# is solarjax's nearest policy; the others are the levers measured against it.
_SAVE_QKV = ("remat_policy=custom", "query_proj=device", "key_proj=device", "value_proj=device", "context=device")
REMATS = {
    "full": (("remat_policy=full",), {
        "full": ("--config.model.remat='full'",),
        "offload_input": ("--config.model.remat='offload_input'",),
        "full_chunk1024": ("--config.model.remat='full'", "--config.train.loss_chunk_tokens=1024"),
    }),
    "custom_qkv_context": (_SAVE_QKV, {
        "save_qkv_attn": ("--config.model.remat='save_qkv_attn'",),
        "save_qkv_lse": ("--config.model.remat='save_qkv_lse'",),
        "offload_qkv_lse": ("--config.model.remat='offload_qkv_lse'",),
        "save_qkv_lse_kept_loss": ("--config.model.remat='save_qkv_lse'", "--config.train.loss_recompute_logits=False"),
        "offload_qkv_lse_kept_loss": ("--config.model.remat='offload_qkv_lse'",
                                      "--config.train.loss_recompute_logits=False"),
        # not a match for MaxText's policy: the preset's candidate when HBM has room (less recompute)
        "dots_kept_loss": ("--config.model.remat='dots_with_no_batch_dims'", "--config.train.loss_recompute_logits=False"),
    }),
}
TOPOLOGIES = {"v5p-128": 64, "v6e-256": 256, "v5e-256": 256}  # MaxText's names -> chips
ISSUE_PAIRS = (("llama2-7b", 4096, "full"), ("llama2-7b", 8192, "full"), ("solar", 4096, "custom_qkv_context"),
               ("solar", 4096, "full"))


@dataclasses.dataclass(frozen=True)
class Pair:
    topology: str
    shape: str
    seq: int
    remat: str

    @property
    def name(self) -> str:
        return f"{self.topology}:{self.shape}_s{self.seq}_{self.remat}"

    @property
    def chips(self) -> int:
        return TOPOLOGIES[self.topology]

    @property
    def per_chip_batch(self) -> int:
        return TOKENS_PER_CHIP // self.seq

    def maxtext_args(self, output_dir: str) -> list[str]:
        base = Path(MAXTEXT_CONFIG_DIR or ".") / "base.yml"
        return [str(base), f"compile_topology={self.topology}", "compile_topology_num_slices=1", "attention=flash",
                *SHAPES[self.shape].maxtext, f"per_device_batch_size={self.per_chip_batch}",
                f"max_target_length={self.seq}", *REMATS[self.remat][0], "enable_checkpointing=false",
                f"base_output_directory={output_dir}", f"run_name={self.name.replace(':', '_')}"]

    def solarjax_args(self, variant: str) -> list[str]:
        return ["--config", SHAPES[self.shape].solarjax, "--topology", self.topology, "--json",
                "--config.mesh.data=1", f"--config.mesh.fsdp={self.chips}", "--config.mesh.tensor=1",
                f"--config.train.batch_size={self.chips * self.per_chip_batch}", f"--config.train.seq_len={self.seq}",
                f"--config.model.max_seq_len={self.seq}", "--config.train.grad_accum=1",
                *REMATS[self.remat][1][variant]]

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(REMATS[self.remat][1])


MAXTEXT_CONFIG_DIR = None  # set by main() from the MaxText install (its configs/ directory)

PAIRS = {p.name: p for p in (Pair(t, s, seq, r) for t in TOPOLOGIES for s, seq, r in ISSUE_PAIRS)}


def select(patterns: str) -> list[Pair]:
    """Comma-separated names or shell patterns (``v5p-128:*``) -> pairs, in table order."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [pair for name, pair in PAIRS.items() if any(fnmatch.fnmatchcase(name, w) for w in wanted)]
    if not chosen:
        raise SystemExit(f"aot_vs_maxtext: no pair matches {patterns!r}; --list shows them")
    return chosen


# ----------------------------------------------------------------------------- the two sides


def model_flops_per_chip(pair: Pair) -> float:
    """solarjax's model FLOPs (6N + attention per token) of the pair's shape, per chip per step."""
    from solarjax.aot import model_shape_config
    from solarjax.config import load_config

    cfg = model_shape_config(load_config(SHAPES[pair.shape].solarjax)).replace(max_seq_len=pair.seq)
    return cfg.flops_per_token(pair.seq) * TOKENS_PER_CHIP


def _gb(value) -> float | None:
    return None if value is None else round(value / 1e9, 3)


def run_maxtext(pair: Pair, timeout: float) -> dict:
    out_dir = f"/tmp/aot_vs_maxtext/{pair.name.replace(':', '_')}"
    cmd = [MAXTEXT_PYTHON, str(Path(__file__).resolve()), "--maxtext-child", *pair.maxtext_args(out_dir)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE=pair.topology, TPU_WORKER_HOSTNAMES="localhost",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    for name in ("TPU_LIBRARY_PATH", "LIBTPU_INIT_ARGS"):  # MaxText's own libtpu and flags
        env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout)
    lines = [line[len(MARKER):] for line in done.stdout.splitlines() if line.startswith(MARKER)]
    record = {"side": "maxtext", "variant": REMATS[pair.remat][0][0].split("=")[1], "command": cmd[2:],
              "wall_seconds": round(time.perf_counter() - start, 1)}
    if not lines:
        return {**record, "error": (done.stderr or done.stdout)[-1500:]}
    child = json.loads(lines[-1])
    return {**record, **child}


def run_solarjax(pair: Pair, variant: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "solarjax.cli", "aot", *pair.solarjax_args(variant)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, timeout=timeout)
    record = {"side": "solarjax", "variant": variant, "command": ["solarjax", *cmd[3:]],
              "wall_seconds": round(time.perf_counter() - start, 1)}
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {**record, "error": done.stderr[-1500:]}
    return {**record, "fits": report["fits"], "argument_gb": _gb(report["argument_bytes"]),
            "temp_gb": _gb(report["temp_bytes"]), "total_gb": _gb(report["total_bytes"]),
            "host_temp_gb": _gb(report.get("host_temp_bytes")),
            "executed_flops_per_chip": report["program_flops_per_chip"],
            "xla_flops_per_chip": report["xla_flops_per_chip"], "compile_seconds": round(report["compile_seconds"], 1),
            "libtpu": report.get("libtpu"), "error": report["error"]}


def finish(pair: Pair, record: dict) -> dict:
    model = model_flops_per_chip(pair)
    executed = record.get("executed_flops_per_chip")
    return {"pair": pair.name, **record, "model_flops_per_chip": model,
            "flop_ratio": round(executed / model, 4) if executed else None,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def summary(pair: Pair, records: list[dict]) -> dict | None:
    """MaxText beside the solarjax variant with the fewest temporaries at the same or a lower FLOP ratio."""
    mt = next((r for r in records if r["side"] == "maxtext" and r.get("temp_gb") is not None), None)
    ours = [r for r in records if r["side"] == "solarjax" and r.get("temp_gb") is not None and r.get("fits")]
    if mt is None or not ours:
        return None
    level = [r for r in ours if r["executed_flops_per_chip"] <= mt["executed_flops_per_chip"]]  # same model FLOPs
    best = min(level or ours, key=lambda r: r["temp_gb"])
    return {"pair": pair.name, "side": "pair", "maxtext_temp_gb": mt["temp_gb"], "maxtext_total_gb": mt["total_gb"],
            "maxtext_flop_ratio": mt["flop_ratio"], "solarjax_variant": best["variant"],
            "solarjax_temp_gb": best["temp_gb"], "solarjax_total_gb": best["total_gb"],
            "solarjax_flop_ratio": best["flop_ratio"], "temp_gb_saved": round(mt["temp_gb"] - best["temp_gb"], 3),
            "ahead": bool(level) and best["temp_gb"] < mt["temp_gb"]}


def recorded(path: Path, pair: Pair) -> list[dict]:
    """The latest compiled record of each side and variant of ``pair`` in a results file."""
    latest: dict = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("pair") == pair.name and record["side"] != "pair" and record.get("temp_gb") is not None:
            latest[(record["side"], record["variant"])] = record
    return list(latest.values())


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:  # one whole line per append
            f.write(line + "\n")


# ----------------------------------------------------------------------------- MaxText child


def maxtext_child(argv: list[str]) -> None:
    """Runs in MaxText's venv: ``train_compile.main`` with the traced step counted and timed."""
    import jax
    from jax import stages

    sys.path.insert(0, str(REPO))
    from maxtext.trainers.pre_train import train_compile
    from maxtext.utils import maxtext_utils

    from solarjax.aot import jaxpr_flops

    found: dict = {}
    original_compile = stages.Lowered.compile

    def count(config, jitted, args):  # train_compile's hook, inside its mesh and axis rules
        found["executed_flops"] = jaxpr_flops(jitted.trace(*args).jaxpr.jaxpr)

    def timed_compile(self, *a, **k):
        start = time.perf_counter()
        compiled = original_compile(self, *a, **k)
        found["compile_seconds"], found["compiled"] = time.perf_counter() - start, compiled
        return compiled

    maxtext_utils.maybe_dump_jaxpr = count
    stages.Lowered.compile = timed_compile
    train_compile.main(["train_compile", *argv])
    compiled, chips = found["compiled"], len(jax.tree.leaves(found["compiled"].input_shardings)[0].device_set)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes)
    from importlib import metadata

    print(MARKER + json.dumps({
        "fits": True, "chips": chips, "argument_gb": _gb(mem.argument_size_in_bytes), "temp_gb": _gb(mem.temp_size_in_bytes),
        "total_gb": _gb(total), "host_temp_gb": _gb(getattr(mem, "host_temp_size_in_bytes", None)),
        "executed_flops_per_chip": found["executed_flops"] / chips,
        "xla_flops_per_chip": float(cost["flops"]) if cost and "flops" in cost else None,
        "compile_seconds": round(found["compile_seconds"], 1),
        "libtpu": metadata.version("libtpu"), "jax": jax.__version__, "maxtext": metadata.version("maxtext")}),
        flush=True)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="v5p-128:*", help="comma-separated pair names or patterns (--list)")
    parser.add_argument("--sides", default="maxtext,solarjax", help="maxtext, solarjax or both")
    parser.add_argument("--variants", default="", help="solarjax variants to compile (default: all of a pair's)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON-lines file to append to ('' : print only)")
    parser.add_argument("--timeout", type=float, default=2400, help="seconds per compile")
    parser.add_argument("--list", action="store_true", help="print the pairs and their command lines, compile nothing")
    parser.add_argument("--summarize", action="store_true",
                        help="compile nothing: one 'pair' line per selected pair from the results file (latest per side)")
    args = parser.parse_args(argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not set(args.sides) <= {"maxtext", "solarjax"} or not args.sides:
        parser.error(f"--sides takes maxtext and/or solarjax, got {','.join(args.sides)!r}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--maxtext-child"]:
        maxtext_child(argv[1:])
        return 0
    args = parse_args(argv)
    pairs = select(args.pairs)
    sys.path.insert(0, str(REPO))
    if args.list:
        for pair in pairs:
            print(json.dumps({"pair": pair.name, "maxtext": pair.maxtext_args("DIR"),
                              "solarjax": {v: pair.solarjax_args(v) for v in pair.variants}}))
        return 0
    if args.summarize:
        for pair in pairs:
            line = summary(pair, recorded(Path(args.out or RESULTS), pair))
            if line is not None:
                print(json.dumps(line))
        return 0
    global MAXTEXT_CONFIG_DIR
    if "maxtext" in args.sides:
        found = subprocess.run([MAXTEXT_PYTHON, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                               text=True, capture_output=True)
        if found.returncode:
            raise SystemExit(f"aot_vs_maxtext: no MaxText at {MAXTEXT_PYTHON} (set MAXTEXT_PYTHON; setup: this "
                             "script's docstring)")
        MAXTEXT_CONFIG_DIR = str(Path(found.stdout.strip()) / "configs")
    out = Path(args.out) if args.out else None
    for pair in pairs:
        records = []
        if "maxtext" in args.sides:
            records.append(finish(pair, run_maxtext(pair, args.timeout)))
            emit(records[-1], out)
        if "solarjax" in args.sides:
            for variant in args.variants or pair.variants:
                if variant not in pair.variants:
                    print(f"aot_vs_maxtext: {pair.name} has no variant {variant!r} ({', '.join(pair.variants)})",
                          file=sys.stderr)
                else:
                    records.append(finish(pair, run_solarjax(pair, variant, args.timeout)))
                    emit(records[-1], out)
        line = summary(pair, records)
        if line is not None:
            emit(line, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
