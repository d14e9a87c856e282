"""OLMoE-1B-7B training on a v5p-16 (8 chips, 95 GB HBM each): experts and every other weight
sharded FSDP-style over the 8 chips; Megablox grouped matmuls for the experts (``auto`` on TPU).

64k tokens per step (16 x 4096). `solarjax aot --config olmoe_1b_7b_v5p_16 --topology v5p-16`
prints the table: 24.5 GB per chip (10.4 GB params + AdamW state, 14.0 GB temporaries).
"""

from solarjax.config import load_config


def get_config():
    config = load_config("olmoe_1b_7b")
    config.model.remat = "save_qkv_attn"
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.train.update(batch_size=16, seq_len=4096, grad_accum=1, steps=10000)
    config.optim.update(lr=4e-4, warmup_steps=200)
    config.distributed.enabled = True
    return config
