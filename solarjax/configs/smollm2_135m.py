"""SmolLM2-135M: 30 layers, GQA 9/3, tied embeddings (the demo's real base model)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
        ffn_dim=1536, rope_theta=100000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=True,
        max_seq_len=8192, dtype="float32", param_dtype="float32", remat="none",
        bos_token_id=1, eos_token_id=2,
    )
