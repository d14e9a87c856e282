"""Moved to :mod:`solarjax.growth` (``growth.upcycle``, and ``growth.grow`` for growth specs);
kept until train/ imports are updated."""

from solarjax.growth.grow import grow, grow_loaded, growth_steps, grown_config, is_upcycle  # noqa: F401
from solarjax.growth.upcycle import *  # noqa: F401,F403
