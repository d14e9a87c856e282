"""``solarjax generate``: sample text from a model, streamed to the terminal."""

from __future__ import annotations

import argparse
import sys

from solarjax.commands._flags import add_json, add_model, add_progress, add_tokenizer, loading_progress, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text with a KV cache (greedy or sampled), streamed as it is produced",
        description="Generate continuations of one or more prompts. One prompt streams token by token; "
        "several run as one left-padded batch.",
    )
    add_model(p)
    add_tokenizer(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--template", choices=("auto", "alpaca", "chat", "none"), default="auto",
                   help="how each prompt is wrapped: the template the model was tuned with (auto: as its run records "
                   "it, else none), the Alpaca prompt, the chat template (--tokenizer's, else the model's) or none")
    p.add_argument("--chat", action="store_true", help="the same as --template chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", help="param dtype to load as, e.g. bfloat16")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization on load (per-output-"
                   "channel scales; dequantized inside the layer loop)")
    p.add_argument("--truncate", choices=["none", "left"], default="none",
                   help="a prompt that does not fit the model's context (max_seq_len minus --max-new-tokens) is an "
                   "error (none, default) or keeps its last tokens (left)")
    p.add_argument("--no-stream", action="store_true",
                   help="print only when done (as --json does; and faster: the whole decode loop is one compiled "
                   "program; streaming runs one compiled step per token)")
    add_progress(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from solarjax.decode_layout import unstack_layers
    from solarjax.generate import generate_text, load_model, require_tokenizer

    if args.max_new_tokens < 1:  # before loading: nonsensical limits fail in a second, not after a load
        raise ValueError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    cfg, params, tokenizer = load_model(args.model, args.tokenizer, dtype=args.dtype, progress=loading_progress(args))
    require_tokenizer(tokenizer, args.model)
    if args.quantize:
        from solarjax.quant import quantize_params

        params = quantize_params(params, bits=int(args.quantize[3:]))
    params = unstack_layers(params, consume=True)  # the decode layout: each layer's weights read in place
    template = prompt_template(args)
    prompts = [render_prompt(template, p, args, cfg, tokenizer) for p in args.prompt]
    args.chat = template != "none"  # a wrapped prompt is shown on a line of its own
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_strings=args.stop,
                   truncate=args.truncate)
    if args.json:  # one object when all are done: {prompt, completion}, or {completions: [...]} for several
        done = [{"prompt": prompt, "completion": text}
                for prompt, text in zip(args.prompt, generate_text(params, cfg, tokenizer, prompts, **options))]
        print_json(done[0] if len(done) == 1 else {"completions": done})
        return 0
    if len(prompts) == 1 and not args.no_stream:
        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        sys.stdout.write(args.prompt[0] + ("\n" if args.chat else ""))
        generate_text(params, cfg, tokenizer, prompts, stream=stream, **options)
        sys.stdout.write("\n")
        return 0
    for prompt, text in zip(args.prompt, generate_text(params, cfg, tokenizer, prompts, **options)):
        print(f"{prompt}\n{text}" if args.chat else f"{prompt}{text}")
        if len(prompts) > 1:
            print("-" * 40)
    return 0


def prompt_template(args: argparse.Namespace) -> str:
    """``--template`` (``--chat`` is ``chat``); auto: the template the model's run records (``solarjax
    sft``/``dpo`` write it), else none."""
    from solarjax.sft import recorded_template

    if args.chat and args.template not in ("auto", "chat"):
        raise ValueError(f"--chat contradicts --template {args.template}")
    if args.chat:
        return "chat"
    if args.template != "auto":
        return args.template
    return recorded_template(args.model) or "none"


def render_prompt(template: str, text: str, args: argparse.Namespace, cfg, tokenizer) -> str:
    """One prompt in ``template``, as the model saw prompts in training."""
    from solarjax.generate import chat_prompt
    from solarjax.sft import alpaca_generation_prompt

    if template == "chat":
        return chat_prompt(args.model, text, tokenizer=args.tokenizer)
    if template == "alpaca":
        return alpaca_generation_prompt(text, tokenizer, cfg.bos_token_id)
    return text
