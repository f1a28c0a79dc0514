"""Where a decode-sized MoE layer's time goes: each launch of `fused_moe` timed alone in a CUDA graph.

    python benchmarks/kernel_breakdown.py [--shape olmoe-1b-7b] [--tokens 1 4] [--output docs/bench/breakdown.json]
    python benchmarks/kernel_breakdown.py --ab [--shapes ...] [--tokens 1 4] --output ab.json

Pieces (per layer, 8 distinct layers per graph like `exq bench kernels`): the whole op; gate_up alone; down alone;
the top-k sum alone (gate_up includes the dispatch on the GEMM path); and an empty Triton kernel, the fixed cost of
one launch inside a graph. Each GEMM piece is also reported as bytes of the weights it streams over its time.

--ab: only the whole op at the tuned table's configuration of each (shape, plan, T), plus the list of device
kernels one call launches (torch.profiler). It uses nothing but `fused_moe` and the table, so the same script
times an older tree (PYTHONPATH=that tree's copy) for a before / after on one machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from exq.bench import SHAPES
from exq.bench.kernels import config_name, graph_time_us, measure_floors, routing
from exq.kernels import kernel_blocks
from exq.kernels.configs import GemmConfig, GemvConfig
from exq.kernels.dispatch import dispatch
from exq.kernels.moe_op import _gemm, _gemv, fused_moe
from exq.kernels.synthetic import random_experts


@triton.jit
def _empty(x_ptr):
    pid = tl.program_id(0)
    if pid < 0:
        tl.store(x_ptr, 0)


def measure(t, mods, blocks, shape, layers, reps, floors) -> list[dict]:
    e, h, i, k = shape
    rows = []
    x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
    routes = [routing(t, e, k, seed=1000 * t + s) for s in range(layers)]
    p = t * k
    inter = torch.empty(p, i, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(p, h, dtype=torch.bfloat16, device="cuda")
    final = torch.empty(t, h, dtype=torch.bfloat16, device="cuda")
    counters = torch.zeros(t * h, dtype=torch.int32, device="cuda")  # >= tokens x column tiles of any config
    for name, cfg in (("gemv", GemvConfig(32, 1, 4, 2)), ("gemm16", GemmConfig(16, 64, 128, 4, 4))):
        row = {"tokens": t, "path": name}

        def gate_up(j, cfg=cfg):
            w, ids = routes[j]
            if isinstance(cfg, GemvConfig):
                return _gemv(x, inter, w.reshape(-1), ids, blocks[j][0], k, True, False, cfg, counters)
            d = dispatch(ids, e, cfg.block_m)
            return _gemm(x, inter, w.reshape(-1), d, blocks[j][0], p, k, True, False, cfg)

        def down(j, cfg=cfg):
            w, ids = routes[j]
            if isinstance(cfg, GemvConfig):  # the top-k sum included; counters reset by each call's last programs
                counters.zero_()
                return _gemv(inter, final, w.reshape(-1), ids, blocks[j][1], 1, False, True, cfg, counters)
            d = dispatch(ids, e, cfg.block_m)
            return _gemm(inter, y, w.reshape(-1), d, blocks[j][1], p, 1, False, True, cfg)

        row["whole_us"] = graph_time_us(lambda j, cfg=cfg: fused_moe(x, *routes[j], mods[j], config=cfg), layers, reps)
        row["gate_up_us"] = graph_time_us(gate_up, layers, reps)
        row["down_us"] = graph_time_us(down, layers, reps)
        if name == "gemm16":
            row["dispatch_us"] = graph_time_us(lambda j: dispatch(routes[j][1], e, 16), layers, reps)
        row["sum_us"] = graph_time_us(lambda j: y.view(t, k, h).sum(dim=1), layers, reps)  # GEMM path only
        used = [torch.unique(r[1]) for r in routes]
        gu_bytes = sum(b[0].nbytes_of(u) for b, u in zip(blocks, used, strict=True)) / layers
        dn_bytes = sum(b[1].nbytes_of(u) for b, u in zip(blocks, used, strict=True)) / layers
        row["gate_up_TB_per_s"] = gu_bytes / row["gate_up_us"] / 1e6
        row["down_TB_per_s"] = dn_bytes / row["down_us"] / 1e6
        row["floor_us"] = 1e6 * (gu_bytes + dn_bytes) / floors.copy_bytes_per_s
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def device_kernels(fn) -> list[str]:
    """Names of the device kernels (and memsets / copies) one call of fn launches."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _ab_cell(t, cfg, mods, shape, layers, reps) -> dict:
    e, h, _, k = shape
    x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
    routes = [routing(t, e, k, seed=1000 * t + s) for s in range(layers)]
    return {
        "config": config_name(cfg),
        "kernels": device_kernels(lambda: fused_moe(x, *routes[0], mods[0], config=cfg)),
        "whole_us": graph_time_us(lambda j: fused_moe(x, *routes[j], mods[j], config=cfg), layers, reps),
    }


def ab(shapes, tokens, plans, layers, reps) -> list[dict]:
    """The whole op at the tuned configuration of each cell, and the kernels one call launches."""
    from exq.bench import PLANS
    from exq.kernels.synthetic import mixed_formats
    from exq.kernels.tuning import config_from_dict, packaged_tables

    tables = packaged_tables()
    table = tables.get(torch.cuda.get_device_name()) or tables["NVIDIA H100 80GB HBM3"]
    rows = []
    for name in shapes:
        e, h, i, _ = SHAPES[name]
        for plan in plans:
            mods = [
                random_experts(e, h, i, mixed_formats(e, PLANS[plan], seed=s), device="cuda", seed=s)
                for s in range(layers)
            ]
            for t in tokens:
                entry = next(x for x in table["entries"] if (x["shape"], x["class"], x["tokens"]) == (name, plan, t))
                row = {"shape": name, "plan": plan, "tokens": t}
                row |= _ab_cell(t, config_from_dict(entry["config"]), mods, SHAPES[name], layers, reps)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del mods
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--output", type=Path, default=Path("runs/bench/breakdown.json"))
    ap.add_argument("--ab", action="store_true", help="whole op at the tuned configs + kernel list only")
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b"], choices=list(SHAPES))
    ap.add_argument("--plans", nargs="+", default=["int4", "mixed"])
    a = ap.parse_args()
    if a.ab:
        out = {"device": torch.cuda.get_device_name(), "rows": ab(a.shapes, a.tokens, a.plans, a.layers, a.reps)}
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(out, indent=1))
        return
    e, h, i, _ = SHAPES[a.shape]
    floors = measure_floors()
    mods = [random_experts(e, h, i, ["int4"] * e, device="cuda", seed=s) for s in range(a.layers)]
    blocks = [kernel_blocks(m) for m in mods]
    scratch = torch.zeros(1, device="cuda")
    out = {"device": torch.cuda.get_device_name(), "shape": a.shape, "copy_bytes_per_s": floors.copy_bytes_per_s}
    out["empty_launch_us"] = graph_time_us(lambda j: _empty[(132,)](scratch), a.layers, a.reps)
    rows = [r for t in a.tokens for r in measure(t, mods, blocks, SHAPES[a.shape], a.layers, a.reps, floors)]
    out["rows"] = rows
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(out, indent=1))
    print(json.dumps({"empty_launch_us": out["empty_launch_us"]}))


if __name__ == "__main__":
    main()
