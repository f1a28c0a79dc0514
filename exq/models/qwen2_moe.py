"""Qwen2-MoE: softmax top-k routed experts plus one shared expert scaled by sigmoid(shared_expert_gate(x))."""

from __future__ import annotations

from torch import nn

from exq.models.olmoe import SoftmaxTopKAdapter


class Qwen2MoeAdapter(SoftmaxTopKAdapter):
    family = "Qwen2-MoE"
    model_types = ("qwen2_moe",)

    def shared(self, block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        return getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
