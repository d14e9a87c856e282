"""A tiny Mistral shape for tests: sliding window shorter than test sequences, tied head."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="mistral", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=1,
        ffn_dim=128, rope_theta=10000.0, rms_eps=1e-6, sliding_window=8, tie_embeddings=True,
        max_seq_len=256, dtype="float32", param_dtype="float32", remat="full",
    )
