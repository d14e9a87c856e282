"""Training-step throughput: solarjax's sharded train step vs a transformers + torch AdamW step.

Same model shape (a preset, random weights), same batch, same optimizer family (AdamW with
global-norm clipping), fp32 on CPU and bf16 on GPU. Each side runs in its own subprocess so peak
memory is its own. Prints one JSON line per figure (tokens/s, step ms, MFU where the device's peak
is known, peak RSS) with the ratio ours/peer.

    python bench/train_step.py --preset smollm2_135m --batch 2 --seq 256 --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_ours(args) -> dict:
    import jax
    import numpy as np

    from solarjax import sharding as shd
    from solarjax import train
    from solarjax.config import load_config, model_config_from_dict
    from solarjax.model import init_params
    from solarjax.optim import make_optimizer

    config = load_config(args.preset)
    dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    cfg = model_config_from_dict(dict(config.model, dtype=dtype, param_dtype="float32", remat=args.remat))
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(config.optim, 1000)
    state_sh = train.train_state_shardings(cfg, optimizer, mesh)
    batch_sh = shd.batch_sharding(mesh)
    step = train.jit_train_step(train.make_train_step(cfg, optimizer, schedule=schedule), state_sh, batch_sh)
    params = jax.device_put(init_params(jax.random.key(0), cfg), state_sh["params"])
    state = train.init_train_state(params, optimizer)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((args.batch, args.seq), np.int32),
             "segment_ids": np.ones((args.batch, args.seq), np.int32),
             "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    batch = train.global_batch(batch, batch_sh)
    for _ in range(2):  # compile + one warm step
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    tps = args.batch * args.seq / seconds
    return {"step_ms": seconds * 1e3, "tokens_per_s": tps, "loss": float(metrics["loss"]),
            "mfu": train.mfu(tps, cfg, args.seq, 1), "device": jax.devices()[0].device_kind,
            "flops_per_token": cfg.flops_per_token(args.seq)}


def run_peer(args) -> dict:
    import torch
    import transformers

    from solarjax.config import load_config, model_config_from_dict
    from solarjax.hf import config_to_hf

    config = load_config(args.preset)
    cfg = model_config_from_dict(dict(config.model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf_config = config_to_hf(cfg)
    cls = transformers.MistralConfig if cfg.arch == "mistral" else transformers.LlamaConfig
    model = transformers.AutoModelForCausalLM.from_config(cls(**hf_config)).to(device)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    optim = config.optim
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                            weight_decay=optim.weight_decay)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    seconds = (time.perf_counter() - start) / args.steps
    return {"step_ms": seconds * 1e3, "tokens_per_s": args.batch * args.seq / seconds, "loss": float(loss),
            "device": device, "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm2_135m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_ours if args.side == "ours" else run_peer)(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    sides = {}
    for side in ("ours", "peer"):
        cmd = [sys.executable, __file__, "--side", side] + [f"--{k}={v}" for k, v in vars(args).items() if k != "side"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        sides[side] = json.loads(out.strip().splitlines()[-1])
    shape = dict(preset=args.preset, batch=args.batch, seq=args.seq, device=sides["ours"]["device"])
    for figure, unit in (("tokens_per_s", "tok/s"), ("step_ms", "ms"), ("peak_rss_mb", "MB")):
        ours, peer = sides["ours"][figure], sides["peer"][figure]
        print(json.dumps({"figure": f"train_{figure}", "unit": unit, "ours": round(ours, 2), "peer": round(peer, 2),
                          "ratio_ours_over_peer": round(ours / peer, 3), **shape}))
    achieved = {side: sides[side]["tokens_per_s"] * sides["ours"]["flops_per_token"] / 1e9 for side in sides}
    print(json.dumps({"figure": "train_mfu", "ours": sides["ours"]["mfu"], "note": "null where the device's peak "
                      "FLOP/s is unknown (CPU)", "flops_per_token": sides["ours"]["flops_per_token"],
                      "achieved_gflops_ours": round(achieved["ours"], 1), "achieved_gflops_peer": round(achieved["peer"], 1),
                      **shape}))


if __name__ == "__main__":
    main()
