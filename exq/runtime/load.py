"""`exq.load(DIR)`: an exq checkpoint -> a working transformers model running exq's runtime modules.

The model skeleton is built on the meta device (no memory for the original experts), the experts and allocated linears
are swapped for exq modules, then every tensor is loaded from the checkpoint; buffers that are computed rather than
stored (rotary frequencies) are recomputed, tied weights re-tied. Anything left unloaded is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from exq.errors import ExqError
from exq.formats import FORMATS
from exq.models.loading import resolve_device
from exq.quant.checkpoint import BASE_FILE, QUANTIZED_FILE, read_quantization_config
from exq.runtime.experts import QuantizedBlock, QuantizedExperts, QuantizedLinear

log = logging.getLogger(__name__)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _computed_buffers(model: nn.Module) -> dict[str, list[str]]:
    """module name -> its non-persistent buffers (never saved: computed from the config at construction)."""
    return {
        n: sorted(m._non_persistent_buffers_set)
        for n, m in model.named_modules()
        if getattr(m, "_non_persistent_buffers_set", None) and not isinstance(m, QuantizedBlock)
    }


def _recompute_buffers(model: nn.Module, buffers: dict[str, list[str]], device: torch.device) -> None:
    """Rebuild computed buffers by constructing their module afresh from the config."""
    for name, missing in buffers.items():
        module = model.get_submodule(name)
        try:
            fresh = type(module)(model.config)  # built on the CPU, moved below (a device argument is deprecated)
        except Exception as e:
            raise ExqError(f"cannot rebuild the computed buffers of {name} ({type(module).__name__}): {e}") from e
        for b in missing:
            setattr(module, b, getattr(fresh, b).to(device))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ExqError(f"cannot read {path}: {e}", "the checkpoint is corrupt or truncated; re-quantize it") from e


def load(
    path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    kernels: str = "auto",
    kernel_tables: list[str | Path] | tuple = (),
) -> nn.Module:
    """Load an exq checkpoint folder written by `exq quantize` as a transformers causal LM in eval mode.

    kernels: "auto" runs each MoE layer through the fused Triton op on a GPU (when its formats have kernels and
    Triton is installed) and through the torch reference path otherwise; "off" always uses the reference path.
    kernel_tables: kernel tables measured since the checkpoint was written (`exq bench kernels --table`); pass D
    plans the layers' configs again from the checkpoint's plan with them, so no re-quantization is needed."""
    if kernels not in ("auto", "off"):
        raise ExqError(f"kernels={kernels!r}", "use 'auto' or 'off'")
    from transformers import AutoConfig

    path = Path(path)
    _, qc = read_quantization_config(path)
    replanned = _replanned(path, kernel_tables) if kernel_tables else None  # a bad table fails before any loading
    config = AutoConfig.from_pretrained(path)
    state = _load_tensors(path / BASE_FILE) | _load_tensors(path / QUANTIZED_FILE)
    model = assemble(config, qc, state, device, dtype, where=str(path))
    for m in model.modules():
        if isinstance(m, QuantizedExperts):
            m.kernels = kernels
    if replanned is not None:
        for spec in qc["experts"]:
            experts = model.get_submodule(spec["module"])
            experts.kernel_plan = {gpu: layers[spec["moe_layer"]] for gpu, layers in replanned.items()}
    log.info("loaded exq checkpoint %s", path)
    return model


def _replanned(path: Path, tables: list[str | Path] | tuple) -> dict:
    """Pass D's configs per GPU and MoE layer, from the checkpoint's own plan and these tables merged into the
    shipped ones."""
    from exq.compiler import Artifact
    from exq.compiler.specialize import specialize
    from exq.kernels.tuning import kernel_tables
    from exq.quant.checkpoint import PLAN_FILE

    art = Artifact.load(path / PLAN_FILE)
    return specialize(art.model["structure"], art.experts, art.routing, kernel_tables(tables))


def assemble(
    config, qc: dict, state: dict[str, torch.Tensor], device=None, dtype: torch.dtype | None = None, where: str = ""
) -> nn.Module:
    """Build the model of `config` with exq modules as `qc` describes them, holding the tensors of `state`."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.quantization_config = qc
    for spec in qc["experts"]:
        old = model.get_submodule(spec["module"])
        act = getattr(old, "act_fn", None)
        if act is None:
            raise ExqError(f"{spec['module']} is not an experts module of this architecture; the checkpoint is corrupt")
        layout = {"gate_up": spec["gate_up"], "down": spec["down"]}
        experts = QuantizedExperts(
            spec["num_experts"], spec["hidden_size"], spec["intermediate_size"], act, layout, dtype, device="meta"
        )
        experts.kernel_plan = spec.get("kernels") or {}
        _set_module(model, spec["module"], experts)
    for spec in qc["linears"]:
        lin = QuantizedLinear(
            FORMATS[spec["format"]], spec["out_features"], spec["in_features"], spec["bias"], device="meta"
        )
        _set_module(model, spec["module"], lin)
    computed = _computed_buffers(model)
    model.to_empty(device=dev)
    for block in model.modules():
        if isinstance(block, QuantizedBlock):
            block.reset_positions()
    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ExqError(
            f"checkpoint {where} does not fit its config: "
            + (f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else ""),
            "re-create it with `exq quantize`",
        )
    current = model.state_dict()
    for k, v in state.items():
        if current[k].shape != v.shape:
            raise ExqError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, expected {tuple(current[k].shape)}")
    model.load_state_dict(state, strict=False)
    for block in model.modules():
        if isinstance(block, QuantizedBlock):
            block.store_in_id_order()
    if tied:
        model.tie_weights()
    _recompute_buffers(model, computed, dev)
    return model.eval().requires_grad_(False)
