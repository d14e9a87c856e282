"""Training-step throughput: solarjax's train step vs transformers + torch, side by side.

Same model shape (a preset, random weights), same batch, same optimizer family (AdamW with
global-norm clipping). On a GPU both sides compute in bf16 with fp32 master weights; on CPU fp32.
Peers: transformers eager (``sdpa`` attention, foreach AdamW) and the configuration a PyTorch
user would pick for speed, ``torch.compile`` on the model + fused AdamW. Each side runs in its own
subprocess (own peak memory, own timeout). One JSON line per figure, with ratios ours / peer.

MFU convention: model FLOPs per token = 6 N (non-embedding matmul params + the head) + 12 L d_attn T
for attention, with causal attention **not** halved (as in the PaLM appendix and the figures in
shared notes); peak = the device's dense bf16 FLOP/s (H100 SXM: 989 TFLOP/s).

    python bench/train_step.py --preset smollm2_135m --batch 2 --seq 256 --steps 5          # CPU
    python bench/train_step.py --preset tinyllama_1_1b --batch 4 --seq 2048 --peers compile,eager  # GPU

``--segments packed`` (default) feeds the segment ids the trainer always has (one document per
row here), so the fused kernel's packed path is what gets timed; ``--segments none`` times the
plain causal kernel.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _model_config(args):
    from solarjax.config import load_config, model_config_from_dict

    config = load_config(args.preset)
    values = dict(config.model, max_seq_len=max(args.seq, config.model.max_seq_len), remat=args.remat)
    return config, model_config_from_dict(values)


def run_ours(args) -> dict:
    import jax
    import numpy as np

    from solarjax import sharding as shd
    from solarjax import train
    from solarjax.attention import resolve
    from solarjax.model import init_params
    from solarjax.optim import make_optimizer

    config, cfg = _model_config(args)
    on_cpu = jax.default_backend() == "cpu"
    cfg = cfg.replace(dtype="float32" if on_cpu else "bfloat16", param_dtype="float32", attention=args.attention)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(config.optim, 1000)
    state_sh = train.train_state_shardings(cfg, optimizer, mesh)
    batch_sh = shd.batch_sharding(mesh)
    step = train.jit_train_step(train.make_train_step(cfg, optimizer, schedule=schedule), state_sh, batch_sh)
    params = jax.jit(lambda k: init_params(k, cfg), out_shardings=state_sh["params"])(jax.random.key(0))
    state = jax.jit(lambda p: train.init_train_state(p, optimizer), out_shardings=state_sh)(params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    ones = np.ones((args.batch, args.seq), np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": ones, "segment_ids": ones,
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    batch = train.global_batch(batch, batch_sh)
    if args.segments == "none":
        inner = train.make_train_step(cfg, optimizer, schedule=schedule)
        step = train.jit_train_step(lambda s, b: inner(s, dict(b, segment_ids=None)), state_sh, batch_sh)
    start = time.perf_counter()
    state, metrics = step(state, batch)  # compile + first step
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    tps = args.batch * args.seq / seconds
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_ms": seconds * 1e3, "tokens_per_s": tps, "loss": float(metrics["loss"]), "compile_s": compile_s,
            "mfu": train.mfu(tps, cfg, args.seq, 1), "device": jax.devices()[0].device_kind,
            "attention": resolve(cfg.attention, cfg.compute_dtype), "remat": cfg.remat,
            "peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
            "flops_per_token": cfg.flops_per_token(args.seq), "jax": jax.__version__}


def run_peer(args, mode: str) -> dict:
    import torch
    import transformers

    from solarjax.hf import config_to_hf

    config, cfg = _model_config(args)
    cls = transformers.MistralConfig if cfg.arch == "mistral" else transformers.LlamaConfig
    model = transformers.AutoModelForCausalLM.from_config(cls(**config_to_hf(cfg)), attn_implementation="sdpa")

    def loss_of(forward, inputs, labels):
        logits = forward(inputs).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    return time_peer(model, config, cfg, args, mode, loss_of)


def time_peer(model, config, cfg, args, mode: str, loss_of) -> dict:
    """The transformers side of a benchmark, timed: bf16 autocast on CUDA, AdamW (fused under
    ``torch.compile`` on CUDA), gradient clipping, ``loss_of(forward, inputs, labels)`` as the loss."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(device)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    from solarjax.optim import resolve_optim

    optim = resolve_optim(config.optim, 1000, continued=False)  # the from-scratch rate, as the solarjax side
    opt = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=(optim["b1"], optim["b2"]), eps=optim["eps"],
                            weight_decay=optim["weight_decay"], fused=(mode == "compile" and device == "cuda"))
    forward = torch.compile(model) if mode == "compile" else model
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = loss_of(forward, inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    sync()
    compile_s = time.perf_counter() - start
    step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"step_ms": seconds * 1e3, "tokens_per_s": args.batch * args.seq / seconds, "loss": float(loss),
            "compile_s": compile_s, "device": device, "peak_device_mb": peak, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _side(args, side: str, script: str = __file__, dashes: bool = False) -> dict:
    """One side of ``script`` in its own process (own peak RSS; a hang or crash costs only that
    side's figure), its flags from ``args`` (``dashes``: the script spells them with dashes)."""
    flag = (lambda k: k.replace("_", "-")) if dashes else (lambda k: k)  # noqa: E731
    cmd = [sys.executable, script, "--side", side] + [f"--{flag(k)}={v}" for k, v in vars(args).items()
                                                     if k not in ("side", "timeout") and v is not None]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if done.returncode:
        lines = [l for l in done.stderr.strip().splitlines() if l.strip()]
        return {"error": (lines[-1] if lines else f"exit {done.returncode}")[:400]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2_135m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--segments", choices=["packed", "none"], default="packed")
    parser.add_argument("--peers", default="eager", help="comma-separated: eager, compile (or '' for none)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per side")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_ours(args) if args.side == "ours" else run_peer(args, args.side.removeprefix("peer-"))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    shape = dict(preset=args.preset, batch=args.batch, seq=args.seq, remat=args.remat, segments=args.segments)
    ours = _side(args, "ours")
    print(json.dumps({"figure": "train_ours", **shape, **ours}), flush=True)
    for peer in [p for p in args.peers.split(",") if p]:
        theirs = _side(args, f"peer-{peer}")
        line = {"figure": f"train_peer_{peer}", **shape, **theirs}
        if "error" not in ours and "error" not in theirs:
            line["ratio_tokens_per_s_ours_over_peer"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
            line["mfu"] = ours["mfu"] * theirs["tokens_per_s"] / ours["tokens_per_s"] if ours.get("mfu") else None
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
