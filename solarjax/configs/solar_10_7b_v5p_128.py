"""SOLAR-10.7B continued pretraining on a v5p-128 (64 chips, 95 GB HBM each): FSDP over all chips.

0.5M tokens per step (128 x 4096, 2 sequences per chip). Every weight and AdamW moment is
sharded 64 ways. Attention is splash (``auto`` on TPU). A v5p chip has room for remat
``dots_with_no_batch_dims`` (every matmul output kept) with the loss keeping ``softmax - onehot``
(``train.loss_recompute_logits=False``): compiled with ``solarjax aot`` (libtpu 0.0.42), 37.6 GB of
temporaries, 39.7 of 95.7 GB per chip, and executed FLOPs 1.066 x the model's, against 1.242 x
for ``save_qkv_lse`` (17.2 GB per chip; the fallback for longer sequences or bigger batches).
``bench/aot_vs_maxtext.py`` has the compiles.
"""

from solarjax.config import load_config


def get_config():
    config = load_config("solar_10_7b")
    config.model.remat = "dots_with_no_batch_dims"
    config.train.loss_recompute_logits = False
    config.mesh.update(data=1, fsdp=64, tensor=1)
    config.train.update(batch_size=128, seq_len=4096, grad_accum=1, steps=20000)
    config.optim.update(lr=3e-5, warmup_steps=200)
    config.distributed.enabled = True
    return config
