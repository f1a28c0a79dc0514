"""Where the fused op stands against the issue's H100 targets, drawn from `exq bench kernels` results.

    python benchmarks/kernel_status.py \
        docs/bench/kernels_h100_v21_{olmoe-1b-7b,qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b}.json \
        docs/bench/kernels_h100_v22_{t4,mixed-t34-order,mixtral-decode}.json \
        docs/bench/kernels_h100_v24_{olmoe-1b-7b,qwen3-30b-a3b,deepseek-v2-lite,mixtral-8x7b}.json \
        docs/bench/kernels_h100_v25_mixtral-t{64,256,4096}.json --output docs/bench/kernels_h100_status.png

Each (shape, plan, T) cell's figure comes from the last file given that measured it (the ratio to SGLang's default
only from rows that timed SGLang in the same run), as the targets table in docs/kernels.md takes them. Prints the
cells as a markdown table (--by-batch: a row per shape and plan, the table docs/kernels.md opens with) and writes a
plot of the three target figures with their target lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exq.bench.report import TARGET_TOKENS, read_result, status_by_batch, status_cells, status_plot
from exq.errors import ExqError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="bench results, oldest first")
    ap.add_argument("--output", required=True, type=Path, help="the plot (PNG)")
    ap.add_argument("--by-batch", action="store_true", help="one row per shape and plan, a column per T (kernels.md)")
    a = ap.parse_args()
    try:
        results = [read_result(p) for p in a.results]
        devices = {r["device"] for r in results}
        if len(devices) > 1:
            raise SystemExit(f"the results come from several GPUs ({', '.join(sorted(devices))}): give one GPU's")
        cells = status_cells(results)
        if not cells:
            raise SystemExit(f"no int4 / mixed rows at the issue's batch sizes ({TARGET_TOKENS}) in these results")
        if a.by_batch:
            print(status_by_batch(cells))
        else:
            print("| shape | plan | T | % of HBM floor | x SGLang default | % of compute floor |")
            print("|---|---|---|---|---|---|")
            for (shape, plan, t), c in sorted(cells.items()):
                x = f"{c['x_sglang']:.2f}" if "x_sglang" in c else "-"
                print(f"| {shape} | {plan} | {t} | {c['floor_pct']:.1f} | {x} | {c['compute_pct']:.1f} |")
        print(f"wrote {status_plot(cells, devices.pop(), a.output)}")
    except ExqError as err:  # a missing or malformed result, an output path that is a folder: no traceback
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
