"""exq's quantization method for vLLM (0.33's MoE layer: FusedMoEFactory -> MoERunner -> RoutedExperts).

The slabs are parameters of the RoutedExperts module; vLLM's loader hands every tensor under `...mlp.experts.` to
`RoutedExperts.load_weights`, which matches only per-expert w1/w2/w3 names, so create_weights wraps that method on
the instance: exq's slab names are loaded by their own weight_loaders (this rank's experts and intermediate slice),
everything else goes on to vLLM's. Non-MoE linear layers use vLLM's unquantized method.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from exq.errors import ExqError
from exq.integrations.common import SLAB_BLOCKS, ExqConfigMixin, add_slabs, finish_loading, run_experts


class ExqVllmConfig(ExqConfigMixin, QuantizationConfig):
    def __init__(self, qc: dict) -> None:
        super().__init__()
        self._read(qc)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExqVllmConfig:
        return cls(dict(config))

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):  # it sits at <experts module>.routed_experts
            return ExqVllmMoEMethod(layer.moe_config, self.spec_for(prefix.removesuffix(".routed_experts")))
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None


class ExqVllmMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe, spec: dict) -> None:
        super().__init__(moe)
        self.spec = spec

    def create_weights(
        self,
        layer: nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        pc = self.moe.moe_parallel_config
        ep, tp = (pc.ep_rank, pc.ep_size), (pc.tp_rank, pc.tp_size)
        add_slabs(layer, self.spec, num_experts, hidden_size, intermediate_size_per_partition, ep, tp, set_weight_attrs)
        vllm_load = layer.load_weights

        def load_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[str]:
            rest = []
            for name, tensor in weights:
                if name.split(".", 1)[0] in SLAB_BLOCKS and ".slabs." in name:
                    param = layer.get_parameter(name)
                    param.weight_loader(param, tensor)
                    yield name
                else:
                    rest.append((name, tensor))
            if rest:
                yield from vllm_load(rest)

        layer.load_weights = load_weights

    def get_fused_moe_quant_config(self, layer: nn.Module):
        return None  # exq's kernel is not one of vLLM's modular kernels

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        finish_loading(layer, self.spec["module"])

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        if shared_experts is not None:
            raise ExqError(
                f"{self.spec['module']}: vLLM fuses shared experts into the MoE call here, which exq's plugin does "
                "not run yet",
                "serve this model with exq serve or SGLang",
            )
        ids = topk_ids if layer.expert_map is None else layer.expert_map[topk_ids.long()]  # global -> local, -1
        return run_experts(layer, x, topk_weights, ids)
