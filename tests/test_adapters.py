"""Adapters against the models themselves: layer discovery, selection rules and weight views."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_configs, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PhimoeConfig

from exq.errors import ExqError
from exq.models import adapter_for, load_model, moe_layers
from exq.models.base import MoELayer
from exq.models.routing import RoutingRule

FAMILIES = sorted(tiny_configs())
EXPECTED_LAYERS = {  # decoder-layer indices that hold routed experts
    "olmoe": [0, 1, 2],
    "qwen2_moe": [0, 2],  # layer 1 is in mlp_only_layers
    "qwen2_moe_h128": [0, 1],
    "qwen3_moe": [0, 1, 2],
    "mixtral": [0, 1],
    "deepseek_v2": [1, 2],  # first_k_dense_replace=1
    "deepseek_v2_greedy": [0, 1],
    "deepseek_v3": [1, 2],
    "deepseek_v3_h128": [1, 2],
}
HAS_SHARED = {"qwen2_moe", "qwen2_moe_h128", "deepseek_v2", "deepseek_v2_greedy", "deepseek_v3", "deepseek_v3_h128"}


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_found_and_dense_layers_skipped(family):
    model = tiny_model(family)
    layers = moe_layers(model)
    assert [m.layer_index for m in layers] == EXPECTED_LAYERS[family]
    assert [m.index for m in layers] == list(range(len(layers)))
    for m in layers:
        assert (m.shared_experts is not None) == (family in HAS_SHARED)
        assert (m.shared_gate is not None) == family.startswith("qwen2_moe")
        assert m.num_experts == m.experts.gate_up_proj.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_rule_reproduces_the_router(family):
    """exq's own statement of the rule picks the same experts with the same weights as the router module."""
    model = tiny_model(family, seed=1)
    torch.manual_seed(2)
    for m in moe_layers(model):
        x = torch.randn(257, m.hidden_size)
        logits, weights, ids = m.router(x)
        ref_w, ref_ids = m.rule.select(logits, m.correction_bias)
        order, ref_order = ids.sort(dim=-1), ref_ids.sort(dim=-1)
        assert torch.equal(order.values, ref_order.values)
        torch.testing.assert_close(
            weights.gather(1, order.indices).float(), ref_w.gather(1, ref_order.indices).float(), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_views_compute_each_expert(family):
    """gate/up/down views, used as a plain SwiGLU MLP, equal the model's own experts module routed to one expert."""
    model = tiny_model(family, seed=3)
    torch.manual_seed(4)
    for m in moe_layers(model):
        x = torch.randn(5, m.hidden_size)
        for e in range(m.num_experts):
            w = m.expert_weights(e)
            assert w["gate"].shape == w["up"].shape == (m.intermediate_size, m.hidden_size)
            assert w["down"].shape == (m.hidden_size, m.intermediate_size)
            assert w["gate"].data_ptr() != w["up"].data_ptr()
            assert w["gate"].untyped_storage().data_ptr() == m.experts.gate_up_proj.untyped_storage().data_ptr()
            ours = (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
            theirs = m.experts(x, torch.full((5, 1), e), torch.ones(5, 1))
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


class _FakeExperts(nn.Module):
    def __init__(self, transposed: bool, concatenated: bool, e: int = 3, h: int = 8, i: int = 4) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.gate = torch.randn(e, i, h)
        self.up = torch.randn(e, i, h)
        self.down = torch.randn(e, h, i)
        gu = torch.cat([self.gate, self.up], 1) if concatenated else torch.stack([self.gate, self.up], 2).flatten(1, 2)
        self.gate_up_proj = nn.Parameter(gu.transpose(1, 2).contiguous() if transposed else gu)
        self.down_proj = nn.Parameter(self.down.transpose(1, 2).contiguous() if transposed else self.down)
        self.is_transposed, self.is_concatenated = transposed, concatenated


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("concatenated", [True, False])
def test_views_handle_transposed_and_interleaved_layouts(transposed, concatenated):
    ex = _FakeExperts(transposed, concatenated)
    layer = MoELayer(
        0,
        0,
        nn.Module(),
        nn.Module(),
        ex,
        RoutingRule(num_experts=3, top_k=1),
        _transposed=transposed,
        _interleaved=not concatenated,
    )
    for e in range(3):
        assert torch.equal(layer.gate_proj(e), ex.gate[e])
        assert torch.equal(layer.up_proj(e), ex.up[e])
        assert torch.equal(layer.down_proj(e), ex.down[e])


def test_dense_model_is_refused_with_clear_error():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ExqError, match="dense model with no Mixture-of-Experts layers"):
        adapter_for(cfg)


def test_unsupported_moe_names_the_supported_ones():
    cfg = PhimoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ExqError, match="unsupported MoE architecture") as info:
        adapter_for(cfg)
    for name in ("OLMoE", "Qwen2-MoE", "Qwen3-MoE", "Mixtral", "DeepSeek-V2", "DeepSeek-V3"):
        assert name in str(info.value)


def test_all_layers_dense_is_refused():
    cfg = tiny_configs()["qwen3_moe"]
    cfg.mlp_only_layers = [0, 1, 2]
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ExqError, match="no MoE layers"):
        moe_layers(model)


def test_fixture_models_load_with_expected_structure(real_model_path):
    model = load_model(real_model_path, device="cpu")
    layers = moe_layers(model)
    cfg = model.config
    assert len(layers) == cfg.num_hidden_layers
    k = cfg.num_experts_per_tok
    assert all(m.top_k == k for m in layers)
    assert all(m.rule.norm_topk_prob == bool(cfg.norm_topk_prob) for m in layers)
    h, i = cfg.hidden_size, getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    assert layers[0].gate_proj(0).shape == (i, h) and layers[0].down_proj(0).shape == (h, i)
