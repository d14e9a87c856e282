"""TinyLlama-1.1B: 22 layers, GQA 32/4."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
        ffn_dim=5632, rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=2048, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
    )
