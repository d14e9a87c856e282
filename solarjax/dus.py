"""Moved to :mod:`solarjax.growth` (plans in ``growth.plans``, their application in ``growth.dus``);
kept until train/ imports are updated."""

from solarjax.growth.dus import *  # noqa: F401,F403
from solarjax.growth.dus import plan_config, upscale_hf, upscale_params  # noqa: F401
from solarjax.growth.plans import *  # noqa: F401,F403
