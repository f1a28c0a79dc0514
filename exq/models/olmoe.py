"""OLMoE: softmax -> top-k, optionally renormalised (`norm_topk_prob`), weights cast back to the logits dtype."""

from __future__ import annotations

from torch import nn

from exq.models.base import Adapter
from exq.models.routing import RoutingRule


class SoftmaxTopKAdapter(Adapter):
    """Shared by the families whose router is transformers' softmax top-k router (OLMoE, Qwen2-MoE, Qwen3-MoE)."""

    def rule(self, router: nn.Module, config) -> RoutingRule:
        return RoutingRule(
            num_experts=router.num_experts,
            top_k=router.top_k,
            scoring="softmax",
            norm_topk_prob=bool(router.norm_topk_prob),
            weights_in_logits_dtype=True,
        )


class OlmoeAdapter(SoftmaxTopKAdapter):
    family = "OLMoE"
    model_types = ("olmoe",)
