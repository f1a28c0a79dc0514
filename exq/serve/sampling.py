"""Next-token choice for a batch whose rows each carry their own sampling settings.

Greedy rows (temperature 0) take the argmax of the fp32 logits, exactly as transformers' `generate` does, so greedy
serving reproduces it token for token. Sampled rows apply temperature, then top-k, then top-p (the order of
transformers' logits warpers), then draw with the request's own generator when it gave a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[V] fp32 logits -> logits with the excluded tokens at -inf, scaled by 1/temperature."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, V] -> one token per row."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for b, p in enumerate(params):
        if p.greedy:
            continue
        probs = filter_logits(logits[b], p.temperature, p.top_k, p.top_p).softmax(-1)
        g = generators[b]
        out[b] = int(torch.multinomial(probs.cpu() if g is not None else probs, 1, generator=g))
    return out
