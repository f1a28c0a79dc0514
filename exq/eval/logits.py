"""Running a model over evaluation tokens and comparing output distributions.

Every comparison runs both models through the same expert arithmetic (transformers' eager per-expert loop, which
exq's runtime module reproduces exactly): two implementations of the same bf16 weights differ by about 8e-4 nats of
KL on the fixture models (eager vs grouped_mm), a noise floor as large as the effects being measured.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from exq.data.corpus import Domain, split_tokens


@contextmanager
def eager_experts(model: nn.Module) -> Iterator[nn.Module]:
    from exq.runtime.experts import QuantizedExperts

    exq_modules = [m for m in model.modules() if isinstance(m, QuantizedExperts)]
    kernels_before = [m.kernels for m in exq_modules]
    for m in exq_modules:  # exq's fused op rounds differently from eager: the reference path, like every variant
        m.kernels = "off"
    getter = getattr(model, "get_experts_implementation", None)
    before = getter() if getter is not None else None
    if getter is not None:
        model.set_experts_implementation("eager")
    try:
        yield model
    finally:
        if getter is not None:
            model.set_experts_implementation(before)
        for m, k in zip(exq_modules, kernels_before, strict=True):
            m.kernels = k


def batches(domains: Sequence[Domain], seq_len: int, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(domain index, [B, L] tokens) for every batch, in order."""
    return [(d, b) for d, dom in enumerate(domains) for b in split_tokens(dom.tokens, seq_len, batch_size)]


@torch.inference_mode()
def logprobs(model: nn.Module, work: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """float32 log-softmax of the model's logits for every batch, on the CPU."""
    device = next(model.parameters()).device
    out = []
    for _, b in work:
        logits = model(input_ids=b.to(device), use_cache=False).logits
        out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return out


def token_kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per token, [B, L], from log-probabilities."""
    return (ref.exp() * (ref - other)).sum(-1)


def mean_kl(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    total = sum(float(token_kl(r, o).sum()) for r, o in zip(ref, other, strict=True))
    return total / sum(r.shape[0] * r.shape[1] for r in ref)
