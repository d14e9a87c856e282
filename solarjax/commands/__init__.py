"""CLI verbs: each module here defines ``register(subparsers)`` (see ``solarjax.cli``)."""
