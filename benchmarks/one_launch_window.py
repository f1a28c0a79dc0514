"""Where one launch for both decode projections pays: the tensor-core GEMV tiles of the mixed plan's default rule,
in two launches and in one (`GemvConfig.one_launch`), over a range of token counts.

    python benchmarks/one_launch_window.py --shapes olmoe-1b-7b qwen3-30b-a3b --tokens 2 3 4 6 8 \
        --output docs/bench/v19/one_launch_threshold.json

Each cell timed as `exq bench kernels` times it (CUDA graph over 8 layers' weights, median of the replays, the HBM
floor from the copy bandwidth measured in the same run); `default_us` is the op's default rule for that cell.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exq.bench import PLANS, SHAPES
from exq.fileio import atomic_write_bytes

TWO_GROUPS = dict(block_n=64, groups_per_step=2, num_warps=4, num_stages=3, mma=True)


def main() -> None:
    import torch

    from exq.bench.kernels import config_name, graph_time_us, measure_floors, routing, touched_bytes
    from exq.kernels import GemvConfig, fused_moe
    from exq.kernels.moe_op import default_configs, kernel_blocks
    from exq.kernels.synthetic import mixed_formats, random_experts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["olmoe-1b-7b", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[2, 3, 4, 6, 8])
    ap.add_argument("--plan", choices=list(PLANS), default="mixed")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--output", type=Path, default=Path("runs/bench/one_launch_window.json"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("one_launch_window.py times CUDA kernels: run it on a machine with a GPU")
    if min(a.tokens) < 1 or a.reps < 1:
        raise SystemExit(f"--tokens and --reps must be at least 1, got {a.tokens} and {a.reps}")
    one_down = GemvConfig(64, 1, 4, 3, mma=True, one_launch=True)
    configs = {
        "two (64,2,4,3)": GemvConfig(**TWO_GROUPS),
        "one (64,2,4,3)": GemvConfig(**TWO_GROUPS, one_launch=True),
        "two (64,1,4,4)": GemvConfig(64, 1, 4, 4, mma=True),
        "one (64,2)+(64,1)": (GemvConfig(**TWO_GROUPS, one_launch=True), one_down),
    }
    floors = measure_floors()
    rows = []
    for name in a.shapes:
        e, h, i, k = SHAPES[name]
        shares = PLANS[a.plan]
        mods = [random_experts(e, h, i, mixed_formats(e, shares, seed=s), device="cuda", seed=s) for s in range(8)]
        for t in a.tokens:
            x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
            routes = [routing(t, e, k, seed=1000 * t + s) for s in range(8)]

            def ours(cfg, x=x, routes=routes, mods=mods) -> float:
                return graph_time_us(lambda j: fused_moe(x, *routes[j], mods[j], config=cfg), 8, a.reps)

            touched = sum(touched_bytes(m, r[1], h, i) for m, r in zip(mods, routes, strict=True)) / len(mods)
            row = {"shape": name, "plan": a.plan, "tokens": t, "pairs": t * k,
                   "hbm_floor_us": 1e6 * touched / floors.copy_bytes_per_s,
                   "default": [config_name(c) for c in default_configs(t * k, *kernel_blocks(mods[0]))],
                   "default_us": ours(None)}  # fmt: skip
            row |= {key: ours(cfg) for key, cfg in configs.items()}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del mods
        torch.cuda.empty_cache()
    a.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(a.output, json.dumps(rows, indent=1).encode())


if __name__ == "__main__":
    main()
