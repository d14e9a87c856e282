"""Gemma-3-1B, SOLAR-style depth up-scaled: 26 -> 40 layers (0-19 then 6-25); m is a multiple of the 6-layer
sliding/full period, so the second copy keeps the pattern's phase and every layer keeps its type.

Training starts from the base model grown by ``init.upscale``: set ``--config.init.source=DIR`` to the
Hugging Face checkpoint (random init otherwise). ``solarjax upscale DIR OUT --plan solar:m=6`` writes
the same grown checkpoint.
"""

from solarjax.configs.gemma3_1b import get_config as base


def get_config():
    config = base()
    config.init.upscale = "solar:m=6"
    return config
