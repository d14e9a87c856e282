"""SOLAR-10.7B continued pretraining on a v5e-256 (256 chips, 16 GiB HBM each): FSDP over all chips.

1M tokens per step (256 x 4096, one sequence per chip). 16 GiB per chip leaves no room for the
saved matmul outputs of 48 layers, so every layer is recomputed in the backward pass (remat
full: only each layer's input is kept).
"""

from solarjax.config import load_config


def get_config():
    config = load_config("solar_10_7b")
    config.model.remat = "full"
    config.mesh.update(data=1, fsdp=256, tensor=1)
    config.train.update(batch_size=256, seq_len=4096, grad_accum=1, steps=10000)
    config.optim.update(lr=3e-5, warmup_steps=200)
    config.distributed.enabled = True
    return config
