"""Quality of quantized variants against the bf16 model: perplexity, KL, top-1 agreement, recovery, at their bytes.

All variants run in lockstep over the same batches of held-out text, each through the same eager expert arithmetic as
the reference, so no variant carries a different rounding path. Recovery is measured against uniform int4 RTN (the
baseline every plan is compared with), which is therefore always evaluated:
    recovery = (ppl_int4_rtn - ppl) / (ppl_int4_rtn - ppl_bf16)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from exq.compiler.artifact import Artifact
from exq.compiler.units import build_units, unit_bytes
from exq.data.corpus import Domain
from exq.eval.logits import batches, eager_experts, token_kl
from exq.formats import FORMATS
from exq.models import fingerprint, moe_layers
from exq.quant.apply import block_weights, quantize_stack, write_block
from exq.quant.calibrate import LayerStats

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    kind: str  # "reference", "baseline" or "exq"
    model: nn.Module
    bytes: int
    params: int
    plan: Artifact | None = None
    nll: list[float] = field(default_factory=list)  # per domain, summed
    count: list[int] = field(default_factory=list)  # per domain, predicted tokens
    kl: list[torch.Tensor] = field(default_factory=list)  # per batch, [B, L]
    kl_domain: list[float] = field(default_factory=list)
    agree: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params


def expert_bytes(model: nn.Module, fmt_name: str) -> tuple[int, int]:
    """(bytes, params) of every routed expert in one format."""
    units = build_units(fingerprint(model, moe_layers(model))["structure"], "block")
    return sum(unit_bytes(u, FORMATS[fmt_name]) for u in units), sum(u.params for u in units)


def uniform_variant(model: nn.Module, fmt_name: str, quantizer: str, stats: list[LayerStats] | None) -> nn.Module:
    """A copy of `model` with every routed expert quantized to one format (fake-quantized weights)."""
    q = copy.deepcopy(model)
    fmt = FORMATS[fmt_name]
    with torch.no_grad():
        for m in moe_layers(q):
            for block in ("gate_up", "down"):
                w = block_weights(m, block)
                hess = stats[m.index].hessian(block) if stats is not None else None
                write_block(m, block, quantize_stack(fmt, w, quantizer, hess).dequantize().to(q.dtype))
    return q


def run_variants(variants: list[Variant], domains: list[Domain], seq_len: int, batch_size: int, progress: bool):
    """Forward every batch through every variant; the first variant is the reference."""
    ref_v = variants[0]
    for v in variants:
        v.nll, v.count, v.kl_domain = [0.0] * len(domains), [0] * len(domains), [0.0] * len(domains)
    work = batches(domains, seq_len, batch_size)
    devices = {id(v): next(v.model.parameters()).device for v in variants}
    with torch.inference_mode():
        for d, b in tqdm(work, desc="eval", unit="batch", disable=not progress):
            ref = None
            for v in variants:
                logits = v.model(input_ids=b.to(devices[id(v)]), use_cache=False).logits.float().cpu()
                lp = torch.log_softmax(logits, dim=-1)
                if ref is None:
                    ref = lp
                v.nll[d] += float(-lp[:, :-1].gather(-1, b[:, 1:, None]).sum())
                v.count[d] += b[:, 1:].numel()
                kl = token_kl(ref, lp) if v is not ref_v else torch.zeros(b.shape)
                v.kl.append(kl)
                v.kl_domain[d] += float(kl.sum())
                v.agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())


def summarise(variants: list[Variant], domains: list[Domain]) -> dict:
    ppl = {v.name: [math.exp(n / c) for n, c in zip(v.nll, v.count, strict=True)] for v in variants}
    mean_ppl = {k: float(np.mean(p)) for k, p in ppl.items()}
    ref = variants[0].name
    base = "uniform int4 RTN"
    gap = mean_ppl[base] - mean_ppl[ref] if base in mean_ppl else float("nan")
    rows = []
    for v in variants:
        kl = torch.cat([k.reshape(-1) for k in v.kl]).double()
        tokens = [dom.tokens.numel() for dom in domains]
        rows.append(
            {
                "name": v.name,
                "kind": v.kind,
                "bytes": v.bytes,
                "bits_per_weight": round(v.bits_per_weight, 4),
                "ppl": round(mean_ppl[v.name], 4),
                "ppl_per_domain": {dom.name: round(p, 4) for dom, p in zip(domains, ppl[v.name], strict=True)},
                "kl_mean": float(np.mean([s / n for s, n in zip(v.kl_domain, tokens, strict=True)])),
                "kl_per_domain": {dom.name: s / n for dom, s, n in zip(domains, v.kl_domain, tokens, strict=True)},
                "kl_p99": float(torch.quantile(kl, 0.99)) if kl.numel() else 0.0,
                "kl_max": float(kl.max()) if kl.numel() else 0.0,
                "top1_agreement": v.agree / int(kl.numel()) if kl.numel() else 1.0,
                "recovery": (mean_ppl[base] - mean_ppl[v.name]) / gap if gap and gap == gap else None,
            }
        )
    base_kl = next((r["kl_mean"] for r in rows if r["name"] == base), None)
    for r in rows:
        r["kl_vs_int4_rtn"] = r["kl_mean"] / base_kl if base_kl else None
    return {"domains": [{"name": d.name, "tokens": d.tokens.numel()} for d in domains], "variants": rows}


def build_variants(
    model: nn.Module,
    quantized: list[str | Path],
    artifacts: list[str | Path],
    compare: bool,
    stats_for: Callable[[], list[LayerStats] | None],
    device: torch.device,
) -> list[Variant]:
    from exq.quant.apply import fake_quantize
    from exq.runtime import load

    fp = fingerprint(model, moe_layers(model))
    b16, params = expert_bytes(model, "bf16")
    variants = [Variant("bf16", "reference", model, b16, params)]
    need_stats = compare or bool(artifacts)
    stats = stats_for() if need_stats else None
    specs = [("uniform int4 RTN", "int4", "rtn")]
    if compare:
        specs += [
            ("uniform int4 GPTQ", "int4", "gptq"),
            ("uniform int3 RTN", "int3", "rtn"),
            ("uniform int3-asym GPTQ", "int3-asym", "gptq"),
        ]
    for name, fmt, quantizer in specs:
        if quantizer == "gptq" and stats is None:
            continue
        variants.append(
            Variant(
                name, "baseline", uniform_variant(model, fmt, quantizer, stats), expert_bytes(model, fmt)[0], params
            )
        )
    for path in quantized:
        q = load(path, device=device)
        plan = Artifact.load(Path(path) / "exq-plan.json", model=fp)
        variants.append(
            Variant(f"exq {plan.budget['spec']} ({Path(path).name})", "exq", q, plan.summary()["bytes"], params, plan)
        )
    for path in artifacts:
        plan = Artifact.load(path, model=fp)
        q = copy.deepcopy(model)
        fake_quantize(q, plan, stats, "gptq" if stats is not None else "clip", progress=False)
        variants.append(
            Variant(f"exq {plan.budget['spec']} ({Path(path).stem})", "exq", q, plan.summary()["bytes"], params, plan)
        )
    return variants


def evaluate(
    model: nn.Module,
    domains: list[Domain],
    *,
    quantized: list[str | Path] = (),
    artifacts: list[str | Path] = (),
    compare: bool = False,
    stats_for: Callable[[], list[LayerStats] | None] = lambda: None,
    seq_len: int = 256,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict, list[Variant]]:
    device = next(model.parameters()).device
    variants = build_variants(model, list(quantized), list(artifacts), compare, stats_for, device)
    with eager_experts(model):
        ctxs = [eager_experts(v.model) for v in variants[1:]]
        for c in ctxs:
            c.__enter__()
        try:
            run_variants(variants, domains, seq_len, batch_size, progress)
        finally:
            for c in ctxs:
                c.__exit__(None, None, None)
    report = summarise(variants, domains)
    report["protocol"] = {"seq_len": seq_len, "batch_size": batch_size, "experts_implementation": "eager"}
    return report, variants
