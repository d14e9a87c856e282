"""OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 16 layers, 64 experts of 1024 hidden units, 8 per
token (1.3B active of 6.9B), whole-projection q/k norms, top-k weights not renormalised;
trained with load-balancing loss 0.01 and router z-loss 0.001 (the OLMoE paper)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="olmoe", vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
        ffn_dim=1024, rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=4096, dtype="bfloat16", param_dtype="float32", remat="none",
        n_experts=64, experts_per_token=8, norm_topk_prob=False, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001, bos_token_id=None, eos_token_id=50279,
    )
