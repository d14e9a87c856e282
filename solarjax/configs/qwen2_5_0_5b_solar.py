"""Qwen2.5-0.5B, SOLAR-style depth up-scaled: 24 -> 36 layers (0-17 then 6-23).

Training starts from the base model grown by ``init.upscale``: set ``--config.init.source=DIR`` to the
Hugging Face checkpoint (random init otherwise). ``solarjax upscale DIR OUT --plan solar:m=6`` writes
the same grown checkpoint.
"""

from solarjax.configs.qwen2_5_0_5b import get_config as base


def get_config():
    config = base()
    config.init.upscale = "solar:m=6"
    return config
