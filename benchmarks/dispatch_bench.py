"""Each form of the token dispatch alone, by batch size: the one-program sort, chunks sorted side by side in one
launch (per chunk size and warps), the three-launch chunked form, and what `dispatch` picks. (GPU only.)

    python benchmarks/dispatch_bench.py --output docs/bench/v28/dispatch_alone_h100.json

Each cell: every form's output compared bit for bit with the torch dispatch, then timed as `exq bench kernels` times
a layer (a CUDA graph of 8 dispatches of different routings, median of 50), in alternating rounds; the best round is
reported, in µs per dispatch. The routing is the benchmark's (softmax top-k of random logits). A plot of µs against
pairs per (experts, top-k, block_m) is written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from exq.bench.kernels import graph_time_us, routing
from exq.fileio import atomic_write, atomic_write_bytes
from exq.kernels import dispatch as dispatch_mod

SORT_MAX = 4096  # the one-program sort past this many pairs is far off (24.6 us at 2048 on 64 experts, v27)


def forms(pairs: int, chunks: list[int], warps: list[int]) -> dict:
    out = {"dispatch": dispatch_mod.dispatch, "chunked": dispatch_mod.dispatch_chunked}
    if pairs <= SORT_MAX:
        out["sorted"] = dispatch_mod.dispatch_sorted
    for c in chunks:
        for w in warps:
            if c < pairs:
                out[f"chunk{c}_w{w}"] = lambda i, e, b, c=c, w=w: dispatch_mod.dispatch_sorted(i, e, b, w, chunk=c)
    return out


def cell(experts: int, k: int, tokens: int, block_m: int, chunks, warps, rounds: int) -> dict:
    ids = [routing(tokens, experts, k, seed=100 * tokens + s)[1] for s in range(8)]
    want = dispatch_mod.dispatch_torch(ids[0], experts, block_m)
    fns = forms(tokens * k, chunks, warps)
    us: dict = {n: [] for n in fns}
    for name, fn in fns.items():
        got = fn(ids[0], experts, block_m)
        if not (torch.equal(got.sorted_pairs, want.sorted_pairs) and torch.equal(got.block_expert, want.block_expert)):
            raise SystemExit(f"{name} differs from the torch dispatch at {experts}x{k} T={tokens} block_m={block_m}")
    for rnd in range(rounds):
        for name, fn in fns.items() if rnd % 2 == 0 else reversed(fns.items()):
            us[name].append(graph_time_us(lambda j, fn=fn: fn(ids[j], experts, block_m), len(ids), 50))
    return {"experts": experts, "top_k": k, "tokens": tokens, "pairs": tokens * k, "block_m": block_m, "us": us,
            "best": {n: min(v) for n, v in us.items()}}  # fmt: skip


def experts_top_k(text: str) -> tuple[int, int]:
    """'64x8' -> (64, 8), for argparse."""
    try:
        e, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give experts x top-k, e.g. 64x8") from None
    if not 0 < k <= e:
        raise argparse.ArgumentTypeError(f"{text!r}: top-k must be from 1 to the number of experts")
    return e, k


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["experts"], r["top_k"], r["block_m"]) for r in rows})
    names = sorted({n for r in rows for n in r["best"]}, key=lambda n: (n != "dispatch", n))
    colors = {n: "k" if n == "dispatch" else f"C{i}" for i, n in enumerate(names)}  # one color per form everywhere
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (e, k, bm) in zip(axes[0], groups, strict=True):
        mine = [r for r in rows if (r["experts"], r["top_k"], r["block_m"]) == (e, k, bm)]
        mine.sort(key=lambda r: r["pairs"])
        for n in names:
            pts = [(r["pairs"], r["best"][n]) for r in mine if n in r["best"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=n, color=colors[n],
                        lw=2.5 if n == "dispatch" else 1)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
        ax.set(xlabel="pairs (tokens x top-k)", ylabel="µs per dispatch", title=f"{e} experts, top-{k}, block_m {bm}")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts-top-k", nargs="+", type=experts_top_k, default=[(64, 8), (128, 8), (256, 8)],
                    help="experts x top-k, e.g. 64x8")  # fmt: skip
    ap.add_argument("--tokens", nargs="+", type=int, default=[64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--block-m", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--chunks", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output", type=Path, required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dispatch_bench times CUDA graphs: run it on a machine with an NVIDIA GPU")
    out = {"version": 1, "device": torch.cuda.get_device_name(), "rows": []}
    for e, k in a.experts_top_k:
        for bm in a.block_m:
            for t in a.tokens:
                r = cell(e, k, t, bm, a.chunks, a.warps, a.rounds)
                out["rows"].append(r)
                best = min(r["best"], key=r["best"].get)
                print(f"{e:3d}x{k} bm {bm:3d} T {t:5d} ({t * k:6d} pairs): best {best} {r['best'][best]:.1f} | "
                      + " ".join(f"{n} {v:.1f}" for n, v in r["best"].items()), flush=True)  # fmt: skip
                atomic_write_bytes(a.output, json.dumps(out, indent=1).encode())  # progress survives a time limit
    plot(out["rows"], a.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
