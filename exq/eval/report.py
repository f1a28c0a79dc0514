"""Evaluation report: report.json, report.md and the plots (bytes vs KL, plan heat maps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exq.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from exq.formats import FORMATS


def markdown(report: dict, command: str | None = None) -> str:
    doms = [d["name"] for d in report["domains"]]
    lines = ["# exq evaluation", ""]
    if command:
        lines += ["```", command, "```", ""]
    p = report.get("protocol", {})
    held = ", ".join(f"{d['name']} ({d['tokens']:,} tokens)" for d in report["domains"])
    lines.append(
        f"Held-out text: {held}; "
        f"sequences of {p.get('seq_len')} tokens; experts run as `{p.get('experts_implementation')}` in every variant. "
        "KL = mean per-token KL(bf16 || variant), nats; bits per weight of the routed experts, scales and zero points "
        "included; recovery vs uniform int4 RTN."
    )
    lines += [
        "",
        "| variant | bits/weight | ppl | KL mean | KL / int4-RTN | KL p99 | KL max | top-1 agree | recovery |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["variants"]:
        rel = "" if r["kl_vs_int4_rtn"] is None else f"{r['kl_vs_int4_rtn']:.3f}"
        rec = "" if r["recovery"] is None else f"{100 * r['recovery']:.1f} %"
        lines.append(
            f"| {r['name']} | {r['bits_per_weight']:.4f} | {r['ppl']:.3f} | {r['kl_mean']:.5f} | {rel} | "
            f"{r['kl_p99']:.4f} | {r['kl_max']:.3f} | {100 * r['top1_agreement']:.2f} % | {rec} |"
        )
    lines += ["", "Perplexity per domain:", "", "| variant | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    for r in report["variants"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['ppl_per_domain'][d]:.3f}" for d in doms) + " |")
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def pareto_plot(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in report["variants"]:
        if r["kind"] == "reference":
            continue
        color = {"baseline": "tab:gray", "exq": "tab:red"}[r["kind"]]
        ax.scatter(r["bits_per_weight"], r["kl_mean"], color=color, s=36, zorder=3)
        ax.annotate(
            r["name"], (r["bits_per_weight"], r["kl_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    exq = sorted((r["bits_per_weight"], r["kl_mean"]) for r in report["variants"] if r["kind"] == "exq")
    if len(exq) > 1:
        ax.plot(*zip(*exq, strict=True), color="tab:red", lw=1, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of routed experts (scales, zeros included)")
    ax.set_ylabel("mean KL(bf16 || variant), nats / token")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plan_heatmap(plan, path: Path, title: str) -> None:
    """Per MoE layer, experts sorted by routing share (hottest left), coloured by format; one panel per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(FORMATS)
    n_layers = len(plan.experts)
    width = max(len(p["gate_up"]) for p in plan.experts)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * n_layers + 2.5), gridspec_kw={"width_ratios": [1, 1, 0.6]})
    cmap = plt.get_cmap("viridis", len(names))
    for ax, block in zip(axes[:2], ("gate_up", "down"), strict=True):
        grid = np.full((n_layers, width), np.nan)
        for li, p in enumerate(plan.experts):
            share = np.array(plan.routing[li]) if plan.routing else np.zeros(len(p[block]))
            order = np.argsort(-share, kind="stable")
            grid[li, : len(order)] = [names.index(p[block][e]) for e in order]
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, interpolation="nearest")
        ax.set_title(f"{block} format, experts by routing share", fontsize=9)
        ax.set_xlabel("expert rank (hottest first)")
        ax.set_ylabel("MoE layer")
    cb = fig.colorbar(im, ax=axes[1], ticks=range(len(names)), fraction=0.05)
    cb.ax.set_yticklabels(names, fontsize=7)
    ax = axes[2]
    if plan.routing:
        for li, share in enumerate(plan.routing):
            ax.plot(np.sort(share)[::-1], lw=1, label=f"layer {li}")
        ax.set_title("routing share by rank", fontsize=9)
        ax.set_xlabel("expert rank")
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def write_report(report: dict, variants, out_dir: str | Path, title: str, command: str | None = None) -> list[Path]:
    out = Path(out_dir)
    atomic_write_json(out / "report.json", report | ({"command": command} if command else {}))
    atomic_write_bytes(out / "report.md", markdown(report, command).encode())
    written = [out / "report.json", out / "report.md", out / "pareto.png"]
    pareto_plot(report, out / "pareto.png", title)
    for i, v in enumerate(x for x in variants if x.plan is not None):
        p = out / f"plan-{i}.png"
        plan_heatmap(v.plan, p, f"{title}: {v.name}")
        written.append(p)
    return written
