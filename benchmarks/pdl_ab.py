"""The fused op with and without the down GEMM launched as a programmatic dependent of gate_up (`moe_op.PDL`, v26),
at the tuned table's configuration of each (shape, plan, T), in one process. (GPU only.)

    python benchmarks/pdl_ab.py --shapes olmoe-1b-7b qwen3-30b-a3b deepseek-v2-lite --plans int4 mixed \
        --tokens 16 64 256 1024 4096 --output docs/bench/v26/pdl_down_ab_h100.json

Each cell: both settings' outputs compared bit for bit, then each timed as `exq bench kernels` times a layer (CUDA
graph over 8 layers' weights, median of 50) in alternating rounds; the best round of each is reported. Cells the
table has no entry for are skipped; `fused_moe` decides per layer whether PDL applies (printed as `pdl`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from exq.bench import PLANS, SHAPES
from exq.bench.kernels import graph_time_us, layer_stack, measure_floors, routing, touched_bytes
from exq.compiler.specialize import fit_config
from exq.fileio import atomic_write_bytes
from exq.kernels import fused_moe, moe_op
from exq.kernels.tuning import config_from_dict, layer_class, packaged_tables


def cell(name: str, plan: str, t: int, mods, entry, floors, rounds: int) -> dict:
    e, h, i, k = SHAPES[name]
    cfg = fit_config(config_from_dict(entry["config"]), h, i)
    c1, c2 = cfg if isinstance(cfg, tuple) else (cfg, cfg)
    gu, dn = moe_op.kernel_blocks(mods[0])
    applies = moe_op._pdl_edges(c1, c2, gu, dn, torch.device("cuda"))[0]
    routes = [routing(t, e, k, seed=1000 * t + s) for s in range(len(mods))]
    xs = [torch.randn(t, h, dtype=torch.bfloat16, device="cuda") for _ in mods]
    floor = statistics.mean(touched_bytes(m, r[1], h, i) for m, r in zip(mods, routes, strict=True))
    outs = {}
    for flag in (False, True):
        moe_op.PDL = flag
        outs[flag] = fused_moe(xs[0], *routes[0], mods[0], config=cfg)
    us: dict = {"off": [], "on": []}
    for rnd in range(rounds):
        for flag in (False, True) if rnd % 2 == 0 else (True, False):
            moe_op.PDL = flag
            us["on" if flag else "off"].append(
                graph_time_us(lambda j: fused_moe(xs[j], *routes[j], mods[j], config=cfg), len(mods), 50)
            )
    moe_op.PDL = True
    return {"shape": name, "plan": plan, "tokens": t, "config": str(cfg), "pdl": applies,
            "bit_equal": bool(torch.equal(outs[False], outs[True])),
            "hbm_floor_us": 1e6 * floor / floors.copy_bytes_per_s, "us": us,
            "best": {kk: min(v) for kk, v in us.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v2-lite"],
                    choices=list(SHAPES))  # fmt: skip
    ap.add_argument("--plans", nargs="+", default=["int4", "mixed"], choices=["int4", "mixed"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[16, 64, 256, 1024])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output", type=Path, required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pdl_ab.py times GPU kernels: run it on a machine with a CUDA GPU")
    table = next(iter(packaged_tables().values()))
    floors = measure_floors()
    rows = []
    for name in a.shapes:
        for plan in a.plans:
            mods = layer_stack(name, plan)
            cls = layer_class({f for f, s in PLANS[plan].items() if s > 0})
            for t in a.tokens:
                entry = [x for x in table["entries"] if (x["class"], x["shape"], x["tokens"]) == (cls, name, t)]
                if not entry:
                    continue
                r = cell(name, plan, t, mods, entry[0], floors, a.rounds)
                off, on = r["best"]["off"], r["best"]["on"]
                print(f"{name:17s} {plan:5s} T={t:5d} pdl={r['pdl']!s:5s} same bits={r['bit_equal']}  "
                      f"off {off:8.1f} us  on {on:8.1f} us ({100 * (on / off - 1):+.1f} %)", flush=True)  # fmt: skip
                rows.append(r)
            del mods
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "copy_TB_per_s": floors.copy_bytes_per_s / 1e12}
    atomic_write_bytes(a.output, json.dumps({"meta": meta, "rows": rows}, indent=1).encode())


if __name__ == "__main__":
    main()
