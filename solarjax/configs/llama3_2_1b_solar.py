"""Llama-3.2-1B, SOLAR-style depth up-scaled: 16 -> 24 layers (0-11 then 4-15).

Training starts from the base model grown by ``init.upscale``: set ``--config.init.source=DIR`` to the
Hugging Face checkpoint (random init otherwise). ``solarjax upscale DIR OUT --plan solar:m=4`` writes
the same grown checkpoint.
"""

from solarjax.configs.llama3_2_1b import get_config as base


def get_config():
    config = base()
    config.init.upscale = "solar:m=4"
    return config
