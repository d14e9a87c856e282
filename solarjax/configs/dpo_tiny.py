"""DPO of the tiny Llama shape (tests, CPU smoke runs) against its own starting weights.

``train.batch_size`` counts preference pairs (2 rows each). For SOLAR 10.7B, add the same ``dpo``
section to ``configs/solar_10_7b.py`` (``solarjax dpo`` adds it to any preset); DPO usually wants a
small learning rate (~5e-7 at that scale) and beta 0.1.
"""

from solarjax.config import base_config
from solarjax.dpo import add_dpo_config


def get_config():
    config = base_config(
        arch="llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
        ffn_dim=128, rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=256, dtype="float32", param_dtype="float32", remat="none",
    )
    add_dpo_config(config)
    config.data.source = None  # --data FILE
    config.train.update(steps=50, batch_size=8, seq_len=128, log_every=5, eval_every=0)
    config.optim.update(lr=1e-4, warmup_steps=5, weight_decay=0.0, schedule="cosine", min_lr_ratio=0.1)
    config.checkpoint.every = 50
    return config
