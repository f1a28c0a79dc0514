"""Qwen3-MoE: the softmax top-k router (renormalised by default); some layers may be dense (`mlp_only_layers`)."""

from __future__ import annotations

from exq.models.olmoe import SoftmaxTopKAdapter


class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    family = "Qwen3-MoE"
    model_types = ("qwen3_moe",)
