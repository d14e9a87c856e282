"""A tiny Mixtral shape for tests and CPU smoke runs: 4 experts, top-2, z-loss on (OLMoE's 0.001)."""

from solarjax.config import base_config


def get_config():
    return base_config(
        arch="mixtral", vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
        ffn_dim=96, n_experts=4, experts_per_token=2, norm_topk_prob=True, router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001, moe_dispatch="auto", rope_theta=10000.0, rms_eps=1e-5, sliding_window=None, tie_embeddings=False,
        max_seq_len=256, dtype="float32", param_dtype="float32", remat="none",
    )
