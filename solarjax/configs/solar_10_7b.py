"""SOLAR-10.7B: Mistral-7B depth up-scaled to 48 layers (Llama architecture, no sliding window)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="llama", vocab_size=32000, d_model=4096, n_layers=48, n_heads=32, n_kv_heads=8,
        ffn_dim=14336, rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=4096, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
    )
