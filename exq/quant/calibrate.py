"""Calibration statistics per routed expert, from one forward + backward pass over calibration text.

For every expert e of every MoE layer, over the tokens routed to it:
  n[e]              tokens routed
  a_gate_up[e]      sum of x x^T of its input x (hidden, [H, H])          -> GPTQ Hessian of gate_up
  a_down[e]         sum of h h^T of its intermediate h ([I, I])             -> GPTQ Hessian of down
  g_gate_up[e]      sum over tokens of (d logp / d gate_up output)^2 ([2I])
  g_down[e]         sum of (d logp / d expert output)^2 ([H]), routing weight included
plus a_all, the sum of x x^T over every token entering the layer (a prior for experts with few tokens).

The gradients are of log p(y) with y *sampled from the model itself*: their squares estimate the Fisher information of
the model's output distribution, i.e. the curvature of KL(model || perturbed model). So
    KL per token ~ 1/(2N) * sum_o G[o] * (d_o A d_o^T) / n          (d = W - W_quantized, one row d_o per output o)
is in nats of KL, comparable across experts, blocks and layers (a Kronecker-factored Fisher, G = g / n, A = a / n).
The model runs in float32 for this pass (an exact copy of bf16 weights), so bf16 rounding does not blur gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from exq.data.corpus import Domain, split_tokens
from exq.models import MoELayer, moe_layers

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    n: torch.Tensor  # [E] int64
    a_gate_up: torch.Tensor  # [E, H, H] float64
    a_down: torch.Tensor  # [E, I, I] float64
    g_gate_up: torch.Tensor  # [E, 2I] float64
    g_down: torch.Tensor  # [E, H] float64
    a_all: torch.Tensor  # [H, H] float64
    tokens: int = 0

    def hessian(self, block: str, prior_tokens: float = 32.0) -> torch.Tensor:
        """Per-expert mean x x^T, shrunk towards the layer's mean by `prior_tokens` pseudo-tokens.

        An expert with no routed tokens gets the layer-wide input statistics (gate_up) or, for down, an identity scaled
        to the average intermediate energy; one with thousands keeps its own.
        """
        n = self.n.to(torch.float64)[:, None, None]
        if block == "gate_up":
            a, prior = self.a_gate_up, self.a_all / max(self.tokens, 1)
        else:
            a = self.a_down
            pooled = a.sum(0) / max(int(self.n.sum()), 1)
            prior = pooled if torch.isfinite(pooled).all() else torch.eye(a.shape[-1], dtype=a.dtype)
        return (a + prior_tokens * prior[None]) / (n + prior_tokens)


class _Capture:
    """Replaces an experts module's forward: the same arithmetic, one expert at a time, keeping what stats need."""

    def __init__(self, layer: MoELayer) -> None:
        self.layer = layer
        self.records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.inputs: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        m = self.layer
        self.inputs.append(hidden.detach())
        out = torch.zeros_like(hidden)
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)
            x = hidden[tok]
            gu = x @ torch.cat([m.gate_proj(e), m.up_proj(e)]).t()
            gu.retain_grad()
            gate, up = gu.chunk(2, dim=-1)
            h = m.experts.act_fn(gate) * up
            y = h @ m.down_proj(e).t()
            y.retain_grad()
            out.index_add_(0, tok, y * top_k_weights[tok, slot, None].to(y.dtype))
            self.records.append((e, x.detach(), gu, h.detach(), y))
        return out


@contextmanager
def _captured(layers: list[MoELayer]):
    caps = [_Capture(m) for m in layers]
    saved = [m.experts.forward for m in layers]
    for m, c in zip(layers, caps, strict=True):
        m.experts.forward = c.forward
    try:
        yield caps
    finally:
        for m, f in zip(layers, saved, strict=True):
            m.experts.forward = f


def collect_stats(
    model: nn.Module,
    domains: Sequence[Domain],
    *,
    seq_len: int = 256,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> list[LayerStats]:
    """One pass of forward + backward (labels sampled from the model) over the calibration tokens."""
    layers = moe_layers(model)
    device = next(model.parameters()).device
    dt = torch.float64
    stats = []
    for m in layers:
        e, h, i = m.num_experts, m.hidden_size, m.intermediate_size
        stats.append(
            LayerStats(
                n=torch.zeros(e, dtype=torch.long, device=device),
                a_gate_up=torch.zeros(e, h, h, dtype=dt, device=device),
                a_down=torch.zeros(e, i, i, dtype=dt, device=device),
                g_gate_up=torch.zeros(e, 2 * i, dtype=dt, device=device),
                g_down=torch.zeros(e, h, dtype=dt, device=device),
                a_all=torch.zeros(h, h, dtype=dt, device=device),
            )
        )
    gen = torch.Generator(device=device).manual_seed(seed)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
    total = sum(d.tokens.numel() for d in domains)
    try:
        with _captured(layers) as caps, tqdm(total=total, unit="tok", desc="calibrate", disable=not progress) as bar:
            for dom in domains:
                for batch in split_tokens(dom.tokens, seq_len, batch_size):
                    for c in caps:
                        c.records.clear()
                        c.inputs.clear()
                    with torch.enable_grad():
                        logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
                        logp = torch.log_softmax(logits, dim=-1)
                        y = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
                        logp.reshape(-1, logp.shape[-1]).gather(1, y).sum().backward()
                    for st, c in zip(stats, caps, strict=True):
                        x_all = torch.cat([x.reshape(-1, x.shape[-1]) for x in c.inputs]).to(dt)
                        st.a_all += x_all.t() @ x_all
                        st.tokens += x_all.shape[0]
                        for e, x, gu, h, y_out in c.records:
                            x, h = x.to(dt), h.to(dt)
                            st.n[e] += x.shape[0]
                            st.a_gate_up[e] += x.t() @ x
                            st.a_down[e] += h.t() @ h
                            st.g_gate_up[e] += gu.grad.to(dt).pow(2).sum(0)
                            st.g_down[e] += y_out.grad.to(dt).pow(2).sum(0)
                    bar.update(batch.numel())
    finally:
        hook.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return stats
