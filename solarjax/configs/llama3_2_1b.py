"""Llama-3.2-1B: 16 layers, GQA 32/8, tied embeddings, Llama 3 RoPE scaling (1.24B parameters)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        ffn_dim=8192, rope_theta=500000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        max_seq_len=131072, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
        bos_token_id=128000, eos_token_id=128001,
    )
