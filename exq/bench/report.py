"""Tables and plots of `exq bench kernels` results."""

from __future__ import annotations

from pathlib import Path

from exq.errors import FormatError
from exq.fileio import atomic_write, read_json

# the batch sizes and targets (H100): % of the HBM floor at T <= 64, x SGLang's default int4 path at every
# T, % of the bf16 roofline from T = 1024
TARGET_FLOOR_PCT, TARGET_X_SGLANG, TARGET_COMPUTE_PCT = 70.0, 4.0, 50.0
TARGET_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)


def read_result(path: str | Path) -> dict:
    """An `exq bench kernels` / kernel_sweep.py result file, checked for what the readers use."""
    r = read_json(Path(path), "benchmark result")
    if not isinstance(r, dict) or not isinstance(r.get("rows"), list) or "device" not in r:
        raise FormatError(f"{path} is not an `exq bench kernels` result (no device / rows)")
    return r


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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def status_cells(results: list[dict]) -> dict:
    """(shape, plan, T) -> each target's figure, from the last result (in the order given) that measured it: % of the
    HBM floor, x SGLang's default (int4 rows timed with SGLang in the same run), % of the compute floor. The
    issue's batch sizes and its two quantized plans only."""
    cells: dict = {}
    for r in results:
        for row in r["rows"]:
            if row.get("plan") not in ("int4", "mixed") or row.get("tokens") not in TARGET_TOKENS:
                continue
            try:
                c = cells.setdefault((row["shape"], row["plan"], row["tokens"]), {})
                c["floor_pct"] = 100 * row["hbm_floor_us"] / row["exq_us"]
                c["compute_pct"] = 100 * row["compute_floor_us"] / row["exq_us"]
                if row.get("sglang_default_us"):
                    c["x_sglang"] = row["sglang_default_us"] / row["exq_us"]
            except (KeyError, TypeError, ZeroDivisionError) as err:
                raise FormatError(f"a bench row lacks a usable {err} ({row})", "re-run `exq bench kernels`") from err
    return cells


def status_by_batch(cells: dict) -> str:
    """`status_cells` as one markdown row per (shape, plan) and a column per T: each cell's figure against its
    target, the % of the HBM floor below T = 1024 and of the compute floor ("cf") from it, then (int4) x SGLang's
    default. Shapes in the bench's order, others after them."""
    from exq.bench import SHAPES

    tokens = sorted({t for _, _, t in cells})
    known = list(SHAPES)
    order = sorted(dict.fromkeys((s, p) for s, p, _ in cells), key=lambda sp: (
        known.index(sp[0]) if sp[0] in known else len(known), sp[0], ("int4", "mixed").index(sp[1])))  # fmt: skip
    lines = ["| shape | plan | " + " | ".join(f"T = {t}" for t in tokens) + " |", "|---|---|" + "---|" * len(tokens)]
    for shape, plan in order:
        out = []
        for t in tokens:
            c = cells.get((shape, plan, t))
            if c is None:
                out.append("-")
                continue
            cell = f"{c['compute_pct']:.1f} % cf" if t >= 1024 else f"{c['floor_pct']:.1f} %"
            out.append(cell + (f", {c['x_sglang']:.2f}×" if "x_sglang" in c else ""))
        lines.append(f"| {shape} | {plan} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def status_plot(cells: dict, device: str, path: str | Path) -> Path:
    """Three panels, one line per (shape, plan), each against its target line: % of the HBM floor at T <= 64, x
    SGLang's default int4 path at every T, % of the compute floor from T = 256."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("floor_pct", "% of HBM floor", lambda t: t <= 64, TARGET_FLOOR_PCT),
        ("x_sglang", "int4: x SGLang's default int4 path", lambda t: True, TARGET_X_SGLANG),
        ("compute_pct", "% of bf16 compute floor", lambda t: t >= 256, TARGET_COMPUTE_PCT),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    shapes = list(dict.fromkeys(s for s, _, _ in cells))
    colors = {s: f"C{i}" for i, s in enumerate(shapes)}
    for ax, (key, label, keep, target) in zip(axes, panels, strict=True):
        for shape, plan in dict.fromkeys((s, p) for s, p, _ in cells):
            pts = sorted(
                (t, c[key]) for (s, p, t), c in cells.items() if (s, p) == (shape, plan) and keep(t) and key in c
            )
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], "-o" if plan == "int4" else "--s",
                        color=colors[shape], ms=4, label=f"{shape} {plan}")  # fmt: skip
        ax.axhline(target, color="black", lw=1, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(f"{label} (target {target:g})")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"exq fused MoE op against the targets, {device}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
