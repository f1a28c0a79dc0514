"""DeepSeek-V2 and -V3 routers, plus their always-on shared experts (`shared_experts`).

V2: softmax; greedy top-k, or group-limited greedy (groups scored by their best expert, dropped groups scored 0);
    weights x routed_scaling_factor, not renormalised.
V3: sigmoid; the choice adds `e_score_correction_bias`; groups scored by the sum of their two best experts, dropped
    groups scored -inf; weights are the un-biased scores, renormalised (norm_topk_prob), x routed_scaling_factor.
"""

from __future__ import annotations

from torch import nn

from exq.errors import ExqError
from exq.models.base import Adapter
from exq.models.routing import RoutingRule


class _DeepseekAdapter(Adapter):
    def shared(self, block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        return getattr(block, "shared_experts", None), None


class DeepseekV2Adapter(_DeepseekAdapter):
    family = "DeepSeek-V2"
    model_types = ("deepseek_v2",)

    def rule(self, router: nn.Module, config) -> RoutingRule:
        method = router.topk_method
        if method not in ("greedy", "group_limited_greedy"):
            raise ExqError(
                f"DeepSeek-V2 topk_method {method!r} is not supported", "supported: 'greedy', 'group_limited_greedy'"
            )
        grouped = method == "group_limited_greedy"
        return RoutingRule(
            num_experts=router.num_experts,
            top_k=router.top_k,
            scoring="softmax",
            routed_scaling_factor=float(router.routed_scaling_factor),
            group_score="max" if grouped else "none",
            n_group=int(router.num_group) if grouped else 1,
            topk_group=int(router.topk_group) if grouped else 1,
            masked_score=0.0,
        )


class DeepseekV3Adapter(_DeepseekAdapter):
    family = "DeepSeek-V3"
    model_types = ("deepseek_v3",)

    def rule(self, router: nn.Module, config) -> RoutingRule:
        return RoutingRule(
            num_experts=router.num_experts,
            top_k=router.top_k,
            scoring="sigmoid",
            norm_topk_prob=bool(router.norm_topk_prob),
            norm_eps=1e-20,
            routed_scaling_factor=float(router.routed_scaling_factor),
            group_score="top2_sum",
            n_group=int(router.num_group),
            topk_group=int(router.topk_group),
            correction_bias=True,
        )
