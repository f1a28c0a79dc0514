"""`exq bench kernels`: the fused MoE op against the HBM floor, SGLang's Triton INT4 path and a bf16 grouped GEMM.

Every figure is per MoE layer: a CUDA graph runs the op over L distinct layers (weights stream from HBM, not L2) and
is replayed `reps` times; the median replay / L is the layer time. Floors are measured in the same run: HBM floor =
bytes of the experts the routing touches (codes, scales, zero points) plus activations, over the device-to-device copy
bandwidth; compute floor = 2 * pairs * 3 * H * I flops over a large bf16 matmul's rate.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exq.bench import PLANS, SHAPES, group_quantized
from exq.kernels.configs import INLINE_DISPATCH_PAIRS, GemmConfig, GemvConfig


@dataclass
class Floors:
    copy_bytes_per_s: float  # read + write bytes of a device-to-device copy
    bf16_flops: float  # dense bf16 matmul rate


def measure_floors() -> Floors:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _median_ms(lambda: dst.copy_(src), 20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tm = _median_ms(lambda: a @ b, 20)
    return Floors(2 * n / (t * 1e-3), 2 * 8192**3 / (tm * 1e-3))


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def graph_time_us(step: Callable[[int], object], layers: int, reps: int) -> float:
    """Median per-layer time of a CUDA graph that runs step(0..layers-1) once each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(layers):  # warm-up: compiles and autotunes outside the capture
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(layers):
            step(i)
    ms = _median_ms(g.replay, reps)
    del g
    return 1e3 * ms / layers


def routing(tokens: int, experts: int, k: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen, device="cuda")
    w, ids = torch.topk(logits.softmax(-1), k)
    return (w / w.sum(-1, keepdim=True)).to(torch.bfloat16), ids.to(torch.int32)


def touched_bytes(layer, ids: torch.Tensor, hidden: int, inter: int) -> int:
    from exq.kernels import kernel_blocks

    gu, dn = kernel_blocks(layer)
    used = torch.unique(ids)
    act = 2 * (ids.shape[0] * hidden * 2 + ids.numel() * inter * 2)  # x in, out; intermediate written and read
    return gu.nbytes_of(used) + dn.nbytes_of(used) + act


def torch_grouped_bf16(x, w, ids, w1, w2):
    """bf16 reference speed: sort pairs by expert, torch._grouped_mm for both GEMMs, index_add over top-k."""
    k = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat)
    tok = order // k
    counts = torch.zeros(w1.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = counts.cumsum(0, dtype=torch.int32)
    h = torch._grouped_mm(x[tok], w1.transpose(1, 2), offs=offs)
    g, u = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)
    y = y * w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, y)


OUR_CONFIGS = [  # (block_m, block_n, block_k, warps, stages)
    (16, 32, 128, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 3),
    (16, 128, 128, 4, 4),  # v11: T = 64 with the inline dispatch (qwen3, mixed plans)
    (16, 64, 128, 4, 5),
    (16, 128, 256, 4, 3),  # v14: two groups per K iteration, int4 at T = 16-64
    (32, 64, 128, 4, 3),
    (32, 128, 128, 4, 3),  # v11: the best at T = 256 on olmoe and DeepSeek
    (32, 128, 256, 4, 3),  # v16: Mixtral T = 64 (16 rows per expert; 390.3 vs 395.9 us for the 16-row tile)
    (64, 64, 128, 4, 3),
    (64, 128, 128, 4, 3),  # v9: the best from T = 256 on
    (64, 128, 64, 4, 3),  # v12: with the scales folded, T = 256-512
    (64, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
]
# tile -> the small_m values timed with it (fold_scales as the tile's row count asks)
SMALL_TILES = {(32, 128, 128, 4, 3): (16,), (32, 128, 256, 4, 3): (16,), (64, 128, 64, 4, 3): (16,),
               (128, 128, 64, 8, 3): (16, 64)}  # fmt: skip
GEMV_CONFIGS = [  # (block_n, groups_per_step, warps, stages, split_k, mma[, one_launch])
    (32, 1, 4, 2, 1, False),
    (64, 1, 4, 2, 1, False),
    (64, 2, 4, 2, 1, False),
    (128, 2, 8, 2, 1, False),
    (32, 4, 4, 2, 1, False),
    (32, 4, 4, 3, 1, False),  # v15: gate_up at T = 1 (olmoe, qwen3)
    (32, 1, 4, 2, 2, False),
    (32, 1, 4, 2, 4, False),
    (64, 1, 4, 2, 4, False),
    (32, 2, 4, 2, 4, False),
    (32, 1, 4, 2, 8, False),
    (16, 2, 4, 2, 1, False),
    (32, 2, 4, 2, 1, False),
    (32, 2, 4, 2, 2, False),
    (64, 2, 4, 2, 2, False),
    (64, 2, 8, 2, 1, False),
    (128, 1, 8, 2, 1, False),
    (64, 4, 8, 2, 1, False),
    # tensor cores (any plan): a 16-row tile per pair, one group per K step
    (32, 1, 4, 4, 1, True),
    (64, 1, 4, 4, 1, True),
    (64, 1, 4, 3, 2, True),
    (128, 1, 4, 3, 1, True),
    (128, 1, 4, 4, 2, True),
    (64, 1, 4, 4, 4, True),
    (64, 2, 4, 3, 1, True),  # v18: two groups per K step (mixed plan, T = 4)
    # v19: both projections in one launch (mixed plan, T = 4)
    (64, 2, 4, 3, 1, True, True),
    (64, 1, 4, 3, 1, True, True),
]
SGL_CONFIGS = [  # BLOCK_SIZE_M, N, K, GROUP_SIZE_M, num_warps, num_stages
    (16, 32, 64, 1, 4, 3),
    (16, 64, 64, 1, 4, 4),
    (16, 64, 128, 1, 4, 3),
    (16, 128, 128, 1, 4, 3),
    (32, 64, 128, 1, 4, 3),
    (64, 64, 64, 8, 4, 3),
    (64, 128, 64, 8, 4, 3),
    (64, 128, 128, 8, 8, 3),
    (128, 128, 64, 8, 8, 3),
]


def _fits(block_m: int, pairs: int, experts: int) -> bool:
    """Prune configs whose row block is far from the tokens per active expert (they cannot win)."""
    per = pairs / min(experts, pairs)
    return block_m <= max(16, 4 * per) and block_m >= min(64, per / 8)


def default_candidates(plan: str, tokens: int, shape) -> list:
    """The configurations a sweep times for one cell: tensor-core row blocks that fit the rows per expert, and at
    decode sizes the GEMV paths (CUDA-core GEMV for group-quantized experts only: with bf16 / int8 experts it is far
    slower)."""
    from exq.compiler.specialize import fit_config

    e, h, i, k = shape
    tiles = [c for c in OUR_CONFIGS if _fits(c[0], tokens * k, e)]
    out = [GemmConfig(*c) for c in tiles]
    if plan != "bf16":  # int4 scales folded into the weights: one accumulator, what the 64- and 128-row tiles need
        out += [GemmConfig(*c, fold_scales=True) for c in tiles if c[0] >= 64]
    # an expert's partial last block on a smaller tile (v24: 16 rows under the 32-row and the folded prefill tile;
    # v25: under the two-group 32-row tile, and 64 rows under the prefill tile, for experts of about 64 rows)
    out += [GemmConfig(*c, fold_scales=plan != "bf16" and c[0] >= 64, small_m=m) for c, rows in SMALL_TILES.items()
            if c in tiles for m in rows]  # fmt: skip
    if tokens * k <= INLINE_DISPATCH_PAIRS:  # the same row blocks without the dispatch launch
        out += [GemmConfig(*c, inline_dispatch=True) for c in tiles if c[0] <= 32]
    if tokens * k <= 4 * e:
        out += [GemvConfig(*c) for c in GEMV_CONFIGS if group_quantized(plan) or c[5]]
    # each projection's K step fitted to its own K (a pair where they differ), as pass D fits the table's configs
    return list(dict.fromkeys(fit_config(c, h, i) for c in out))


def layer_stack(shape: str | tuple, plan: str, layers: int = 8) -> list:
    """Distinct random layers of one bench shape (a name or its sizes) and plan, so a graph over them streams
    weights from HBM."""
    from exq.kernels.synthetic import mixed_formats, random_experts

    e, h, i, _ = SHAPES[shape] if isinstance(shape, str) else shape
    shares = PLANS[plan]
    return [random_experts(e, h, i, mixed_formats(e, shares, seed=s), device="cuda", seed=s) for s in range(layers)]


def bench_shape(
    name: str, shape: tuple, tokens, layers: int, reps: int, sgl, floors: Floors, log, plans, candidates=None
):  # fmt: skip
    e, h, i, k = shape
    rows = []
    for plan in plans:
        mods = layer_stack(shape, plan, layers)
        for t in tokens:
            x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
            routes = [routing(t, e, k, seed=1000 * t + s) for s in range(layers)]
            row = {"shape": name, "dims": list(shape), "plan": plan, "tokens": t, "pairs": t * k}
            cands = (candidates or default_candidates)(plan, t, (e, h, i, k))
            row |= bench_layer(x, routes, mods, plan, (e, h, i, k), layers, reps, sgl, floors, cands)
            rows.append(row)
            log(row)
        del mods
        torch.cuda.empty_cache()
    return rows


def config_name(cfg) -> str:
    """How a sweep names a config in its JSON (`exq.kernels.tuning.parse_bench_config` reads it back); a
    (gate_up, down) pair as 'A + B'."""
    if isinstance(cfg, tuple):
        return " + ".join(map(config_name, cfg))
    return type(cfg).__name__ + str(tuple(cfg.as_dict().values()))


def per_projection(best, best_us: float, candidates, time_us: Callable[[object], float]) -> dict:
    """Up to mid batch sizes gate_up (K = hidden) and down (K = intermediate) may each want their own tile: each
    candidate of the best one's kind (GEMV or tensor-core GEMM) timed for one projection with the best config
    (best_us for both) on the other, then the pair of the two winners when both differ from it. Returns
    {(gate_up, down): time} of everything timed (that pair last). v14: GEMV tiles at T = 1 / 4 (qwen3 T = 4 49.7
    -> 45.4 us); v16: GEMM tiles at T = 16 (olmoe down 16 x 128 x 128, 4 stages: 96.0 -> 94.4 us)."""
    same = [c for c in candidates if type(c) is type(best) and c != best and _shares_launch(c, best)]
    times = {}
    gate_up = down = (best_us, best)
    for c in same:
        us = times[c, best] = time_us((c, best))
        gate_up = min(gate_up, (us, c), key=lambda z: z[0])
        us = times[best, c] = time_us((best, c))
        down = min(down, (us, c), key=lambda z: z[0])
    if gate_up[1] != best and down[1] != best:  # else the winners' pair is already timed
        times[gate_up[1], down[1]] = time_us((gate_up[1], down[1]))
    return times


def _shares_launch(a, b) -> bool:
    """Whether a and b can be the two projections' configs: one-launch GEMVs only pair with each other, and only as
    the kernel can run them (`one_launch_pair`)."""
    from exq.kernels.moe_op import one_launch_pair

    one = getattr(a, "one_launch", False)
    return one == getattr(b, "one_launch", False) and (not one or one_launch_pair(a, b))


def default_configs(plan: str, tokens: int, shape) -> tuple:
    """The (gate_up, down) configs `fused_moe` picks without one for this cell (its default rule), from the
    shape and the plan's formats alone: what `exq_default_us` timed."""
    from exq.kernels.moe_op import KernelBlock
    from exq.kernels.moe_op import default_configs as layer_defaults

    e, h, i, k = shape
    present = frozenset(f for f, share in PLANS[plan].items() if share > 0)
    ids = torch.zeros(e, dtype=torch.int32)
    gu, dn = (KernelBlock(o, n, ids, {}, present) for o, n in ((2 * i, h), (h, i)))
    return layer_defaults(tokens * k, gu, dn)


def bench_layer(x, routes, mods, plan: str, shape, layers: int, reps: int, sgl, floors: Floors, candidates) -> dict:
    from exq.kernels import fused_moe

    e, h, i, k = shape
    t = x.shape[0]
    floor_bytes = statistics.mean(touched_bytes(m, r[1], h, i) for m, r in zip(mods, routes, strict=True))
    row = {
        "hbm_floor_us": 1e6 * floor_bytes / floors.copy_bytes_per_s,
        "compute_floor_us": 1e6 * 2 * t * k * 3 * h * i / floors.bf16_flops,
        "bytes_touched": floor_bytes,
    }

    def ours(cfg):
        return graph_time_us(lambda j: fused_moe(x, routes[j][0], routes[j][1], mods[j], config=cfg), layers, reps)

    ours(None)  # thrown away: the first graph timed in a cell read 0-5 us high at decode sizes (v22)
    row["exq_default_us"] = ours(None)
    row["exq_default_config"] = [config_name(c) for c in default_configs(plan, t, shape)]
    best = (row["exq_default_us"], None)
    row["exq_sweep"] = {}  # every candidate's time, to see how far the runners-up are
    from triton.runtime.errors import OutOfResources

    for cfg in candidates:
        name = config_name(cfg)
        try:  # raised at the eager warm-up launch, before any graph capture
            us = ours(cfg)
        except OutOfResources as err:  # a tile too big for this GPU (e.g. shared memory with bf16 experts)
            row.setdefault("exq_skipped", {})[name] = str(err).split(".")[0]
            continue
        row["exq_sweep"][name] = us
        best = min(best, (us, cfg), key=lambda z: z[0])
    if isinstance(best[1], GemvConfig | GemmConfig) and t * k <= INLINE_DISPATCH_PAIRS:  # a tile per projection
        ran = [c for c in candidates if config_name(c) in row["exq_sweep"]]
        for pair, us in per_projection(best[1], best[0], ran, ours).items():
            row["exq_sweep"][config_name(pair)] = us
            best = min(best, (us, pair), key=lambda z: z[0])
    row["exq_us"], row["exq_config"] = (
        best[0],
        None if best[1] is None else config_name(best[1]),
    )
    if plan == "int4" and sgl is not None:
        row |= bench_sglang(sgl, x, routes, mods, e, h, i, k, layers, reps)
    if plan == "bf16":
        w1 = [m.gate_up.dequantized(torch.bfloat16) for m in mods]
        w2 = [m.down.dequantized(torch.bfloat16) for m in mods]
        try:
            row["torch_bf16_us"] = graph_time_us(
                lambda j: torch_grouped_bf16(x, routes[j][0], routes[j][1], w1[j], w2[j]), layers, reps
            )
        except (RuntimeError, AttributeError) as err:
            row["torch_bf16_error"] = str(err)[:200]
    row["exq_pct_of_hbm_floor"] = 100 * row["hbm_floor_us"] / row["exq_us"]
    return row


def bench_sglang(sgl, x, routes, mods, e, h, i, k, layers, reps) -> dict:
    from exq.bench.sglang_ref import align, gemm

    t = x.shape[0]
    p = t * k
    slabs = [(m.gate_up.slabs["int4"], m.down.slabs["int4"]) for m in mods]
    inter1 = torch.empty(p, 2 * i, dtype=x.dtype, device=x.device)
    inter2 = torch.empty(p, i, dtype=x.dtype, device=x.device)
    out = torch.empty(p, h, dtype=x.dtype, device=x.device)

    def run(cfg: dict):
        aligned = [align(r[1], e, cfg["BLOCK_SIZE_M"]) for r in routes]

        def step(j):
            (gu, dn), (w, _ids), (sid, eid, post) = slabs[j], routes[j], aligned[j]
            wf = w.reshape(-1)
            gemm(sgl, x, gu.codes, inter1, gu.scales, wf, sid, eid, post, p, False, k, cfg)
            torch.mul(F.silu(inter1[:, :i]), inter1[:, i:], out=inter2)
            gemm(sgl, inter2, dn.codes, out, dn.scales, wf, sid, eid, post, p, True, 1, cfg)
            return out.view(t, k, h).sum(dim=1)

        return graph_time_us(step, layers, reps)

    default = sgl.default_config(t, e, 2 * i, h, k, "int4_w4a16", False, [0, 128])
    res = {"sglang_default_us": run(default), "sglang_default_config": default}
    best = (res["sglang_default_us"], default)
    for c in SGL_CONFIGS:
        if _fits(c[0], p, e):
            cfg = dict(zip(("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M"), c[:4], strict=True))
            cfg |= {"num_warps": c[4], "num_stages": c[5]}
            us = run(cfg)
            best = min(best, (us, cfg), key=lambda z: z[0])
    res["sglang_tuned_us"], res["sglang_tuned_config"] = best
    return res


def check_against_sglang(sgl, log) -> float:
    """Same weights, same routing: SGLang's INT4 path and exq's op agree (a check that the baseline runs right)."""
    from exq.kernels import fused_moe
    from exq.kernels.synthetic import random_experts

    e, h, i, k = 16, 512, 256, 4
    m = random_experts(e, h, i, ["int4"] * e, device="cuda", seed=7)
    x = torch.randn(9, h, dtype=torch.bfloat16, device="cuda")
    w, ids = routing(9, e, k, 3)
    ours = fused_moe(x, w, ids, m)
    from exq.bench.sglang_ref import align, gemm

    cfg = sgl.default_config(9, e, 2 * i, h, k, "int4_w4a16", False, [0, 128])
    sid, eid, post = align(ids, e, cfg["BLOCK_SIZE_M"])
    gu, dn = m.gate_up.slabs["int4"], m.down.slabs["int4"]
    c1 = torch.empty(9 * k, 2 * i, dtype=x.dtype, device="cuda")
    gemm(sgl, x, gu.codes, c1, gu.scales, w.reshape(-1), sid, eid, post, 9 * k, False, k, cfg)
    a = F.silu(c1[:, :i]) * c1[:, i:]
    c2 = torch.empty(9 * k, h, dtype=x.dtype, device="cuda")
    gemm(sgl, a, dn.codes, c2, dn.scales, w.reshape(-1), sid, eid, post, 9 * k, True, 1, cfg)
    theirs = c2.view(9, k, h).sum(1)
    err = float((ours.float() - theirs.float()).norm() / theirs.float().norm())
    log({"check": "exq vs sglang int4 on identical weights", "relative_error": err})
    return err


def run(
    shapes: dict[str, tuple] | list[str],
    tokens,
    layers: int,
    reps: int,
    sglang_wheel: str | None,
    output: Path,
    plans=tuple(PLANS),
    candidates=None,
) -> dict:
    """shapes: names of `SHAPES` or {name: (E, H, I, k)} (`exq.bench.shapes.resolve_shapes`).
    candidates(plan, tokens, (E, H, I, k)) -> configs to sweep per cell (default: `default_candidates`)."""
    if not isinstance(shapes, dict):
        shapes = {n: SHAPES[n] for n in shapes}
    if not torch.cuda.is_available():
        from exq.errors import ExqError

        raise ExqError("exq bench kernels needs a CUDA GPU", "run it on a GPU machine with the gpu extra installed")
    from exq.bench import sglang_ref

    def log(row):
        print(json.dumps(row, default=str), flush=True)

    floors = measure_floors()
    log({"copy_TB_per_s": floors.copy_bytes_per_s / 1e12, "bf16_TFLOP_per_s": floors.bf16_flops / 1e12})
    sgl = sglang_ref.load(sglang_wheel) if sglang_wheel else None
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "sglang": sgl.version if sgl else None,
        "layers_per_graph": layers,
        "reps": reps,
        "floors": vars(floors),
        "rows": [],
    }
    if sgl is not None:
        result["sglang_check_relative_error"] = check_against_sglang(sgl, log)
    for name, shape in shapes.items():
        result["rows"] += bench_shape(name, shape, tokens, layers, reps, sgl, floors, log, plans, candidates)
    output.parent.mkdir(parents=True, exist_ok=True)
    from exq.fileio import atomic_write_bytes

    atomic_write_bytes(output, json.dumps(result, indent=1, default=str).encode())
    return result
