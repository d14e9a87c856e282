"""Qwen3-0.6B: 28 layers, GQA 16/8 with head_dim 128, per-head q/k RMSNorm, tied embeddings (0.60B)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="qwen3", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
        ffn_dim=3072, rope_theta=1000000.0, rms_eps=1e-6, sliding_window=None, tie_embeddings=True,
        max_seq_len=40960, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
        bos_token_id=151643, eos_token_id=151645,
    )
