"""The SGLang plugin: the `sglang.srt.plugins` entry point `exq` (exq's pyproject declares it).

SGLang calls `register` in every process it starts (launcher, scheduler workers of every TP / EP rank), before it
parses arguments or builds a model, so the quantization method `exq` exists wherever weights are loaded. Patching
SGLang from the launcher alone would never reach the spawned workers.
"""

from __future__ import annotations

import logging

from exq.integrations.versions import require_version

log = logging.getLogger(__name__)

SUPPORTED = ((0, 5, 20), (0, 6, 0))  # [low, high): the seams used here, checked against 0.5.23


def check_version(version: str) -> None:
    require_version("SGLang", version, SUPPORTED)


def register() -> None:
    """Add the quantization method `exq` to SGLang's registry and to its --quantization choices (idempotent)."""
    import sglang
    from sglang.srt.layers import quantization

    check_version(sglang.__version__)
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES
    from sglang.srt.server_args import add_quantization_method_choices

    from exq.integrations.sglang_method import ExqConfig

    quantization.QUANTIZATION_METHODS["exq"] = ExqConfig
    if hasattr(quantization, "CPU_QUANTIZATION_METHODS"):  # CPUs with AMX consult only this list
        quantization.CPU_QUANTIZATION_METHODS["exq"] = ExqConfig
    if "exq" not in QUANTIZATION_CHOICES:
        add_quantization_method_choices(["exq"])
    log.info("exq: registered quantization method 'exq' with SGLang %s", sglang.__version__)
