"""exq's quantization method for SGLang: the config class SGLang picks from a checkpoint's quant_method "exq", and
the FusedMoE method that holds a layer's per-format slabs and runs exq's fused kernel.

Loading works through SGLang's ordinary loader: the slabs are parameters named exactly like the checkpoint's tensors
(`...mlp.experts.gate_up.slabs.int4.codes`), so each model's `load_weights` hands them to the parameter's own
`weight_loader`, which keeps this rank's experts (expert parallel) and its slice of the intermediate dimension
(tensor parallel). Non-MoE linear layers use SGLang's unquantized method.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase, QuantizationConfig
from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
from sglang.srt.utils import set_weight_attrs
from torch import nn

from exq.errors import ExqError
from exq.integrations.common import ExqConfigMixin, add_slabs, finish_loading, run_experts


class ExqConfig(ExqConfigMixin, QuantizationConfig):
    def __init__(self, qc: dict) -> None:
        super().__init__()
        self._read(qc)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExqConfig:
        return cls({k: v for k, v in config.items() if k not in ("packed_modules_mapping", "hf_config")})

    def get_scaled_act_names(self) -> list[str]:
        return []

    def get_quant_method(self, layer: nn.Module, prefix: str):
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        if isinstance(layer, FusedMoE):
            return ExqMoEMethod(self.spec_for(prefix))
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None


class ExqMoEMethod(FusedMoEMethodBase):
    def __init__(self, spec: dict) -> None:
        super().__init__()
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
        ep = (int(getattr(layer, "moe_ep_rank", 0)), int(getattr(layer, "moe_ep_size", 1)))
        tp = (int(getattr(layer, "moe_tp_rank", 0)), int(getattr(layer, "moe_tp_size", 1)))
        add_slabs(layer, self.spec, num_experts, hidden_size, intermediate_size_per_partition, ep, tp, set_weight_attrs)

    def create_moe_runner(self, layer: nn.Module, moe_runner_config) -> None:
        activation = getattr(moe_runner_config, "activation", "silu")
        if activation != "silu":
            raise ExqError(f"{self.spec['module']}: activation {activation!r}", "exq's kernels run silu experts")
        self.moe_runner_config = moe_runner_config
        self.runner = None  # exq's own kernel consumes the standard top-k output directly

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        finish_loading(layer, self.spec["module"])

    def apply(self, layer: nn.Module, dispatch_output) -> StandardCombineInput:
        # SGLang's standard dispatcher has already mapped ids to this rank's experts (-1 elsewhere)
        topk = dispatch_output.topk_output
        out = run_experts(layer, dispatch_output.hidden_states, topk.topk_weights, topk.topk_ids)
        return StandardCombineInput(hidden_states=out)
