"""The error of a configuration that cannot work, at the bottom of the import graph.

Its own module so that the modules a config is checked against (``solarjax.attention``'s table of
kernels) can raise it without importing ``solarjax.config``, which imports them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot describe a working model."""
