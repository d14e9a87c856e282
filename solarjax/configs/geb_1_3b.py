"""A ~1.3B GQA decoder shaped like GEB-1.3B (Wu et al., arXiv 2406.09900): RoPE, grouped-query
attention, SwiGLU, untied embeddings, 1.35B parameters.

The paper's exact layer table was not available offline when this preset was written, so the
shape (24 layers, d_model 2048, 16 query / 4 KV heads of 128, FFN 5632, 64k vocabulary) is an
assumption with the published character (size, GQA, untied head), not a copy of the released
checkpoint: use it for latency and memory, not to load GEB weights.
"""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="llama", vocab_size=64000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4,
        ffn_dim=5632, rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=4096, dtype="bfloat16", param_dtype="float32", remat="dots_with_no_batch_dims",
    )
