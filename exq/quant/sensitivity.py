"""Sensitivity: what quantizing one block of one expert to one format costs, in nats of KL per token.

Two measurements, combined:

1. Fisher estimate per expert (calibrate.py): KL ~ 1/(2N) sum_o G[o] (d_o A d_o^T) / n for the quantized weights'
   error d. It ranks the experts of one layer against each other without extra forward passes. Alone it misses what
   gradients cannot see — a perturbed expert flips later routers' top-k choices — and on the fixture models it
   under-estimates single-expert KL 3-4x, by a factor that differs between layers, blocks and formats.
2. Probes: for each (layer, block, format) that block of *every* expert of the layer is quantized and the real KL of
   the model's output against bf16 is measured on held-out probe tokens (layers x 2 x formats forward passes).

cost[l, e, b, f] = fisher[l, e, b, f] x probe[l, b, f] / sum_e fisher[l, e, b, f]: each layer-block's total is the
measured KL, shared among its experts by their Fisher estimates. Probes run the model as evaluation does (its own
dtype, eager experts), so the table is in the units the quality targets are measured in.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from exq.compiler.costs import SensitivityTable
from exq.compiler.units import BLOCKS
from exq.data.corpus import Domain
from exq.errors import ExqError
from exq.eval.logits import batches, eager_experts, logprobs, mean_kl
from exq.formats import FORMATS, parse_formats
from exq.models import MoELayer, fingerprint, moe_layers
from exq.quant.apply import block_weights, quantize_stack, write_block
from exq.quant.calibrate import LayerStats, collect_stats

log = logging.getLogger(__name__)

DEFAULT_FORMATS = "bf16,int8,int4,int4-asym,int3,int3-asym,int2-asym"


@dataclass
class SensitivityReport:
    probes: list[dict] = field(default_factory=list)  # one per (layer, block, format)
    seconds: dict = field(default_factory=dict)
    fisher: np.ndarray | None = None  # [L, E, 2, F] the uncalibrated Fisher estimates


def fisher_costs(st: LayerStats, block: str, delta: torch.Tensor, calib_tokens: int) -> torch.Tensor:
    """[E] estimated KL per token of each expert's weight error delta [E, out, in]."""
    a = (st.a_gate_up if block == "gate_up" else st.a_down).to(delta.dtype)
    g = (st.g_gate_up if block == "gate_up" else st.g_down).to(delta.dtype)
    n = st.n.to(delta.dtype).clamp_min(1.0)
    quad = torch.einsum("eoi,eij,eoj->eo", delta, a, delta)
    return 0.5 * (g / n[:, None] * quad).sum(-1) / calib_tokens


def resolve_formats(layers: list[MoELayer], formats: str | list[str] | None) -> list[str]:
    """Formats to measure: the ones asked for (each must fit every expert matrix), or every default one that fits."""
    requested = formats is not None
    names = [f.name for f in parse_formats(formats if requested else DEFAULT_FORMATS)]

    def fits(name: str) -> bool:
        f = FORMATS[name]
        return all(
            f.applicable(2 * m.intermediate_size, m.hidden_size) and f.applicable(m.hidden_size, m.intermediate_size)
            for m in layers
        )

    bad = [n for n in names if not fits(n)]
    if bad and requested:
        raise ExqError(
            f"format(s) {', '.join(bad)} cannot store this model's experts (their group size does not divide the "
            "hidden / intermediate size)",
            "choose --formats among those that fit",
        )
    if bad:
        log.warning(
            "formats %s do not fit this model's expert shapes; measuring %s", bad, [n for n in names if n not in bad]
        )
    return [n for n in names if n not in bad]


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    calib: Sequence[Domain],
    probe: Sequence[Domain],
    formats: str | list[str] | None = None,
    quantizer: str = "gptq",
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    stats: list[LayerStats] | None = None,
) -> tuple[SensitivityTable, SensitivityReport, list[LayerStats]]:
    """Measure the cost table of `model` (its own dtype). Returns the table, the probe report and the statistics."""
    layers = moe_layers(model)
    fmts = parse_formats(resolve_formats(layers, formats))
    report = SensitivityReport()
    t0 = time.perf_counter()
    if stats is None:
        m32 = copy.deepcopy(model).float()
        stats = collect_stats(m32, calib, seq_len=seq_len, batch_size=max(1, batch_size // 2), progress=progress)
        del m32
    report.seconds["calibration"] = round(time.perf_counter() - t0, 2)
    n_calib = sum(d.tokens.numel() for d in calib)
    work = batches(probe, seq_len, batch_size)
    e_max = max(m.num_experts for m in layers)
    routed = np.full((len(layers), e_max, len(BLOCKS), len(fmts)), np.nan)
    report.fisher = np.zeros_like(routed)
    t1 = time.perf_counter()
    with eager_experts(model):
        ref = logprobs(model, work)
        jobs = [(m, b, f) for m in layers for b in BLOCKS for f in fmts]
        for m, block, fmt in tqdm(jobs, desc="sensitivity", unit="probe", disable=not progress):
            fi = fmts.index(fmt)
            if not fmt.quantized:
                routed[m.index, : m.num_experts, BLOCKS.index(block), fi] = 0.0
                continue
            w = block_weights(m, block)
            hess = stats[m.index].hessian(block)
            deq = quantize_stack(fmt, w, quantizer, hess).dequantize(torch.float32)
            deq = deq.to(model.dtype)  # the weights the model will really hold
            est = fisher_costs(stats[m.index], block, (w - deq.float()).double(), n_calib)
            original = w.to(model.dtype)
            write_block(m, block, deq)
            measured = mean_kl(ref, logprobs(model, work))
            write_block(m, block, original)
            total = float(est.sum())
            report.fisher[m.index, : m.num_experts, BLOCKS.index(block), fi] = est.cpu().numpy()
            share = est / total if total > 0 else torch.full_like(est, 1.0 / m.num_experts)
            routed[m.index, : m.num_experts, BLOCKS.index(block), fi] = (share * max(measured, 0.0)).cpu().numpy()
            report.probes.append(
                {"moe_layer": m.index, "block": block, "format": fmt.name, "measured_kl": measured, "fisher_kl": total}
            )
    report.seconds["probes"] = round(time.perf_counter() - t1, 2)
    method = {
        "estimator": "fisher x probe",
        "quantizer": {f.name: ("none" if not f.quantized else "rtn" if f.bits == 8 else quantizer) for f in fmts},
        "calibration": {"tokens": n_calib, "domains": [d.name for d in calib], "seq_len": seq_len},
        "probe": {"tokens": sum(d.tokens.numel() for d in probe), "domains": [d.name for d in probe]},
    }
    table = SensitivityTable(
        model=fingerprint(model, layers), formats=[f.name for f in fmts], routed=routed, method=method
    )
    return table, report, stats
