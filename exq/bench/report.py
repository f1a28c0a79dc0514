"""Tables and plots of `exq bench kernels` results."""

from __future__ import annotations

from pathlib import Path


def markdown(result: dict) -> str:
    f = result["floors"]
    lines = [
        f"{result['device']}, torch {result['torch']}, triton {result['triton']}, SGLang kernel from "
        f"{result['sglang'] or '(not run)'}; copy bandwidth {f['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{f['bf16_flops'] / 1e12:.0f} TFLOP/s; {result['layers_per_graph']} layers per CUDA graph, median of "
        f"{result['reps']} replays. Times in µs per layer.",
        "",
        "| shape | T | plan | HBM floor | exq | % of floor | compute floor | SGLang default | SGLang tuned | "
        "exq vs SGLang default | exq vs tuned | torch bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sd, st, tb = r.get("sglang_default_us"), r.get("sglang_tuned_us"), r.get("torch_bf16_us")
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['plan']} | {r['hbm_floor_us']:.1f} | {r['exq_us']:.1f} | "
            f"{r['exq_pct_of_hbm_floor']:.0f} % | {r['compute_floor_us']:.1f} | "
            + (
                f"{sd:.1f} | {st:.1f} | {sd / r['exq_us']:.2f}x | {st / r['exq_us']:.2f}x | "
                if sd
                else "- | - | - | - | "
            )
            + (f"{tb:.1f} |" if tb else "- |")
        )
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        for i, plan in enumerate(dict.fromkeys(r["plan"] for r in rows)):  # every plan the run timed
            pr = [r for r in rows if r["plan"] == plan]
            style = "-" + "os^vDp"[i % 6]
            ax.plot([r["tokens"] for r in pr], [r["exq_us"] for r in pr], style, label=f"exq {plan}")
            ax.plot([r["tokens"] for r in pr], [r["hbm_floor_us"] for r in pr], ":", color="gray")
        i4 = [r for r in rows if r["plan"] == "int4" and "sglang_default_us" in r]
        if i4:
            ax.plot([r["tokens"] for r in i4], [r["sglang_default_us"] for r in i4], "--x", label="SGLang int4 default")
            ax.plot([r["tokens"] for r in i4], [r["sglang_tuned_us"] for r in i4], "--+", label="SGLang int4 tuned")
        bf = [r for r in rows if "torch_bf16_us" in r]
        if bf:
            ax.plot([r["tokens"] for r in bf], [r["torch_bf16_us"] for r in bf], "--d", label="torch bf16 grouped")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("µs per layer")
        ax.set_title(f"{shape} (dotted: HBM floors)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
