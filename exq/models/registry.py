"""Which adapter handles a model, decided from its config before any weights are loaded."""

from __future__ import annotations

from torch import nn

from exq.errors import ExqError
from exq.models.base import Adapter, MoELayer
from exq.models.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from exq.models.mixtral import MixtralAdapter
from exq.models.olmoe import OlmoeAdapter
from exq.models.qwen2_moe import Qwen2MoeAdapter
from exq.models.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: tuple[Adapter, ...] = (
    OlmoeAdapter(),
    Qwen2MoeAdapter(),
    Qwen3MoeAdapter(),
    MixtralAdapter(),
    DeepseekV2Adapter(),
    DeepseekV3Adapter(),
)
_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}
_MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")


def supported_architectures() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    if not any(getattr(config, k, None) for k in _MOE_CONFIG_KEYS):
        raise ExqError(
            f"{arch} (model_type {model_type!r}) is a dense model with no Mixture-of-Experts layers; exq works on MoE "
            f"models",
            f"supported architectures: {supported_architectures()}",
        )
    raise ExqError(
        f"unsupported MoE architecture {arch} (model_type {model_type!r})",
        f"supported architectures: {supported_architectures()}",
    )


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every routed-expert block of a loaded transformers model, in forward order."""
    layers = adapter_for(model.config).moe_layers(model)
    if not layers:
        raise ExqError(
            f"{type(model).__name__} has no MoE layers with fused experts (mlp.experts.gate_up_proj); every layer is "
            "dense",
            "check mlp_only_layers / first_k_dense_replace in its config, or that transformers is >= 5.0",
        )
    return layers
