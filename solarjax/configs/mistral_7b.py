"""Mistral-7B-v0.1: the base model SOLAR 10.7B was up-scaled from (sliding window 4096)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="mistral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim=14336, rope_theta=10000.0, rms_eps=1e-5, sliding_window=4096, tie_embeddings=False,
        max_seq_len=32768, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
    )
