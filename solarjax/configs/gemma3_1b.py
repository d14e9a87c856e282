"""Gemma-3-1B (text): 26 layers, 5 sliding (window 512, RoPE base 10k) to 1 full (base 1M), MQA 4/1
with head_dim 256, GeGLU, sandwich norms, 262k vocabulary, tied embeddings (1.0B parameters)."""

from solarjax.config import base_config

N_LAYERS = 26


def get_config():
    return base_config(
        arch="gemma3", vocab_size=262144, d_model=1152, n_layers=N_LAYERS, n_heads=4, n_kv_heads=1, head_dim=256,
        ffn_dim=6912, rope_theta=1000000.0, rope_local_theta=10000.0, rms_eps=1e-6, sliding_window=512,
        layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(N_LAYERS)],
        query_pre_attn_scalar=256.0, tie_embeddings=True, max_seq_len=32768, dtype="bfloat16",
        param_dtype="float32", remat="dots_with_no_batch_dims", bos_token_id=2, eos_token_id=1,
    )
