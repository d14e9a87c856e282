"""The flags every verb shares, declared once (the README's "Command line" convention).

``--model`` names what a verb reads, ``--out`` what it writes; training verbs share ``--config``,
``--data``, ``--init``, ``--steps`` and friends; ``--no-progress`` and ``--json`` mean the same
everywhere; a count limit of 0 means "no limit". Verbs import this module, never ``solarjax.cli``
or each other.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

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


# ----------------------------------------------------------------------------- inputs and outputs


def add_model(p: argparse.ArgumentParser, help: str = "model: HF directory, .gguf file, solarjax Orbax checkpoint, "
              "training run or one of its checkpoints/<step>", *, alias: str | None = None) -> None:
    """``--model PATH`` (required). ``alias`` keeps an older positional working (deprecated, hidden
    from --help); the verb then calls :func:`paths`, which fills ``args.model`` from it."""
    _add_path(p, "model", help, alias)


def add_out(p: argparse.ArgumentParser, help: str, *, alias: str | None = None) -> None:
    """``--out PATH`` (required), the verb's output; ``alias`` as in :func:`add_model`."""
    _add_path(p, "out", help, alias)


def _add_path(p: argparse.ArgumentParser, flag: str, help: str, alias: str | None) -> None:
    if alias is None:
        p.add_argument(f"--{flag}", required=True, help=help)
        return
    p.add_argument(f"--{flag}", help=help + " (required)")
    p.add_argument(alias, nargs="?", help=argparse.SUPPRESS)
    p.set_defaults(_aliases={**(p.get_default("_aliases") or {}), flag: alias})


def paths(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``--model``/``--out`` from their deprecated positionals; a missing one is an error naming the flag."""
    for flag, alias in (getattr(args, "_aliases", None) or {}).items():
        given, old = getattr(args, flag, None), getattr(args, alias, None)
        if given is not None and old is not None:
            raise ValueError(f"give --{flag} or the positional {alias.upper()}, not both")
        if given is None and old is None:
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
    import sys

    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of prose")


def report(args: argparse.Namespace, facts: dict[str, Any], sentence: str) -> None:
    """The verb's result: one JSON object with ``--json``, else the sentence."""
    print(json.dumps(facts) if getattr(args, "json", False) else sentence)


def limit(value: int | None, flag: str) -> int | None:
    """A count limit as the convention reads it: 0 (or unset) is no limit (None); below 0 is an error."""
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be 0 (no limit) or a positive count, got {value}")
    return value or None


# ----------------------------------------------------------------------------- training verbs


def add_training(p: argparse.ArgumentParser, default_config: str | None, *, data_help: str) -> None:
    """The flags of every training verb (train, sft, dpo): shortcuts for the common config keys."""
    p.add_argument("--config", required=default_config is None, default=default_config,
                   help="config preset name or a .py file" + (f" (default {default_config})" if default_config else ""))
    p.add_argument("--data", help=data_help + "; sets data.source")
    p.add_argument("--eval-data", help="held-out data of the same format; sets data.eval_source")
    p.add_argument("--init", help="start from this model (HF directory, .gguf, Orbax checkpoint or training run); "
                   "sets init.source")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the --init model's); "
                   "sets data.tokenizer")
    p.add_argument("--out", help="run directory (tokenizer, metrics.jsonl, checkpoints/); sets train.out_dir")
    p.add_argument("--steps", type=int, help="sets train.steps")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--export-hf", metavar="DIR", help="after training, also write the final model as an HF "
                   "directory (transformers loads it) with the run's tokenizer; needs --out")
    add_progress(p)
    add_json(p)
    accept_config_overrides(p)


def training_config(args: argparse.Namespace, add_section: Callable[[Any], None] | None = None):
    """The preset (with a verb's extra section), the flag shortcuts, then the ``--config.*`` overrides."""
    from solarjax.config import apply_overrides, load_config

    config = load_config(args.config)
    if add_section is not None:
        add_section(config)
    shortcuts = {"data.source": args.data, "data.eval_source": args.eval_data, "init.source": args.init,
                 "data.tokenizer": args.tokenizer, "train.out_dir": args.out, "train.steps": args.steps}
    if args.no_progress:
        shortcuts["train.progress"] = False
    for key, value in shortcuts.items():
        if value is not None:
            group, name = key.split(".")
            config[group][name] = value
    apply_overrides(config, args.overrides)
    return config


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
    """Refuse a bad ``--export-hf`` destination before any training (the ownership rule)."""
    if not getattr(args, "export_hf", None):
        return
    if not config.train.out_dir:
        raise ValueError("--export-hf needs a run directory (--out): the export is its final checkpoint")
    from solarjax.outputs import check_destination

    check_destination(args.export_hf, sources=(config.train.out_dir,))


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
