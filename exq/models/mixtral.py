"""Mixtral: softmax over float32 logits -> top-k, always renormalised, weights kept in float32."""

from __future__ import annotations

from torch import nn

from exq.models.base import Adapter
from exq.models.routing import RoutingRule


class MixtralAdapter(Adapter):
    family = "Mixtral"
    model_types = ("mixtral",)

    def rule(self, router: nn.Module, config) -> RoutingRule:
        return RoutingRule(num_experts=router.num_experts, top_k=router.top_k, scoring="softmax", norm_topk_prob=True)
