"""Qwen3-0.6B, SOLAR-style depth up-scaled: 28 -> 42 layers (0-20 then 7-27).

Training starts from the base model grown by ``init.upscale``: set ``--config.init.source=DIR`` to the
Hugging Face checkpoint (random init otherwise). ``solarjax upscale DIR OUT --plan solar:m=7`` writes
the same grown checkpoint.
"""

from solarjax.configs.qwen3_0_6b import get_config as base


def get_config():
    config = base()
    config.init.upscale = "solar:m=7"
    return config
