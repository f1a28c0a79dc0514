"""The routing graph: the compiler's view of a profiled MoE model.

Nodes are (MoE layer, expert) with their routing frequency, gate mass and bytes per format; edges join consecutive
MoE layers with P(j chosen at l+1 | i chosen at l). Passes read it; `summary()` is what `exq diagnose` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from exq.formats import Format
from exq.profiling.routing_profile import RoutingProfile


@dataclass
class LayerNodes:
    layer_index: int  # decoder layer
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    frequency: np.ndarray  # [E] fraction of tokens routed to the expert (sums to top_k)
    gate_mass: np.ndarray  # [E] mean routing weight applied to the expert per token
    coselection: np.ndarray  # [E, E] tokens choosing both (same layer)

    @property
    def share(self) -> np.ndarray:
        return self.frequency / self.top_k

    def expert_bytes(self, fmt: Format) -> int | None:
        """Bytes of one expert (gate_up [2I, H] + down [H, I]) in a format; None if it cannot store them."""
        mats = ((2 * self.intermediate_size, self.hidden_size), (self.hidden_size, self.intermediate_size))
        if not all(fmt.applicable(o, i) for o, i in mats):
            return None
        return sum(fmt.nbytes(o, i) for o, i in mats)


@dataclass
class RoutingGraph:
    model: dict
    tokens: int
    layers: list[LayerNodes]
    transitions: list[np.ndarray]  # [E_l, E_l+1]: P(j at l+1 | i at l)

    @classmethod
    def from_profile(cls, prof: RoutingProfile) -> RoutingGraph:
        layers = []
        for i, (lp, st) in enumerate(zip(prof.layers, prof.model["structure"]["moe_layers"], strict=True)):
            layers.append(
                LayerNodes(
                    layer_index=lp.layer_index,
                    num_experts=lp.num_experts,
                    top_k=lp.top_k,
                    hidden_size=int(st["hidden_size"]),
                    intermediate_size=int(st["intermediate_size"]),
                    frequency=prof.frequency(i),
                    gate_mass=prof.gate_mass(i) / prof.tokens,
                    coselection=prof.coselection(i),
                )
            )
        transitions = [prof.next_layer_probability(i) for i in range(len(prof.layers) - 1)]
        return cls(prof.model, prof.tokens, layers, transitions)

    def summary(self) -> dict:
        """Concentration and predictability of routing, layer by layer."""
        out = []
        for i, n in enumerate(self.layers):
            share = np.sort(n.share)[::-1]
            cum = np.cumsum(share)
            h = float(-(share[share > 0] * np.log(share[share > 0])).sum())
            row = {
                "layer_index": n.layer_index,
                "num_experts": n.num_experts,
                "top_k": n.top_k,
                "entropy_normalised": h / math.log(n.num_experts),
                "max_over_uniform": float(share[0] * n.num_experts),
                "unused_experts": int((n.frequency == 0).sum()),
                # routed token-slots covered by the hottest 10 % / 25 % of experts
                "hot10_coverage": float(cum[max(1, math.ceil(0.10 * n.num_experts)) - 1]),
                "hot25_coverage": float(cum[max(1, math.ceil(0.25 * n.num_experts)) - 1]),
                "experts_for_80pct": int(np.searchsorted(cum, 0.8 - 1e-12) + 1),
            }
            if i < len(self.transitions):
                p = self.transitions[i] / self.layers[i + 1].top_k  # rows: distribution over next-layer slots
                used = n.frequency > 0
                cond = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
                nxt = self.layers[i + 1].share
                marg = float(-(nxt[nxt > 0] * np.log(nxt[nxt > 0])).sum())
                w = n.share[used] / n.share[used].sum()
                # mutual information between this layer's and the next layer's choice, as a fraction of the next
                # layer's entropy: 0 = the next choice is independent of this one, 1 = fully determined
                row["next_layer_predictability"] = float(1.0 - (w * cond[used]).sum() / marg) if marg > 0 else 0.0
            out.append(row)
        return {"tokens": self.tokens, "layers": out}
