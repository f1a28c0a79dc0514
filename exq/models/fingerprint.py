"""Identify a model, so a file measured on one model is never silently used with another.

The config hash covers the architecture; the router hash covers the routing weights, which differ between two
checkpoints of one architecture (a profile of a base model is wrong for its fine-tune).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from exq.errors import FormatError
from exq.models.base import MoELayer

# Runtime switches and bookkeeping that do not change the network.
_VOLATILE_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_router_logits",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "architectures",
}


def config_hash(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def router_hash(layers: list[MoELayer]) -> str:
    h = hashlib.sha256()
    for layer in layers:
        for t in layer.router_weights():
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _linears(module: nn.Module | None) -> list[list]:
    """[name, out, in] of every nn.Linear inside a module, in registration order."""
    if module is None:
        return []
    return [[n, m.out_features, m.in_features] for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def structure(model: nn.Module, layers: list[MoELayer]) -> dict:
    """Matrix shapes a precision plan is counted on: routed experts, shared experts, attention of every layer."""
    from exq.models.registry import adapter_for

    decoder = adapter_for(model.config).decoder_layers(model)
    return {
        "num_layers": len(decoder),
        "moe_layers": [
            {
                "layer_index": m.layer_index,
                "num_experts": m.num_experts,
                "top_k": m.top_k,
                "hidden_size": m.hidden_size,
                "intermediate_size": m.intermediate_size,
                "shared": _linears(m.shared_experts),
            }
            for m in layers
        ],
        "attention": [_linears(getattr(layer, "self_attn", None)) for layer in decoder],
    }


def fingerprint(model: nn.Module, layers: list[MoELayer]) -> dict:
    return {
        "structure": structure(model, layers),
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "config_sha256": config_hash(model.config),
        "router_sha256": router_hash(layers),
        "moe_layer_indices": [m.layer_index for m in layers],
        "num_experts": [m.num_experts for m in layers],
        "top_k": [m.top_k for m in layers],
    }


def check_same_model(expected: dict, actual: dict, what: str) -> None:
    """Raise a FormatError naming what differs when a file recorded on one model meets another."""
    diffs = [
        k
        for k in ("architecture", "model_type", "moe_layer_indices", "num_experts", "top_k")
        if expected.get(k) != actual.get(k)
    ]
    if diffs:
        detail = "; ".join(f"{k}: file {expected.get(k)!r} vs model {actual.get(k)!r}" for k in diffs)
        raise FormatError(f"{what} was made for another model ({detail})", "re-create it on this model")
    if expected.get("config_sha256") != actual.get("config_sha256"):
        raise FormatError(f"{what} was made for a model with another config", "re-create it on this model")
    if expected.get("router_sha256") != actual.get("router_sha256"):
        raise FormatError(
            f"{what} was made for a model with other router weights (same architecture, different checkpoint)",
            "re-create it on this model",
        )
