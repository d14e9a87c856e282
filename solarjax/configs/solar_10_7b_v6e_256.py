"""SOLAR-10.7B continued pretraining on a v6e-256 (256 chips, 31.25 GiB HBM each): FSDP over all chips.

2M tokens per step (512 x 4096, two sequences per chip, as the v5p-128 preset). Remat
``save_qkv_lse`` keeps q, k, v and splash's output and log-sum-exp once and recomputes the MLP,
and the loss keeps ``softmax - onehot`` instead of recomputing the logits: compiled with
``solarjax aot`` (libtpu 0.0.42), 14.33 GB of temporaries and 14.87 GB per chip in all, under
half the chip (MaxText 0.2.5's nearest step: 16.23 / 16.77 GB, ``bench/aot_vs_maxtext.py``). ``dots_with_no_batch_dims`` (less recompute) needed 38.2 GB of
temporaries at the same tokens per chip on v5p-128, more than a v6e chip has.
"""

from solarjax.config import load_config


def get_config():
    config = load_config("solar_10_7b")
    config.model.remat = "save_qkv_lse"
    config.train.loss_recompute_logits = False
    config.mesh.update(data=1, fsdp=256, tensor=1)
    config.train.update(batch_size=512, seq_len=4096, grad_accum=1, steps=5000)
    config.optim.update(lr=3e-5, warmup_steps=100)
    config.distributed.enabled = True
    return config
