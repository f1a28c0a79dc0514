"""Model adapters: one module per MoE family behind one interface (`moe_layers`)."""

from exq.models.base import Adapter, MoELayer
from exq.models.fingerprint import check_same_model, fingerprint
from exq.models.loading import load_config, load_model, load_tokenizer, resolve_device
from exq.models.registry import ADAPTERS, adapter_for, moe_layers, supported_architectures
from exq.models.routing import RoutingRule

__all__ = [
    "ADAPTERS",
    "Adapter",
    "MoELayer",
    "RoutingRule",
    "adapter_for",
    "check_same_model",
    "fingerprint",
    "load_config",
    "load_model",
    "load_tokenizer",
    "moe_layers",
    "resolve_device",
    "supported_architectures",
]
