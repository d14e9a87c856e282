"""Mixture-of-Experts training step: solarjax (dropless dispatch, `auto` by backend) vs transformers' Mixtral.

Same shape (``tiny_moe``'s Mixtral family resized by the flags, random weights), same batch, same
optimizer (AdamW with global-norm clipping, the preset's optim section), same loss: cross-entropy
plus the load-balancing loss at ``router_aux_loss_coef`` (transformers adds it when asked for
router logits; the z-loss is off on both sides, transformers' Mixtral has none). Peers:
``MixtralForCausalLM`` eager and under ``torch.compile``. Each side runs in its own subprocess
(own peak memory, own timeout); one JSON line per figure, with ratios ours / peer. Our side is
``bench/train_step.py``'s (the trainer's jitted step, 1 device); tokens/s count all tokens, MFU uses
the active parameters (:meth:`solarjax.config.ModelConfig.flops_per_token`).

    python bench/moe_step.py --d-model 256 --layers 4 --experts 8 --top-k 2 --seq 256 --batch 4   # the issue's shape
    python bench/moe_step.py --d-model 128 --layers 2 --seq 128 --batch 2 --steps 3 --threads 1   # quick CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (bench/train_step.py: our side's timed step)
from solarjax.config import MOE_DISPATCH  # noqa: E402


def _model_config(args):
    """``tiny_moe`` resized by the flags; the z-loss off (transformers' Mixtral has none)."""
    from solarjax.config import load_config, model_config_from_dict

    config = load_config("tiny_moe")
    values = dict(config.model, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                  n_kv_heads=args.kv_heads, ffn_dim=args.ffn, n_experts=args.experts, experts_per_token=args.top_k,
                  vocab_size=args.vocab, max_seq_len=max(args.seq, 256), remat=args.remat,
                  moe_dispatch=args.dispatch, router_z_loss_coef=0.0)
    return config, model_config_from_dict(values)


def run_ours(args) -> dict:
    train_step._model_config = lambda a: _model_config(a)  # the shared timed step, on this shape
    return train_step.run_ours(args)


def run_peer(args, mode: str) -> dict:
    import torch
    import transformers

    from solarjax.hf import config_to_hf

    config, cfg = _model_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_config = transformers.MixtralConfig(**config_to_hf(cfg))
    model = transformers.MixtralForCausalLM._from_config(hf_config, attn_implementation="sdpa")

    def loss_of(forward, inputs, labels):  # the balance loss included, as our step includes it
        out = forward(inputs, output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())
        return ce + cfg.router_aux_loss_coef * out.aux_loss

    return {**train_step.time_peer(model, config, cfg, args, mode, loss_of), "transformers": transformers.__version__,
            "experts_impl": getattr(hf_config, "_experts_implementation", None)}


def _side(args, side: str) -> dict:
    return train_step._side(args, side, script=__file__, dashes=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512, help="each expert's hidden size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--dispatch", default="auto", choices=list(MOE_DISPATCH), help="our expert dispatch")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--segments", choices=["packed", "none"], default="packed")
    parser.add_argument("--peers", default="eager,compile", help="comma-separated: eager, compile (or '' for none)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per side")
    parser.add_argument("--threads", type=int, default=0,
                        help="pin each side to this many cores (torch threads too); 0: all. On a shared CPU, "
                             "torch's OpenMP threads spin against other work (1 thread can be 50x faster than 2)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        if args.threads:  # both sides on the same cores (XLA sizes its pool from the affinity mask)
            import os

            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
        result = run_ours(args) if args.side == "ours" else run_peer(args, args.side.removeprefix("peer-"))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    shape = dict(d_model=args.d_model, layers=args.layers, experts=args.experts, top_k=args.top_k, ffn=args.ffn,
                 batch=args.batch, seq=args.seq, dispatch=args.dispatch, remat=args.remat, threads=args.threads or None)
    ours = _side(args, "ours")
    print(json.dumps({"figure": "moe_train_ours", **shape, **ours}), flush=True)
    for peer in [p for p in args.peers.split(",") if p]:
        theirs = _side(args, f"peer-{peer}")
        line = {"figure": f"moe_train_peer_{peer}", **shape, **theirs}
        if "error" not in ours and "error" not in theirs:
            line["ratio_tokens_per_s_ours_over_peer"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
