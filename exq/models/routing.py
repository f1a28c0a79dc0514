"""Router selection rules, written out independently of transformers.

The profiler never uses these to decide routing (it reads the router's own choices); they exist so exq can state the
rule each model family uses, compute router entropies, and check the router against an independent reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["none", "max", "top2_sum"]


@dataclass(frozen=True)
class RoutingRule:
    """How one MoE layer turns router logits into (weights, expert ids).

    scores = softmax(logits) or sigmoid(logits)
    choice = scores (+ e_score_correction_bias)          # the bias changes who is chosen, never the weights
    group-limited: keep the `topk_group` best of `n_group` expert groups, scored by `group_score`
    ids = top_k(choice); weights = scores[ids] (/ their sum if norm_topk_prob) * routed_scaling_factor
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = False
    norm_eps: float = 0.0
    routed_scaling_factor: float = 1.0
    group_score: GroupScore = "none"
    n_group: int = 1
    topk_group: int = 1
    masked_score: float = float("-inf")
    correction_bias: bool = False
    weights_in_logits_dtype: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.group_score != "none" and (self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group):
            raise ValueError(
                f"group-limited routing needs num_experts ({self.num_experts}) divisible by n_group ({self.n_group}) "
                f"and 1 <= topk_group ({self.topk_group}) <= n_group"
            )

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        return torch.softmax(x, dim=-1) if self.scoring == "softmax" else torch.sigmoid(x)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The router's distribution over experts (sigmoid scores normalised to sum to one), for entropies."""
        s = self.scores(logits)
        return s if self.scoring == "softmax" else s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def select(
        self, logits: torch.Tensor, correction_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference selection: logits [T, E] -> (weights [T, k], expert ids [T, k])."""
        scores = self.scores(logits)
        choice = scores + correction_bias.float() if correction_bias is not None else scores
        if self.group_score != "none":
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            if self.group_score == "max":
                group_scores = grouped.max(dim=-1).values
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep_groups = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
            expert_mask = group_mask.repeat_interleave(self.num_experts // self.n_group, dim=-1)
            choice = choice.masked_fill(~expert_mask, self.masked_score)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.norm_eps)
        weights = weights * self.routed_scaling_factor
        if self.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        return weights, ids

    def describe(self) -> str:
        parts = [f"{self.scoring}", f"top-{self.top_k} of {self.num_experts}"]
        if self.correction_bias:
            parts.append("+ e_score_correction_bias for choice")
        if self.group_score != "none":
            parts.append(f"group-limited ({self.topk_group} of {self.n_group} groups by {self.group_score})")
        if self.norm_topk_prob:
            parts.append("renormalised")
        if self.routed_scaling_factor != 1.0:
            parts.append(f"x{self.routed_scaling_factor:g}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["masked_score"] = "-inf" if d["masked_score"] == float("-inf") else d["masked_score"]
        return d
