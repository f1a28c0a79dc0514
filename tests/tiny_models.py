"""Tiny randomly initialised models of every supported family, built offline from configs."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_configs() -> dict:
    return {
        "olmoe": OlmoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=32, num_experts=8, num_experts_per_tok=2),
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
        "qwen2_moe_h128": Qwen2MoeConfig(  # group-128 formats fit every matrix, shared expert and attention too
            **{**COMMON, "hidden_size": 128},
            num_hidden_layers=2,
            intermediate_size=128,
            moe_intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            shared_expert_intermediate_size=128,
        ),
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=32,
            num_experts=12,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
        "mixtral": MixtralConfig(
            **COMMON, num_hidden_layers=2, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2
        ),
        "deepseek_v2": DeepseekV2Config(
            **COMMON,
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        "deepseek_v2_greedy": DeepseekV2Config(
            **COMMON,
            num_hidden_layers=2,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            topk_method="greedy",
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
        "deepseek_v3_h128": DeepseekV3Config(  # group-128 formats fit; for end-to-end pipeline runs
            **{**COMMON, "hidden_size": 128, "vocab_size": 4096},
            num_hidden_layers=3,
            intermediate_size=256,
            moe_intermediate_size=128,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
        ),
        "deepseek_v3": DeepseekV3Config(
            **COMMON,
            num_hidden_layers=3,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    }


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random model whose routers are sharp enough to route unevenly (ties would make the checks weak)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs()[name]).to(dtype).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for name_, b in model.named_buffers():
            if name_.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model
