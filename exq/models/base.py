"""One interface over the MoE layers of every supported transformers (v5) model family.

Each family module only says what differs: which router attributes make up its selection rule, and where its shared
experts live. Finding layers, reading fused expert weights and unpacking router outputs is common to all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from exq.errors import ExqError
from exq.models.routing import RoutingRule


@dataclass
class MoELayer:
    """A routed-expert block of one decoder layer, with views (not copies) of its weights."""

    index: int  # position among the model's MoE layers (0..L-1)
    layer_index: int  # position among all decoder layers (dense layers included)
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    rule: RoutingRule
    shared_experts: nn.Module | None = None
    shared_gate: nn.Module | None = None  # Qwen2-MoE style sigmoid gate on the shared expert's output
    _transposed: bool = field(default=False, repr=False)
    _interleaved: bool = field(default=False, repr=False)

    @property
    def num_experts(self) -> int:
        return self.rule.num_experts

    @property
    def top_k(self) -> int:
        return self.rule.top_k

    @property
    def hidden_size(self) -> int:
        return self.down_proj(0).shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down_proj(0).shape[1]

    @property
    def correction_bias(self) -> torch.Tensor | None:
        return getattr(self.router, "e_score_correction_bias", None) if self.rule.correction_bias else None

    def _gate_up(self, e: int) -> torch.Tensor:
        w = self.experts.gate_up_proj[e]
        return w.t() if self._transposed else w  # -> [2I, H]

    def gate_proj(self, e: int) -> torch.Tensor:
        """Expert e's gate projection, [I, H] (out, in), a view of the fused parameter."""
        w = self._gate_up(e)
        return w[0::2] if self._interleaved else w[: w.shape[0] // 2]

    def up_proj(self, e: int) -> torch.Tensor:
        """Expert e's up projection, [I, H], a view of the fused parameter."""
        w = self._gate_up(e)
        return w[1::2] if self._interleaved else w[w.shape[0] // 2 :]

    def down_proj(self, e: int) -> torch.Tensor:
        """Expert e's down projection, [H, I], a view of the fused parameter."""
        w = self.experts.down_proj[e]
        return w.t() if self._transposed else w

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        return {"gate": self.gate_proj(e), "up": self.up_proj(e), "down": self.down_proj(e)}

    def router_weights(self) -> list[torch.Tensor]:
        """Every tensor that decides routing; their bytes identify the model in profile fingerprints."""
        tensors = [self.router.weight]
        if getattr(self.router, "bias", None) is not None:
            tensors.append(self.router.bias)
        if self.correction_bias is not None:
            tensors.append(self.correction_bias)
        return tensors

    def describe(self) -> str:
        shared = ", shared expert" + (" (gated)" if self.shared_gate is not None else "") if self.shared_experts else ""
        return (
            f"layer {self.layer_index}: {self.num_experts} experts x [H={self.hidden_size}, I={self.intermediate_size}]"
            f", {self.rule.describe()}{shared}"
        )


class Adapter(ABC):
    """Base for a model family. Subclasses set `family`, `model_types` and implement `rule`."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    router_attr = "gate"
    experts_attr = "experts"

    @abstractmethod
    def rule(self, router: nn.Module, config) -> RoutingRule:
        """The family's selection rule, read from the router's own attributes (config as fallback)."""

    def shared(self, block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        return None, None

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ExqError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
        return layers

    def is_moe_block(self, block: nn.Module) -> bool:
        experts = getattr(block, self.experts_attr, None)
        return (
            isinstance(getattr(block, self.router_attr, None), nn.Module)
            and experts is not None
            and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
            and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
        )

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        out: list[MoELayer] = []
        for layer_index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, "mlp", None)
            if block is None or not self.is_moe_block(block):
                continue
            experts = getattr(block, self.experts_attr)
            if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
                raise ExqError(
                    f"{self.family} layer {layer_index}: experts with biases or without a gate projection are not "
                    "supported yet"
                )
            router = getattr(block, self.router_attr)
            shared, shared_gate = self.shared(block)
            out.append(
                MoELayer(
                    index=len(out),
                    layer_index=layer_index,
                    block=block,
                    router=router,
                    experts=experts,
                    rule=self.rule(router, model.config),
                    shared_experts=shared,
                    shared_gate=shared_gate,
                    _transposed=bool(getattr(experts, "is_transposed", False)),
                    _interleaved=not getattr(experts, "is_concatenated", True),
                )
            )
        return out

    @staticmethod
    def unpack_router_output(output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """transformers v5 routers return (logits, weights, indices)."""
        if not (isinstance(output, tuple) and len(output) == 3):
            raise ExqError(
                f"router returned {type(output).__name__}, expected the transformers v5 (logits, weights, indices) "
                "tuple; upgrade transformers to >= 5.0"
            )
        return output
