"""The ``solarjax`` command line: one entry point, one module per verb.

Each module in ``solarjax/commands/`` defines ``register(subparsers)``, which adds its verb and
sets ``func`` on the parser. Verbs are discovered, so adding one never touches this file. Heavy
imports (jax, transformers) happen inside the verbs, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys

import solarjax.commands
from solarjax.commands._flags import CONFIG_PREFIX, accept_config_overrides  # noqa: F401  (kept importable here)
from solarjax.commands._flags import json_stdout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solarjax",
        description="Depth up-scaling (SOLAR 10.7B) of Llama/Mistral models in JAX: convert, up-scale, "
        "train, evaluate, generate, merge.",
        epilog="Run 'solarjax VERB --help' for the options of one verb.",
    )
    parser.add_argument("--version", action="version", version=f"solarjax {solarjax.__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for info in sorted(pkgutil.iter_modules(solarjax.commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"solarjax.commands.{info.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from solarjax import xla_flags

    xla_flags.apply()  # before any verb starts JAX's backend
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with json_stdout(args):  # --json: the result alone on stdout
            return int(args.func(args) or 0)
    except (ValueError, OSError) as err:
        # Our errors (ConfigError, CheckpointError, OutputError, ...) are ValueErrors with a message
        # that names the culprit, and an OS error (disk full, read-only, permission denied) names
        # its file; a traceback would only bury either.
        print(f"solarjax {args.verb}: error: {one_line(err)}", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    """An OS error as its reason and file (``str`` of one can be just "[Errno 28] No space left on
    device"), anything else as its message."""
    if isinstance(err, OSError) and err.strerror:
        code = errno.errorcode.get(err.errno or 0)
        reason = f"{err.strerror} ({code})" if code else err.strerror
        files = [os.fsdecode(f) for f in (err.filename, err.filename2) if f is not None]
        return f"{reason}: {' -> '.join(files)}" if files else reason
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
