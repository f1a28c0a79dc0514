"""A picture of a routing profile: per-layer expert load, and how one layer's choices predict the next layer's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exq.fileio import atomic_write
from exq.profiling.routing_profile import RoutingProfile


def plot_profile(prof: RoutingProfile, path: str | Path) -> Path:
    """Write a PNG: load relative to uniform per (layer, expert), and P(j at l+1 | i at l) for the busiest pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = len(prof.layers)
    width = max(lp.num_experts for lp in prof.layers)
    load = np.full((n_layers, width), np.nan)
    for i, lp in enumerate(prof.layers):
        load[i, : lp.num_experts] = prof.share(i) * lp.num_experts
    panels = 2 if n_layers > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 0.5 * n_layers + 2.8), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(load, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (decoder index)")
    ax.set_yticks(range(n_layers), [str(lp.layer_index) for lp in prof.layers])
    ax.set_title("load relative to uniform (share x E)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if panels == 2:
        # the transition whose next-layer choice is most predictable (lowest mean conditional entropy)
        def spread(i: int) -> float:
            p = prof.next_layer_probability(i) / prof.layers[i + 1].top_k
            return float(-(p * np.log(np.where(p > 0, p, 1))).sum(axis=1).mean())

        best = min(range(n_layers - 1), key=spread)
        ax = axes[0, 1]
        im = ax.imshow(prof.next_layer_probability(best), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel(f"expert j at layer {prof.layers[best + 1].layer_index}")
        ax.set_ylabel(f"expert i at layer {prof.layers[best].layer_index}")
        ax.set_title("P(j next | i here), most predictable pair")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(
        f"{prof.model.get('architecture', '')}: {prof.tokens:,} tokens, {', '.join(prof.domain_names)}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
