"""What the SGLang and vLLM plugins share: reading the checkpoint's quantization_config, holding one rank's slabs on
an engine's MoE layer, and running exq's fused kernel on them. Engine-specific code only adapts signatures."""

from __future__ import annotations

import torch
from torch import nn

from exq.errors import ExqError
from exq.integrations.shards import local_layout, shard_loader

SLAB_BLOCKS = ("gate_up", "down")


def expert_specs(qc: dict) -> dict[str, dict]:
    """module name -> the checkpoint's record of that experts module, after checking the config can be served."""
    from exq.kernels.configs import KERNEL_FORMATS
    from exq.quant.checkpoint import check_quantization_config

    check_quantization_config(qc, "the model's quantization_config")
    no_kernel = sorted(set(qc.get("formats", {})) - set(KERNEL_FORMATS))
    if no_kernel:
        raise ExqError(
            f"this exq checkpoint uses {', '.join(no_kernel)}, which exq's fused kernels do not run",
            f"compile the plan with --formats {','.join(KERNEL_FORMATS)} to serve it with an engine",
        )
    if qc.get("linears"):
        raise ExqError(
            "this exq checkpoint quantizes attention or shared-expert linears, which the engine plugins do not run yet",
            "compile the plan without --include-attention / --include-shared",
        )
    return {e["module"]: e for e in qc["experts"]}


class ExqConfigMixin:
    """The methods SGLang's and vLLM's QuantizationConfig both ask for, the same for exq on either (listed first in
    the engine config's bases)."""

    def _read(self, qc: dict) -> None:
        self.experts = expert_specs(qc)
        self.qc = qc

    def get_name(self) -> str:
        return "exq"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the settings are the checkpoint's config.json quantization_config

    def spec_for(self, prefix: str) -> dict:
        return spec_for(self.experts, prefix)


def spec_for(specs: dict[str, dict], prefix: str) -> dict:
    """The record for an engine module name (engines name MoE modules like transformers for the supported families;
    otherwise matched by layer index)."""
    if prefix in specs:
        return specs[prefix]
    layer = next((p for p in prefix.split(".") if p.isdigit()), None)
    same = [s for s in specs.values() if layer is not None and f".{layer}." in f".{s['module']}."]
    if len(same) == 1:
        return same[0]
    raise ExqError(f"the exq checkpoint has no experts module for {prefix}", "was it quantized from this model?")


def add_slabs(
    layer: nn.Module,
    spec: dict,
    num_local: int,
    hidden: int,
    part: int,
    ep: tuple[int, int],
    tp: tuple[int, int],
    set_attrs=None,
) -> None:
    """Register this rank's slabs on `layer` as parameters named like the checkpoint's tensors (`gate_up.slabs.int4
    .codes`), each with a weight_loader taking the whole checkpoint tensor."""
    from exq.runtime.experts import QuantizedBlock

    (ep_rank, ep_size), (tp_rank, tp_size) = ep, tp
    where = spec["module"]
    if hidden != spec["hidden_size"]:
        raise ExqError(f"{where}: hidden size {hidden}, the checkpoint has {spec['hidden_size']}")
    if num_local * ep_size != spec["num_experts"]:
        raise ExqError(f"{where}: {num_local} local experts x {ep_size} ranks != {spec['num_experts']} experts")
    inter = spec["intermediate_size"]
    if part * tp_size != inter or part % 128:
        raise ExqError(
            f"{where}: intermediate size {inter} split {tp_size} ways gives {part} per rank",
            "exq's kernels need a multiple of 128 per rank: use a smaller tensor-parallel size for the experts",
        )
    local = range(ep_rank * num_local, (ep_rank + 1) * num_local)
    shapes = {"gate_up": (2 * part, hidden), "down": (hidden, part)}
    for name in SLAB_BLOCKS:
        layout, kept = local_layout(spec[name], local)
        block = QuantizedBlock(layout, *shapes[name])  # on the engine's default device
        for key, slab in block.slabs.items():
            for tensor_name, buf in list(slab.named_buffers(recurse=False)):
                delattr(slab, tensor_name)
                param = nn.Parameter(buf, requires_grad=False)
                loader = shard_loader(name, tensor_name, slab.fmt, kept[key], inter, part, tp_rank)
                if set_attrs is not None:
                    set_attrs(param, {"weight_loader": loader})
                else:
                    param.weight_loader = loader
                slab.register_parameter(tensor_name, param)
        setattr(layer, name, block)
    layer.exq_kernel_plan = spec.get("kernels") or {}


def finish_loading(layer: nn.Module, where: str) -> None:
    """Every slab must have been loaded (engines skip or mis-route unknown names), then the kernel's views."""
    from exq.kernels.moe_op import kernel_block

    missing = [
        f"{b}.slabs.{k}.{n}"
        for b in SLAB_BLOCKS
        for k, slab in getattr(layer, b).slabs.items()
        for n, p in slab.named_parameters(recurse=False)
        if not getattr(p, "exq_loaded", False)
    ]
    if missing:
        raise ExqError(
            f"{where}: {len(missing)} exq tensors were not in the checkpoint (e.g. {missing[0]})",
            "the checkpoint is incomplete; re-create it with `exq quantize`",
        )
    for b in SLAB_BLOCKS:
        getattr(layer, b).store_in_id_order()
    layer.exq_blocks = (kernel_block(layer.gate_up), kernel_block(layer.down))


def run_experts(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
    """exq's fused op on the rank's experts; ids outside [0, local experts) (other ranks') contribute nothing."""
    from exq.kernels import fused_moe
    from exq.runtime.experts import planned_config

    cfg = planned_config(layer.exq_kernel_plan, x.shape[0], x.device)
    return fused_moe(x, weights, local_ids, layer.exq_blocks, config=cfg, expert_parallel=True)
