"""SOLAR-10.7B continued pretraining on a v5p-128 (64 chips, 95 GB HBM each): FSDP over all chips.

0.5M tokens per step (128 x 4096, 2 sequences per chip). Every weight and AdamW moment is
sharded 64 ways; remat keeps the matmul outputs, which is what fits in 95 GB at this batch
(`solarjax aot --config configs/solar_10_7b_v5p_128.py --topology v5p-128` prints the table).
"""

from solarjax.config import load_config


def get_config():
    config = load_config("solar_10_7b")
    config.model.remat = "dots_with_no_batch_dims"
    config.mesh.update(data=1, fsdp=64, tensor=1)
    config.train.update(batch_size=128, seq_len=4096, grad_accum=1, steps=20000)
    config.optim.update(lr=3e-5, warmup_steps=200)
    config.distributed.enabled = True
    return config
