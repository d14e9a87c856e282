"""Qwen2.5-0.5B: 24 layers, GQA 14/2, q/k/v biases, tied embeddings (0.49B parameters)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
        ffn_dim=4864, rope_theta=1000000.0, rms_eps=1e-6, sliding_window=None, tie_embeddings=True,
        max_seq_len=32768, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
        bos_token_id=151643, eos_token_id=151643,
    )
