"""How close to the copy-bandwidth floor can a decode-size MoE layer get at all? (GPU only.)

`exq bench kernels` divides the bytes a layer touches by the bandwidth of a 1 GiB device copy. At T <= 64 a layer
streams 9-105 MB in two dependent launches (gate_up, then down), each shorter than the time a GPU takes to reach its
full bandwidth. This script times kernels that do nothing but read those same bytes (each touched expert's codes and
scales once, summed into one word per program so the loads are not removed), laid out as the real op's programs
are, in the same 8-layer CUDA graph and routing as the benchmark. Their time is a ceiling for any kernel of that
structure: ceiling % = HBM floor / stream time.

Variants: `two` (gate_up stream, then down stream: the real op's dependency), `one` (both in one launch, no
dependency: the bound of any single-launch design). Each is the best over a small sweep of tile sizes.

    python benchmarks/stream_ceiling.py --shapes olmoe-1b-7b qwen3-30b-a3b --tokens 1 4 16 64 --output out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from exq.bench import PLANS, SHAPES
from exq.bench.kernels import graph_time_us, measure_floors, routing, touched_bytes
from exq.fileio import atomic_write_bytes


@triton.jit
def _stream_block(ids_ptr, w_ptr, s_ptr, out_ptr, item, tile, sink, P,
                  N: tl.constexpr, WW: tl.constexpr, SB: tl.constexpr, SBP: tl.constexpr, PP: tl.constexpr,
                  BY_PAIR: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):  # fmt: skip
    """Read rows [tile * BR, +BR) of one touched expert's codes (WW int32 words a row, BW per step) and scales
    (SB bytes a row)."""
    q = tl.arange(0, PP)
    ids = tl.load(ids_ptr + q, mask=q < P, other=-1)
    if BY_PAIR:  # item = a pair: read its expert only at its first occurrence
        e = tl.load(ids_ptr + item)
        run = tl.sum(((ids == e) & (q < item)).to(tl.int32), axis=0) == 0
    else:  # item = an expert: read it only if some pair routes to it
        e = item
        run = tl.sum((ids == e).to(tl.int32), axis=0) > 0
    if run:
        rows = tile * BR + tl.arange(0, BR)
        cols = tl.arange(0, BW)
        base = w_ptr + e.to(tl.int64) * N * WW + rows[:, None].to(tl.int64) * WW
        acc = tl.zeros((BR, BW), dtype=tl.int32)
        for c0 in range(0, WW, BW):
            acc ^= tl.load(base + c0 + cols[None, :], mask=c0 + cols[None, :] < WW, other=0)
        sc = tl.arange(0, SBP)
        s = tl.load(s_ptr + e.to(tl.int64) * N * SB + rows[:, None] * SB + sc[None, :], mask=sc[None, :] < SB, other=0)
        tot = tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0) ^ tl.sum(tl.sum(s.to(tl.int32), axis=1), axis=0)
        tl.store(out_ptr + sink, tot)


@triton.jit
def stream_kernel(ids_ptr, w1, s1, w2, s2, out_ptr, P,
                  N1: tl.constexpr, WW1: tl.constexpr, SB1: tl.constexpr, SBP1: tl.constexpr, T1: tl.constexpr,
                  N2: tl.constexpr, WW2: tl.constexpr, SB2: tl.constexpr, SBP2: tl.constexpr, T2: tl.constexpr,
                  PP: tl.constexpr, BY_PAIR: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):  # fmt: skip
    """Grid (items, T1 + T2 tiles): tiles below T1 read block 1, the others block 2 (T2 = 0: one block only)."""
    item = tl.program_id(0)
    tile = tl.program_id(1)
    sink = item * (T1 + T2) + tile  # one word per program, so the loads stay
    if tile < T1:
        _stream_block(ids_ptr, w1, s1, out_ptr, item, tile, sink, P, N1, WW1, SB1, SBP1, PP, BY_PAIR, BR, BW)
    else:
        _stream_block(ids_ptr, w2, s2, out_ptr, item, tile - T1, sink, P, N2, WW2, SB2, SBP2, PP, BY_PAIR, BR, BW)


def _launch(ids, blocks, out, br, bb, warps, stages):
    p, e = ids.numel(), blocks[0][0].shape[0]
    by_pair = p <= e
    (w1, s1), (w2, s2) = blocks if len(blocks) == 2 else (blocks[0], blocks[0])
    t1 = w1.shape[1] // br
    t2 = w2.shape[1] // br if len(blocks) == 2 else 0
    grid = (p if by_pair else e, t1 + t2)
    stream_kernel[grid](
        ids, w1, s1, w2, s2, out, p,
        N1=w1.shape[1], WW1=w1.shape[2], SB1=s1.shape[2], SBP1=triton.next_power_of_2(s1.shape[2]), T1=t1,
        N2=w2.shape[1], WW2=w2.shape[2], SB2=s2.shape[2], SBP2=triton.next_power_of_2(s2.shape[2]), T2=t2,
        PP=triton.next_power_of_2(p), BY_PAIR=by_pair, BR=br, BW=bb // 4, num_warps=warps, num_stages=stages,
    )  # fmt: skip


TILES = [(16, 256, 4, 2), (32, 256, 4, 2), (32, 512, 4, 2), (64, 256, 4, 2), (32, 256, 8, 3), (64, 512, 8, 2)]


def _time(ids, blocks, split: bool, tile, layers: int, reps: int) -> float:
    """Per-layer time of the stream: gate_up then down in two launches (split), or both in one."""
    out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")

    def step(j):
        if split:
            _launch(ids[j], blocks[j][:1], out, *tile)
            _launch(ids[j], blocks[j][1:], out, *tile)
        else:
            _launch(ids[j], blocks[j], out, *tile)

    return graph_time_us(step, layers, reps)


def _shape(name: str, tokens, layers: int, reps: int, copy_bytes_per_s: float) -> list[dict]:
    from exq.kernels.synthetic import mixed_formats, random_experts

    e, h, i, k = SHAPES[name]
    mods = [random_experts(e, h, i, mixed_formats(e, PLANS["int4"], seed=s), device="cuda", seed=s)
            for s in range(layers)]  # fmt: skip
    blocks = [
        [(m.gate_up.slabs["int4"].codes.view(torch.int32), m.gate_up.slabs["int4"].scales.view(torch.uint8)),
         (m.down.slabs["int4"].codes.view(torch.int32), m.down.slabs["int4"].scales.view(torch.uint8))]
        for m in mods
    ]  # fmt: skip
    rows = []
    for t in tokens:
        routes = [routing(t, e, k, seed=1000 * t + s) for s in range(layers)]
        ids = [r[1].reshape(-1) for r in routes]
        floor = statistics.mean(touched_bytes(m, r[1], h, i) for m, r in zip(mods, routes, strict=True))
        floor_us = 1e6 * floor / copy_bytes_per_s
        row = {"shape": name, "tokens": t, "hbm_floor_us": floor_us, "two": {}, "one": {}}
        for tile in TILES:
            if (2 * i) % tile[0] or h % tile[0]:
                continue
            key = "BR{} BB{} w{} s{}".format(*tile)
            row["two"][key] = _time(ids, blocks, True, tile, layers, reps)
            row["one"][key] = _time(ids, blocks, False, tile, layers, reps)
        for v in ("two", "one"):
            row[f"{v}_us"] = min(row[v].values())
            row[f"{v}_ceiling_pct"] = 100 * floor_us / row[f"{v}_us"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("stream_ceiling.py times GPU kernels: run it on a machine with a CUDA GPU")
    floors = measure_floors()
    rows = []
    for name in args.shapes:
        rows += _shape(name, args.tokens, args.layers, args.reps, floors.copy_bytes_per_s)
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "copy_TB_per_s": floors.copy_bytes_per_s / 1e12}
    atomic_write_bytes(args.output, json.dumps({"meta": meta, "rows": rows}, indent=1).encode())


if __name__ == "__main__":
    main()
