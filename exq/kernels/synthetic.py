"""Random MoE layers in exq's runtime layout, for kernel tests and benchmarks (real codes, scales and zero points)."""

from __future__ import annotations

import torch
from torch import nn

from exq.formats import FORMATS
from exq.quant.apply import slab_tensors
from exq.quant.codec import quantize_rtn
from exq.runtime.experts import QuantizedExperts, slab_key


def layout_for(formats: list[str]) -> dict:
    """Experts grouped into per-format slabs (the layout pass's order: slab by slab, ids ascending within)."""
    order, slabs = [], []
    for f in sorted(set(formats), key=list(FORMATS).index):
        ids = [e for e, g in enumerate(formats) if g == f]
        slabs.append([f, len(order), len(ids)])
        order += ids
    return {"order": order, "slabs": slabs}


def mixed_formats(num_experts: int, shares: dict[str, float], seed: int = 0) -> list[str]:
    """A random assignment with the given share of experts per format (rounded; the rest take the last format)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_experts, generator=gen).tolist()
    out = [""] * num_experts
    names = list(shares)
    start = 0
    for i, f in enumerate(names):
        n = num_experts - start if i == len(names) - 1 else round(shares[f] * num_experts)
        for e in perm[start : start + n]:
            out[e] = f
        start += n
    return out


def random_experts(
    num_experts: int,
    hidden: int,
    intermediate: int,
    formats: list[str],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    std: float = 0.02,
) -> QuantizedExperts:
    """A QuantizedExperts with N(0, std) weights quantized (RTN) into each expert's format, both blocks alike.

    Weights are drawn and quantized on `device` (a GPU makes benchmark-sized layers in a moment)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layout = layout_for(formats)
    mod = QuantizedExperts(
        num_experts, hidden, intermediate, nn.SiLU(), {"gate_up": layout, "down": layout}, device=device
    )
    for block, (out_f, in_f) in (("gate_up", (2 * intermediate, hidden)), ("down", (hidden, intermediate))):
        qb = getattr(mod, block)
        for name, _start, count in qb.slab_spec:
            w = torch.randn(count, out_f, in_f, generator=gen, device=device) * std
            slab = qb.slabs[slab_key(name)]
            fmt = FORMATS[name]
            parts = {"weight": w.to(torch.bfloat16)} if not fmt.quantized else slab_tensors(quantize_rtn(fmt, w))
            for k, v in parts.items():
                getattr(slab, k).copy_(v)
    return mod
