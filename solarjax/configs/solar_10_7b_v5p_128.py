"""SOLAR-10.7B continued pretraining on a v5p-128 (64 chips, 95 GB HBM each): FSDP over all chips.

0.5M tokens per step (128 x 4096, 2 sequences per chip). Every weight and AdamW moment is
sharded 64 ways. Attention is splash (``auto`` on TPU); remat ``save_qkv_attn`` keeps each layer's
attention inputs and output and recomputes the MLP: about 19 GB of temporaries per chip, against
38 GB for ``dots_with_no_batch_dims`` (faster: less recompute, and it fits too)
(`solarjax aot --config solar_10_7b_v5p_128 --topology v5p-128` prints the table).
"""

from solarjax.config import load_config


def get_config():
    config = load_config("solar_10_7b")
    config.model.remat = "save_qkv_attn"
    config.mesh.update(data=1, fsdp=64, tensor=1)
    config.train.update(batch_size=128, seq_len=4096, grad_accum=1, steps=20000)
    config.optim.update(lr=3e-5, warmup_steps=200)
    config.distributed.enabled = True
    return config
