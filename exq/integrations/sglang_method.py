"""exq's quantization method for SGLang: the config class SGLang picks from a checkpoint's quant_method "exq", and
the FusedMoE method that holds a layer's per-format slabs and runs exq's fused kernel.

Loading works through SGLang's ordinary loader: the slabs are registered as parameters named exactly like the
checkpoint's tensors (`...mlp.experts.gate_up.slabs.int4.codes`), so each model's `load_weights` hands them to the
parameter's own `weight_loader`, which keeps this rank's experts (expert parallel) and its slice of the intermediate
dimension (tensor parallel). Non-MoE linear layers use SGLang's unquantized method.
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
from exq.integrations.shards import local_layout, shard_loader


class ExqConfig(QuantizationConfig):
    def __init__(self, qc: dict) -> None:
        super().__init__()
        from exq.kernels.configs import KERNEL_FORMATS
        from exq.quant.checkpoint import check_quantization_config

        check_quantization_config(qc, "the model's quantization_config")
        no_kernel = sorted(set(qc.get("formats", {})) - set(KERNEL_FORMATS))
        if no_kernel:
            raise ExqError(
                f"this exq checkpoint uses {', '.join(no_kernel)}, which exq's fused kernels do not run",
                f"compile the plan with --formats {','.join(KERNEL_FORMATS)} for SGLang",
            )
        if qc.get("linears"):
            raise ExqError(
                "this exq checkpoint quantizes attention or shared-expert linears, which the SGLang plugin does "
                "not run yet",
                "compile the plan without --include-attention / --include-shared for SGLang",
            )
        self.qc = qc
        self.experts = {e["module"]: e for e in qc["experts"]}

    def get_name(self) -> str:
        return "exq"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ExqConfig:
        return cls({k: v for k, v in config.items() if k not in ("packed_modules_mapping", "hf_config")})

    def get_scaled_act_names(self) -> list[str]:
        return []

    def spec_for(self, prefix: str) -> dict:
        """The checkpoint's record of the experts module at `prefix` (SGLang and transformers share module names
        for the supported families; Mixtral's `block_sparse_moe` is matched by layer index)."""
        if prefix in self.experts:
            return self.experts[prefix]
        layer = next((p for p in prefix.split(".") if p.isdigit()), None)
        same = [s for s in self.experts.values() if layer is not None and f".{layer}." in f".{s['module']}."]
        if len(same) == 1:
            return same[0]
        raise ExqError(f"the exq checkpoint has no experts module for {prefix}", "was it quantized from this model?")

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
        from exq.runtime.experts import QuantizedBlock

        spec = self.spec
        if hidden_size != spec["hidden_size"]:
            raise ExqError(f"{spec['module']}: hidden size {hidden_size}, the checkpoint has {spec['hidden_size']}")
        ep_rank, ep_size = int(getattr(layer, "moe_ep_rank", 0)), int(getattr(layer, "moe_ep_size", 1))
        tp_rank, tp_size = int(getattr(layer, "moe_tp_rank", 0)), int(getattr(layer, "moe_tp_size", 1))
        if num_experts * ep_size != spec["num_experts"]:
            raise ExqError(
                f"{spec['module']}: {num_experts} local experts x {ep_size} ranks != {spec['num_experts']} experts"
            )
        inter, part = spec["intermediate_size"], intermediate_size_per_partition
        if part * tp_size != inter or part % 128:
            raise ExqError(
                f"{spec['module']}: intermediate size {inter} split {tp_size} ways gives {part} per rank",
                "exq's kernels need a multiple of 128 per rank: use a smaller tensor-parallel size for the experts",
            )
        local = range(ep_rank * num_experts, (ep_rank + 1) * num_experts)
        shapes = {"gate_up": (2 * part, hidden_size), "down": (hidden_size, part)}
        for name in ("gate_up", "down"):
            layout, kept = local_layout(spec[name], local)
            block = QuantizedBlock(layout, *shapes[name])  # on SGLang's default device
            for key, slab in block.slabs.items():
                for tensor_name, buf in list(slab.named_buffers(recurse=False)):
                    delattr(slab, tensor_name)
                    param = nn.Parameter(buf, requires_grad=False)
                    loader = shard_loader(name, tensor_name, slab.fmt, kept[key], inter, part, tp_rank)
                    set_weight_attrs(param, {"weight_loader": loader})
                    slab.register_parameter(tensor_name, param)
            setattr(layer, name, block)
        layer.exq_kernel_plan = spec.get("kernels") or {}

    def create_moe_runner(self, layer: nn.Module, moe_runner_config) -> None:
        activation = getattr(moe_runner_config, "activation", "silu")
        if activation != "silu":
            raise ExqError(f"{self.spec['module']}: activation {activation!r}", "exq's kernels run silu experts")
        self.moe_runner_config = moe_runner_config
        self.runner = None  # exq's own kernel consumes the standard top-k output directly

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from exq.kernels.moe_op import kernel_block

        missing = [
            f"{b}.slabs.{k}.{n}"
            for b in ("gate_up", "down")
            for k, slab in getattr(layer, b).slabs.items()
            for n, p in slab.named_parameters(recurse=False)
            if not getattr(p, "exq_loaded", False)
        ]
        if missing:
            raise ExqError(
                f"{self.spec['module']}: {len(missing)} exq tensors were not in the checkpoint (e.g. {missing[0]})",
                "the checkpoint is incomplete; re-create it with `exq quantize`",
            )
        layer.exq_blocks = (kernel_block(layer.gate_up), kernel_block(layer.down))

    def apply(self, layer: nn.Module, dispatch_output) -> StandardCombineInput:
        from exq.kernels import fused_moe
        from exq.runtime.experts import planned_config

        x, topk = dispatch_output.hidden_states, dispatch_output.topk_output
        cfg = planned_config(layer.exq_kernel_plan, x.shape[0], x.device)
        out = fused_moe(x, topk.topk_weights, topk.topk_ids, layer.exq_blocks, config=cfg, expert_parallel=True)
        return StandardCombineInput(hidden_states=out)
