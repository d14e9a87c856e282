"""A tiny Llama shape for tests and CPU smoke runs (GQA, untied head)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="llama", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
        ffn_dim=128, rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=256, dtype="float32", param_dtype="float32", remat="none",
    )
