"""Apply a compiled plan to a model: quantize every allocated unit in its format with the chosen quantizer.

The result is a set of runtime tensors keyed like the quantized model's state dict (slabs in layout order), which the
checkpoint writer saves as is, and from which `fake_quantize` puts the dequantized weights back into the original
model for evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from exq.compiler.artifact import Artifact
from exq.errors import ExqError
from exq.formats import FORMATS, Format
from exq.models import MoELayer, moe_layers
from exq.quant.calibrate import LayerStats
from exq.quant.codec import Quantized, pack, quantize_rtn
from exq.quant.quantizers import QUANTIZERS, quantize_clip, quantize_gptq
from exq.runtime.experts import BLOCKS, slab_key

log = logging.getLogger(__name__)


def block_weights(m: MoELayer, block: str, experts: list[int] | None = None) -> torch.Tensor:
    """[n, out, in] float32 copies of a block's weights (gate_up = gate rows then up rows), canonical layout."""
    ids = range(m.num_experts) if experts is None else experts
    if block == "gate_up":
        return torch.stack([torch.cat([m.gate_proj(e), m.up_proj(e)]) for e in ids]).float()
    return torch.stack([m.down_proj(e) for e in ids]).float()


def write_block(m: MoELayer, block: str, w: torch.Tensor) -> None:
    """Put [E, out, in] weights (canonical gate_up = gate rows then up rows) into the model's expert parameters."""
    with torch.no_grad():
        for e in range(m.num_experts):
            if block == "gate_up":
                m.gate_proj(e).copy_(w[e, : m.intermediate_size])
                m.up_proj(e).copy_(w[e, m.intermediate_size :])
            else:
                m.down_proj(e).copy_(w[e])


def quantize_stack(
    fmt: Format, w: torch.Tensor, quantizer: str, hessian: torch.Tensor | None = None, act_order: bool = True
) -> Quantized:
    """Quantize [n, out, in] with `quantizer`; int8 always rounds to nearest (per-row int8 is near lossless)."""
    if quantizer not in QUANTIZERS:
        raise ExqError(f"unknown quantizer {quantizer!r}", f"use one of {', '.join(QUANTIZERS)}")
    if fmt.bits == 8 or quantizer == "rtn":
        return quantize_rtn(fmt, w)
    if quantizer == "clip":
        d = None if hessian is None else torch.diagonal(hessian, dim1=-2, dim2=-1)
        return quantize_clip(fmt, w, d)
    if hessian is None:
        raise ExqError("GPTQ needs calibration statistics", "pass calibration text (--corpus) or use --quantizer clip")
    return quantize_gptq(fmt, w, hessian, act_order=act_order)


def slab_tensors(q: Quantized) -> dict[str, torch.Tensor]:
    out = {"codes": pack(q.codes, q.fmt.bits), "scales": q.scales}
    if q.zeros is not None:
        out["zeros"] = q.zeros
    return out


def quantize_experts(
    model: nn.Module,
    artifact: Artifact,
    stats: list[LayerStats] | None,
    quantizer: str = "gptq",
    progress: bool = True,
    on_block: Callable[[int, str, list[int], torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """State-dict tensors of the quantized experts: `{prefix}.experts.{block}.slabs.{fmt}.{codes|scales|zeros|weight}`.

    on_block(layer, block, experts, dequantized [n, out, in]) sees every quantized slab (for fake quantization).
    """
    layers = moe_layers(model)
    names = {id(mod): n for n, mod in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    jobs = [(m, b) for m in layers for b in BLOCKS]
    for m, block in tqdm(jobs, desc="quantize", unit="block", disable=not progress):
        plan, lay = artifact.experts[m.index][block], artifact.layout[m.index][block]
        hess = stats[m.index].hessian(block) if stats is not None else None
        prefix = f"{names[id(m.experts)]}.{block}.slabs"
        for name, start, count in lay["slabs"]:
            ids = lay["order"][start : start + count]
            w = block_weights(m, block, ids)
            fmt = FORMATS[name]
            if not fmt.quantized:
                tensors[f"{prefix}.{slab_key(name)}.weight"] = w.to(torch.bfloat16)
                deq = w.to(torch.bfloat16)
            else:
                q = quantize_stack(fmt, w, quantizer, None if hess is None else hess[ids])
                for k, v in slab_tensors(q).items():
                    tensors[f"{prefix}.{slab_key(name)}.{k}"] = v.contiguous()
                deq = q.dequantize(torch.float32).to(torch.bfloat16)
            assert all(plan[e] == name for e in ids)
            if on_block is not None:
                on_block(m.index, block, ids, deq)
    return tensors


def fake_quantize(model: nn.Module, artifact: Artifact, stats, quantizer: str = "gptq", progress: bool = True):
    """Write the plan's dequantized expert weights into `model` in place (for evaluation); returns a restore()."""
    layers = moe_layers(model)
    saved = {m.index: (m.experts.gate_up_proj.data.clone(), m.experts.down_proj.data.clone()) for m in layers}

    def write(layer: int, block: str, ids: list[int], deq: torch.Tensor) -> None:
        m = layers[layer]
        for k, e in enumerate(ids):
            if block == "gate_up":
                m.gate_proj(e).copy_(deq[k, : m.intermediate_size])
                m.up_proj(e).copy_(deq[k, m.intermediate_size :])
            else:
                m.down_proj(e).copy_(deq[k])

    with torch.no_grad():
        quantize_experts(model, artifact, stats, quantizer, progress, on_block=write)

    def restore() -> None:
        with torch.no_grad():
            for m in layers:
                m.experts.gate_up_proj.data.copy_(saved[m.index][0])
                m.experts.down_proj.data.copy_(saved[m.index][1])

    return restore


def allocated_linears(model: nn.Module, artifact: Artifact) -> list[tuple[str, nn.Linear, str]]:
    """(module name, nn.Linear, format) of every shared-expert / attention linear the plan allocates."""
    from exq.models.registry import adapter_for

    names = {id(mod): n for n, mod in model.named_modules()}
    out = []
    if artifact.shared is not None:
        for m, fmt in zip(moe_layers(model), artifact.shared, strict=True):
            if fmt is not None and m.shared_experts is not None:
                out += [(names[id(lin)], lin, fmt) for lin in m.shared_experts.modules() if isinstance(lin, nn.Linear)]
    if artifact.attention is not None:
        decoder = adapter_for(model.config).decoder_layers(model)
        for layer, fmt in zip(decoder, artifact.attention, strict=True):
            attn = getattr(layer, "self_attn", None)
            if fmt is not None and attn is not None:
                out += [(names[id(lin)], lin, fmt) for lin in attn.modules() if isinstance(lin, nn.Linear)]
    return out


def quantize_linears(model: nn.Module, artifact: Artifact, quantizer: str = "clip") -> dict[str, torch.Tensor]:
    """Runtime tensors of allocated shared-expert / attention linears (no routed-token statistics: clip, or rtn)."""
    tensors: dict[str, torch.Tensor] = {}
    q_name = "rtn" if quantizer == "rtn" else "clip"
    for name, lin, fmt_name in allocated_linears(model, artifact):
        fmt = FORMATS[fmt_name]
        w = lin.weight.detach().float()[None]
        if fmt.quantized:
            for k, v in slab_tensors(quantize_stack(fmt, w, q_name)).items():
                tensors[f"{name}.slab.{k}"] = v.contiguous()
        else:
            tensors[f"{name}.slab.weight"] = w.to(torch.bfloat16)
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().clone()
    return tensors
