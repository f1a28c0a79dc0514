"""The vLLM plugin: the `vllm.general_plugins` entry point `exq` (exq's pyproject declares it).

vLLM calls general plugins in every process (the API server, the engine core, every worker), so `register` runs
wherever a model is built; it must be idempotent.
"""

from __future__ import annotations

from exq.integrations.versions import require_version

SUPPORTED = ((0, 33, 0), (0, 34, 0))  # [low, high): vLLM 0.33 introduced the MoE layer this plugin targets


def check_version(version: str) -> None:
    require_version("vLLM", version, SUPPORTED)


def register() -> None:
    """Register the quantization method `exq` with vLLM (once per process)."""
    import vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    check_version(vllm.__version__)
    if "exq" in QUANTIZATION_METHODS:
        return
    from exq.integrations.vllm_method import ExqVllmConfig

    register_quantization_config("exq")(ExqVllmConfig)
