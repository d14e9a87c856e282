"""Mistral-7B continued pretraining on a v4-64 (32 chips, 32 GiB HBM each): FSDP over all chips.

0.5M tokens per step (128 x 4096) as two microbatches of 64 (2 sequences per chip each) with
full remat, which keeps activations to a few GB next to 3.6 GB of sharded params, moments and
gradients per chip.
"""

from solarjax.config import load_config


def get_config():
    config = load_config("mistral_7b")
    config.model.remat = "full"
    config.mesh.update(data=1, fsdp=32, tensor=1)
    config.train.update(batch_size=128, seq_len=4096, grad_accum=2, steps=20000)
    config.optim.update(lr=3e-5, warmup_steps=200)
    config.distributed.enabled = True
    return config
