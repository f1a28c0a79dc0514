"""`exq diagnose`: how concentrated and predictable routing is, and what a routing-aware allocation can hope for.

The hope is an estimate, made before any sensitivity is measured: if an expert's quantization damage were
proportional to how often it is routed, how much would reallocating symmetric int8 / int4 / int3 among experts, at the
bytes of uniform int4, cut the expected damage? Measured recovery (`exq eval`) is what counts; this number says how
much room the routing skew alone leaves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exq.compiler.artifact import Artifact
from exq.compiler.compile import compile_plan
from exq.compiler.costs import FrequencyProxy
from exq.compiler.ir import RoutingGraph
from exq.compiler.units import build_units
from exq.fileio import atomic_write, atomic_write_json
from exq.formats import FORMATS
from exq.profiling.routing_profile import RoutingProfile

HOPE_FORMATS = ["int8", "int4", "int3"]


def allocation_hope(prof: RoutingProfile) -> float | None:
    """1 - proxy cost of the best int8/int4/int3 plan / proxy cost of uniform int4, at uniform int4 bytes."""
    units = build_units(prof.model["structure"])
    fmts = [FORMATS[n] for n in HOPE_FORMATS]
    if not all(f.applicable(o, i) for f in fmts for u in units for o, i in u.matrices):
        return None
    cost = FrequencyProxy(prof).cost_table(units, fmts)
    uniform = float(cost[:, HOPE_FORMATS.index("int4")].sum())
    _, sol = compile_plan(prof, "int4", formats=HOPE_FORMATS, solver="greedy")
    return 1.0 - sol.objective / uniform if uniform > 0 else 0.0


def diagnose(prof: RoutingProfile, artifact: Artifact | None = None, output: str | Path | None = None) -> dict:
    graph = RoutingGraph.from_profile(prof)
    report = graph.summary()
    report["allocation_hope"] = allocation_hope(prof)
    if artifact is not None:
        report["plan"] = artifact.summary()
    if output is not None:
        out = Path(output)
        atomic_write_json(out / "diagnose.json", report)
        _plot(graph, artifact, out / "diagnose.png")
    return report


def format_report(report: dict) -> str:
    lines = [
        f"{'layer':>5} {'E':>4} {'k':>3} {'H/lnE':>6} {'max/unif':>8} {'hot10%':>7} {'hot25%':>7} {'E@80%':>6} "
        f"{'pred(next)':>10}"
    ]
    for r in report["layers"]:
        pred = r.get("next_layer_predictability")
        lines.append(
            f"{r['layer_index']:>5} {r['num_experts']:>4} {r['top_k']:>3} {r['entropy_normalised']:>6.3f} "
            f"{r['max_over_uniform']:>8.2f} {r['hot10_coverage']:>7.1%} {r['hot25_coverage']:>7.1%} "
            f"{r['experts_for_80pct']:>6} {'' if pred is None else f'{pred:.3f}':>10}"
        )
    hope = report["allocation_hope"]
    lines.append(
        "hot10%/hot25%: routed slots taken by the hottest 10 % / 25 % of experts; E@80%: experts covering 80 % of "
        "slots; pred(next): share of the next layer's routing entropy explained by this layer's choice"
    )
    if hope is not None:
        lines.append(
            "allocation hope: if damage followed routing frequency, an int8/int4/int3 plan at uniform-int4 bytes "
            f"would cut it by {hope:.1%} (an estimate; measured recovery comes from `exq eval`)"
        )
    if "plan" in report:
        p = report["plan"]
        lines.append(f"plan: {p['bits_per_weight']:.4f} bits per weight, units per format {p['units_per_format']}")
    return "\n".join(lines)


def _plot(graph: RoutingGraph, artifact: Artifact | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if artifact is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    for n in graph.layers:
        share = np.sort(n.share)[::-1]
        ax.plot(np.arange(1, len(share) + 1) / len(share), np.cumsum(share), label=f"layer {n.layer_index}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="uniform")
    ax.set_xlabel("fraction of experts (hottest first)")
    ax.set_ylabel("fraction of routed slots")
    ax.set_title("hot-set coverage")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    rows = graph.summary()["layers"]
    pred = [r.get("next_layer_predictability", np.nan) for r in rows[:-1]]
    ax.bar([str(r["layer_index"]) for r in rows[:-1]], pred, color="tab:green")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("I(choice_l ; choice_l+1) / H(choice_l+1)")
    ax.set_title("next-layer predictability")
    if artifact is not None:
        ax = axes[0, 2]
        names = list(FORMATS)
        width = max(n.num_experts for n in graph.layers)
        grid = np.full((len(graph.layers), width), np.nan)
        for li, (n, plan) in enumerate(zip(graph.layers, artifact.experts, strict=True)):
            order = np.argsort(-n.share, kind="stable")
            grid[li, : n.num_experts] = [names.index(plan["gate_up"][e]) for e in order]
        cmap = plt.get_cmap("viridis", len(names))
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, ticks=range(len(names)), fraction=0.046)
        cb.ax.set_yticklabels(names, fontsize=7)
        ax.set_xlabel("experts, hottest first")
        ax.set_ylabel("MoE layer")
        ax.set_title("plan (gate_up format)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
