"""`fused_moe`: one op for a whole MoE layer whose experts are each bf16, int8, int4 or int4-asym.

No host sync, CUDA-graph capturable. Tensor-core path: dispatch (pairs sorted by expert), gate_up GEMM with
silu(gate) * up in its epilogue, down GEMM scaled by the routing weights, then a sum over top-k (four launches).
Decode (GEMV) path: gate_up GEMV, then a down GEMV whose last program per output tile sums over top-k (two); or
both GEMVs as the work items of one launch (`GemvConfig.one_launch`, `moe_decode_kernel`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from exq.errors import ExqError
from exq.formats import FORMATS
from exq.kernels import configs
from exq.kernels.configs import KERNEL_FORMATS, Config, GemmConfig, GemvConfig
from exq.kernels.dispatch import dispatch, interpreting, next_pow2
from exq.kernels.moe_gemm import HAS_GDC, moe_gemm_kernel
from exq.kernels.moe_gemv import gemv_reduce_kernel, moe_decode_kernel, moe_gemv_kernel


@dataclass
class KernelBlock:
    """One block (gate_up or down) of a layer as the kernel reads it: per-format slabs + expert -> (format, slot)."""

    out_features: int
    in_features: int
    fmt_slot: torch.Tensor  # int32 [E]: expert e's format code << 24 | its slot in that format's slab
    tensors: dict[str, torch.Tensor]  # _SLOT_NAMES of every format (absent ones: a 1-element placeholder)
    present: frozenset[str]
    # >= 0: every expert has this format code at slot = its id (one format, slabs in id order), so the kernels
    # skip the fmt_slot lookup
    one_format: int = -1

    @property
    def num_experts(self) -> int:
        return self.fmt_slot.numel()

    @cached_property
    def max_expert_bytes(self) -> int:
        """One expert's weight bytes in the widest format present (decides the GEMM's row-block grouping)."""
        return max(FORMATS[f].nbytes(self.out_features, self.in_features) for f in self.present)

    @property
    def outgrows_l2(self) -> bool:
        """An expert's weights too big to stay in L2 while one row block walks its column tiles: the GEMM groups
        row blocks per column tile (configs.GROUP_ROW_BLOCKS), which only its smaller row blocks can use."""
        return self.max_expert_bytes > configs.GROUP_WEIGHT_BYTES

    @cached_property
    def launch_args(self) -> tuple[list[torch.Tensor], dict[str, bool]]:
        """Every format's slab tensors in the kernels' argument order, and the HAS_<format> flags that compile the
        absent formats' branches away (built once per block: the decode launches are a few microseconds)."""
        flags = {"HAS_" + name.upper().replace("-", "_"): name in self.present for name in _SLOT_NAMES}
        return [self.tensors[n] for n in _SLAB_ARGS], flags

    def counters(self, n: int) -> torch.Tensor:
        """At least n int32 counters for `moe_decode_kernel`, which leaves them zeroed: one set per layer (two
        layers never share one; one layer's op runs on one stream at a time), kept for the block's life because a
        CUDA graph holds their address, not the tensor. Under capture with none big enough: a fresh zeroed set
        (a memset in the graph), not kept, since it holds no zeros until the graph first runs."""
        kept = self.__dict__.setdefault("_counters", [])
        if kept and kept[-1].numel() >= n:
            return kept[-1]
        buf = torch.zeros(next_pow2(max(n, 256)), dtype=torch.int32, device=self.fmt_slot.device)
        if not (buf.is_cuda and torch.cuda.is_current_stream_capturing()):
            kept.append(buf)
        return buf

    def nbytes_of(self, experts: torch.Tensor | None = None) -> int:
        """Weight bytes the kernel streams for these experts (all if None): codes, scales, zero points."""
        ids = range(self.num_experts) if experts is None else experts.tolist()
        codes = self.fmt_slot.tolist()
        total = 0
        for e in ids:
            for n in _SLOT_NAMES[_FORMAT_NAMES[codes[e] >> 24]]:
                t = self.tensors[n]
                total += t[0].numel() * t.element_size()
        return total


# the kernels' slab arguments per format (codes, scales, zero points), in their argument order
_SLOT_NAMES = {
    "bf16": ("w16",),
    "int8": ("w8", "s8"),
    "int4": ("w4", "s4"),
    "int4-asym": ("wa", "sa", "za"),
    "int3": ("w3", "s3"),
    "int3-asym": ("w3a", "s3a", "z3a"),
}
_SLAB_ARGS = tuple(n for names in _SLOT_NAMES.values() for n in names)
_FORMAT_NAMES = {code: name for name, code in KERNEL_FORMATS.items()}


def kernel_block(block) -> KernelBlock:
    """View a runtime `QuantizedBlock` (exq.runtime.experts) in the kernel's terms; no copy of the weights."""
    from exq.runtime.experts import slab_key

    e = len(block.order)
    dev = block.position.device
    fmt = torch.empty(e, dtype=torch.int32)
    slot = torch.empty(e, dtype=torch.int32)
    tensors: dict[str, torch.Tensor] = {}
    present = set()
    out_f = in_f = 0
    for name, start, count in block.slab_spec:
        if name not in KERNEL_FORMATS:
            raise ExqError(f"format {name} has no fused kernel", f"kernels run {', '.join(KERNEL_FORMATS)}")
        slab = block.slabs[slab_key(name)]
        out_f, in_f = slab.out_features, slab.in_features
        for pos in range(start, start + count):
            ex = block.order[pos]
            fmt[ex], slot[ex] = KERNEL_FORMATS[name], pos - start
        present.add(name)
        if name == "bf16":
            parts = (slab.weight,)
        else:
            codes = slab.codes.view(torch.int32) if FORMATS[name].bits == 3 else slab.codes  # int3: read as words
            parts = (codes, slab.scales) + (() if FORMATS[name].symmetric else (slab.zeros,))
        tensors.update(zip(_SLOT_NAMES[name], parts, strict=True))
    for names in _SLOT_NAMES.values():
        for n in names:
            tensors.setdefault(n, torch.zeros(1, dtype=torch.uint8, device=dev))
    one = KERNEL_FORMATS[next(iter(present))] if len(present) == 1 and slot.tolist() == list(range(e)) else -1
    return KernelBlock(out_f, in_f, ((fmt << 24) | slot).to(dev), tensors, frozenset(present), one)


def default_config(pairs: int, num_experts: int, block: KernelBlock) -> Config:
    """A fixed rule until the compiler's per-layer table (pass D) names one: the GEMV path while experts see about
    one token each, small row blocks while they see a few, bigger tensor-core tiles once they are many."""
    per_expert = pairs / max(1, num_experts)
    # measured on H100 (docs/perf-notes.md, v6, v9, v10): the CUDA-core GEMV wins for int4 layers at a few pairs;
    # for layers with bf16 / int8 experts the tensor-core GEMV does (1.7x the 16-row GEMM at T = 1, mixed plan;
    # 1.14-1.17x for all-bf16 layers). v13: at pairs = E the 16-row tile wins already (qwen3 T = 16: 107.6 vs
    # 150.1 us), so the GEMV up to E / 2 pairs; layers of few experts (Mixtral: 8) keep it up to E pairs (T = 4)
    int4_only = block.present <= {"int4", "int4-asym"}
    k256 = block.in_features % 256 == 0
    int3 = block.present & {"int3", "int3-asym"}
    # v22 (H100, Mixtral T = 4: 8 pairs on 8 experts of 29-88 MB): the GEMVs read an expert once per pair, from HBM
    # again when it does not stay in L2; the 16-row tile reads it once per row block: 225.6 / 314.0 vs 284.6 / 345.7 us
    # (int4 / mixed; docs/bench/kernels_h100_v22_mixtral-decode.json), so the GEMVs only below a pair per expert there
    shared_big = block.outgrows_l2 and pairs >= num_experts
    if pairs <= max(num_experts // 2, min(num_experts, 16)) and block.in_features % 128 == 0 and not shared_big:
        if 16 <= pairs <= 32 and block.present & {"int4", "int4-asym"} and not int3:
            # v22 (H100, items in grid order): both projections in one launch for 16-32 pairs, int4-only layers
            # too, K steps of two groups where K allows (DeepSeek's down, 11 groups: one): int4 T = 3 / 4 qwen3
            # 35.3 / 43.6 vs 41.9 / 47.9 us (the CUDA-core GEMV in two launches), olmoe 40.9 / 53.3 vs 48.4 / 54.7;
            # mixed T = 2 qwen3 30.7 vs 33.0, olmoe 35.5 vs 39.2 (docs/bench/kernels_h100_v22_decode-*)
            return GemvConfig(64, 2 if k256 else 1, 4, 3, mma=True, one_launch=True)
        if int4_only:
            # v13 (H100, int4, T = 1 / 4): a pair or less per 8 experts takes longer K steps in narrower tiles
            # (olmoe T = 1 21.6 vs 26.4 us); K not a multiple of 256 goes to tensor cores (DeepSeek's 1408:
            # 24.6 vs 34.9 us at T = 1, 59.2 vs 60.4 at T = 4)
            if 8 * pairs <= num_experts and block.in_features % 512 == 0:
                return GemvConfig(32, 4, 4, 2)
            if block.in_features % 256 == 0:
                return GemvConfig(64, 2, 4, 2)
        if int3 and block.in_features % 256 == 0:
            # v15 (H100): int3 experts take longer per K step; K cut in two doubles the programs: olmoe / qwen3
            # T = 1 all-int3 41.5 / 35.7 vs 53.8 / 50.6 us, with 30 % int3 among other formats 46.3 / 40.8 vs
            # 62.8 / 58.0; T = 4 5-15 % (the 8 cells of docs/bench/v15/int3_hybrid_sweep_h100.log)
            return GemvConfig(64, 1, 4, 3, split_k=2, mma=True)
        if (8 * pairs > num_experts or pairs >= 16) and block.present & {"int4", "int4-asym"} and k256:
            # v18 (H100, mixed plan, T = 4): two groups per K step, int4 experts streaming 256 inputs per pipelined
            # step (bf16 / int8 experts keep 128): olmoe 63.6 vs 67.5 us, qwen3 55.5 vs 57.8; at a pair or less per
            # 8 experts (T = 1) one group stays faster (qwen3 22.7 vs 23.3), below 16 pairs (qwen3 T = 2: 33.0 vs
            # 36.1, v19). v19: one launch is slower from 48 pairs (qwen3 T = 6 / 8: 77.7 / 99.7 vs 75.8 / 92.0) and
            # at T = 1 (docs/bench/v19/one_launch_threshold.json)
            return GemvConfig(64, 2, 4, 3, mma=True)
        return GemvConfig(64, 1, 4, 4, mma=True)
    # v14 (H100): layers with int4 experts take two groups per K iteration in 128-column tiles (bf16 / int8 experts
    # keep 128-input steps inside them): int4 2-7 % under the one-group tiles at T = 16-64 on olmoe / qwen3 (qwen3
    # T = 256 too), Mixtral T = 16 / 64 303.6 / 395.8 vs 360.4 / 427.1 us; the mixed plan 3-6 % at T = 16-64 (qwen3
    # T = 256 too). v27: row blocks from the dispatch launch, no longer the inline dispatch (which it beat by 0.95-1.17x
    # in v11): with the sorted one-program dispatch (2.9-5.2 us up to 512 pairs, 8.6-40 before) the same tiles ran
    # 0.5-6.4 us faster than inline in 10 of 12 int4 / mixed cells at T = 16-64 on olmoe / qwen3 / DeepSeek and tied
    # in 2 (qwen3 int4 T = 16 102.1 -> 95.7 us; docs/bench/v27/sorted_dispatch_op_h100.json)
    small = not block.outgrows_l2
    if per_expert <= 16 and block.present & {"int4", "int4-asym"} and block.in_features % 256 == 0:
        if per_expert > 8 and not small:
            # v25 (H100, Mixtral T = 64, 16 rows per expert): experts too big for L2 take 32-row blocks, and a block
            # with up to 16 real rows the 16-row tile in the same launch (small_m): int4 363.9 vs 401.4 us for the
            # 16-row tile, mixed 469.6 vs 499.7 (docs/bench/kernels_h100_v25_mixtral-t64.json). Experts that stay
            # in L2 keep the 16-row tile (qwen3 T = 256: 185.9 vs 193.4 us for 32 rows + 16, v24)
            return GemmConfig(32, 128, 256, 4, 3, small_m=16)
        return GemmConfig(16, 128, 256, 4, 3)
    # v11: programs find their own pairs (no dispatch launch) up to INLINE_DISPATCH_PAIRS: 0.95-1.17x at T = 16-64
    if per_expert <= 8:  # measured (v9): 16-row blocks, 32 + 32 gate/up columns, 4 stages up to T = 64
        return GemmConfig(16, 64, 128, 4, 4, inline_dispatch=True)
    if per_expert <= 16:
        return GemmConfig(16, 128, 128, 4, 4, inline_dispatch=small)
    if per_expert <= 48:  # v11: 32-row blocks at T = 256 (olmoe, DeepSeek: 1.02-1.10x the 16- and 64-row ones)
        # v29 (H100, Qwen1.5-MoE's shape, 60 experts x top-4, int4 T = 256: 1024 pairs, 17 rows per expert, the
        # first bench cell to reach this branch within the inline dispatch's limit): dispatched row blocks 161.9 vs
        # 176.2 us inline, the same tile, one sweep (docs/bench/v29/kernels_h100_qwen1.5-moe.json), as v27 found at
        # T = 16-64; layers without int4 experts keep the inline dispatch (not measured since v11)
        return GemmConfig(32, 128, 128, 4, 3, inline_dispatch=not block.present & {"int4", "int4-asym"})
    # v12: int4 scales folded into the weights (one accumulator) let the 128-row 8-warp tile run without spills:
    # 1.1-1.6x the 64-row tile from T = 1024 (olmoe / qwen3, int4 and mixed); from 64 rows per expert on too (v13,
    # DeepSeek T = 1024, 96 rows: 361 vs 455 us; v14, Mixtral T = 256, 64 rows: 793.2 vs 865.8 us). v24: an
    # expert's last block with up to 16 rows on the 16-row tile, faster or level in all 16 int4 / mixed cells at
    # T = 1024-4096 of the four bench shapes (olmoe int4 T = 1024 383.6 -> 344.9 us, Mixtral 2163.4 -> 2043.4; qwen3
    # 380.8 -> 379.6); not measured for all-bf16 layers, whose tiles are not bound by decoding. v25: below 96 rows
    # per expert an expert's one block mostly holds at most 64 real rows, so those run the 64-row tile instead
    # (small_m 64): qwen3 T = 1024 (64 rows) int4 352.7 vs 379.6 us with small_m 16, mixed 374.4 vs 398.2; Mixtral
    # T = 256 (64 rows) 747.6 vs 811.9, mixed 807.5 vs 867.6; DeepSeek T = 1024 (96 rows) ties (356.5 vs 354.4),
    # from 128 rows 16 wins (olmoe T = 1024 344.9 vs 359.1; every T = 4096 cell)
    if block.present == {"bf16"}:
        return GemmConfig(128, 128, 64, 8, 3, fold_scales=True)
    return GemmConfig(128, 128, 64, 8, 3, fold_scales=True, small_m=64 if per_expert < 96 else 16)


def default_configs(pairs: int, gu: KernelBlock, dn: KernelBlock) -> tuple[Config, Config]:
    """`default_config` for both projections of a layer; one launch only where both rules chose it compatibly."""
    cfg1, cfg2 = default_config(pairs, gu.num_experts, gu), default_config(pairs, dn.num_experts, dn)
    if one_launch_pair(cfg1, cfg2):
        return cfg1, cfg2
    return tuple(replace(c, one_launch=False) if isinstance(c, GemvConfig) else c for c in (cfg1, cfg2))


def _gemm(
    a, c, topk_weights, disp, block: KernelBlock, pairs, a_div, gated, mul_w, cfg: GemmConfig, topk_ids=None,
    finish=None, zero_counters=None, pdl=0,
) -> None:  # fmt: skip
    """disp None: the inline dispatch (programs per expert read topk_ids themselves). finish (down): (out [T, N],
    counters [T x column tiles], top_k): the top-k sum in the epilogue into out. zero_counters (gate_up): the
    counters the down launch after it will count in, zeroed by this launch. pdl (bits): 1 lets the next launch
    start early, 2 launches this one early (it waits for the launch before it first)."""
    import triton

    n_out = block.out_features // 2 if gated else block.out_features
    if block.in_features % cfg.k_step or (cfg.block_k % 128 if cfg.block_k > 128 else 128 % cfg.block_k):
        raise ExqError(
            f"block_k {cfg.block_k} must divide in_features {block.in_features} and be a divisor or a multiple of 128"
        )
    if a.stride(0) != block.in_features:  # the int4 tile reads A rows as int32 words at stride K / 2
        raise ExqError(f"activations must be contiguous rows of {block.in_features}, got stride {a.stride(0)}")
    n_tiles = triton.cdiv(n_out, cfg.block_n // 2 if gated else cfg.block_n)
    if disp is None:
        ids = topk_ids.reshape(-1)
        route_pp = next_pow2(pairs)
        # one scratch row per expert for the kernel's compaction (sorted_ptr); block_expert_ptr is not read
        scratch = torch.empty(block.num_experts * route_pp, dtype=torch.int32, device=a.device)
        grid, sorted_pairs, block_expert = (block.num_experts * n_tiles,), scratch, ids
    else:
        grid, route_pp = (disp.num_blocks * n_tiles,), 0
        sorted_pairs, block_expert = disp.sorted_pairs, disp.block_expert
        ids = sorted_pairs
    dt, magic, ptx = _dot_types(a)
    grouped = disp is not None and cfg.block_m <= configs.GROUP_MAX_BLOCK_M and block.outgrows_l2
    group = configs.GROUP_ROW_BLOCKS if grouped else 1
    slabs, has = block.launch_args
    out, counters, finish_k = finish if finish is not None else (c, topk_weights, 0)
    zero_cnt, zch = 0, 0
    if zero_counters is not None:
        counters, zero_cnt = zero_counters, zero_counters.numel()
        zch = max(16, next_pow2(-(-zero_cnt // grid[0])))
    moe_gemm_kernel[grid](
        a, a.view(torch.int32), c, topk_weights, sorted_pairs, block_expert, ids, block.fmt_slot, *slabs, out, counters,
        pairs, block.num_experts, a.stride(0), c.stride(0), zero_cnt,
        N=block.out_features, K=block.in_features, A_DIV=a_div, GATED=gated, MUL_W=mul_w, **has,
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, DT=dt,
        MAGIC_BITS=magic[0], MAGIC_BASE=magic[1], INTERLEAVE=cfg.block_m >= 64, PTX=ptx,
        ROUTE_PP=route_pp,
        FOLD=cfg.fold_scales, GROUP=group, ONE_FORMAT=block.one_format, FINISH_K=finish_k, ZCH=zch,
        SMALL_M=cfg.small_m,  # 0 with the inline dispatch (_check_config)
        PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl & 2 else {}),
    )  # fmt: skip


def _dot_types(a: torch.Tensor):
    """The tensor-core operand type for these activations, the nibble decode's magic (exponent bits, value) and
    whether the decode may use its PTX block (NVIDIA GPUs; the interpreter runs the plain Triton expression)."""
    import triton.language as tl

    dt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[a.dtype]
    if interpreting() and dt == tl.bfloat16:
        dt = tl.float32  # bf16 tl.dot is wrong in the interpreter; fp32 is exact there (fp16 is fine)
    magic = {tl.bfloat16: (0x4300, 128), tl.float16: (0x6400, 1024)}.get(dt, (0, 0))
    return dt, magic, magic[0] != 0 and not interpreting() and torch.version.hip is None


def _gemv(
    a, c, topk_weights, topk_ids, block: KernelBlock, a_div, gated, mul_w, cfg: GemvConfig, counters, zero_nt=0
) -> None:
    """Decode path. gate_up (gated): c is [P, I]; zero_nt > 0 also zeroes `counters` (zero_nt per token) for the
    down launch that follows. Down: c is the final [T, H] output, the top-k sum and any split-K reduction done by
    the last program of each (token, column tile), counted in `counters` (zeroed beforehand)."""
    import triton

    split = cfg.split_k
    _check_gemv_k(block, cfg)
    pairs = topk_ids.numel()
    top_k = topk_ids.shape[-1]
    n_out = block.out_features // 2 if gated else block.out_features
    ws = c
    if split > 1 or not gated:
        ws = torch.empty(split, pairs, block.out_features, dtype=torch.float32, device=a.device)
    grid = (pairs, triton.cdiv(n_out, cfg.block_n // 2 if gated else cfg.block_n), split)
    dt, magic, ptx = _dot_types(a)
    slabs, has = block.launch_args
    moe_gemv_kernel[grid](
        a, a.view(torch.int32), c, ws, counters, topk_weights, topk_ids.reshape(-1), block.fmt_slot, *slabs,
        block.num_experts, pairs,
        N=block.out_features, K=block.in_features, A_BF16=a.dtype == torch.bfloat16, A_DIV=a_div, GATED=gated,
        MUL_W=mul_w, **has,
        BN=cfg.block_n, GPS=cfg.groups_per_step, SPLIT=split, TOP_K=top_k, KSP=triton.next_power_of_2(top_k * split),
        ZERO_NT=zero_nt, ZERO_NTP=triton.next_power_of_2(max(zero_nt, 1)),
        MMA=cfg.mma, DT=dt, MAGIC_BITS=magic[0], MAGIC_BASE=magic[1], PTX=ptx, ONE_FORMAT=block.one_format,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if gated and split > 1:
        gemv_reduce_kernel[(pairs, triton.cdiv(n_out, 256))](ws, c, pairs, N=block.out_features, SPLIT=split, BN=256)


def _check_gemv_k(block: KernelBlock, cfg: GemvConfig) -> None:
    if block.in_features % cfg.k_step:
        raise ExqError(
            f"the GEMV path needs in_features ({block.in_features}) divisible by 128 x groups_per_step x split_k "
            f"({cfg.k_step})"
        )


def _decode_one_launch(
    hidden, inter, topk_weights, topk_ids, gu: KernelBlock, dn: KernelBlock, cfg1: Config, cfg2: Config
) -> torch.Tensor:
    """Both GEMVs as one launch of work items (`moe_decode_kernel`); its counters live in a workspace that every
    launch leaves zeroed."""
    import triton

    if not one_launch_pair(cfg1, cfg2):
        raise ExqError(
            f"one_launch runs both projections in one kernel: it needs it set on both GEMV configs, split_k 1 and "
            f"the same num_warps / num_stages / expert_order, got {cfg1}, {cfg2}",
            "set one_launch on both projections' configs with matching warps, stages and expert_order, or on neither",
        )
    _check_gemv_k(gu, cfg1)
    _check_gemv_k(dn, cfg2)
    t, h = hidden.shape
    k = topk_ids.shape[1]
    p = t * k
    nt1 = triton.cdiv(dn.in_features, cfg1.block_n // 2)
    nt2 = triton.cdiv(h, cfg2.block_n)
    sync = gu.counters(p + 1 + t * nt2)
    ws = torch.empty(1, p, h, dtype=torch.float32, device=hidden.device)
    final = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    dt, magic, ptx = _dot_types(hidden)
    slabs1, has1 = gu.launch_args
    slabs2, has2 = dn.launch_args
    flags = {"G_" + n[4:]: v for n, v in has1.items()} | {"D_" + n[4:]: v for n, v in has2.items()}
    moe_decode_kernel[(p * (nt1 + nt2),)](
        hidden, hidden.view(torch.int32), inter, inter.view(torch.int32), final, ws, sync[p + 1 :], sync,
        topk_weights, topk_ids.reshape(-1), gu.fmt_slot, *slabs1, dn.fmt_slot, *slabs2, gu.num_experts, p,
        H=h, INTER=dn.in_features, A_BF16=hidden.dtype == torch.bfloat16, TOP_K=k, KP=triton.next_power_of_2(k),
        **flags,
        BN1=cfg1.block_n, GPS1=cfg1.groups_per_step, MMA1=cfg1.mma, ONE1=gu.one_format,
        BN2=cfg2.block_n, GPS2=cfg2.groups_per_step, MMA2=cfg2.mma, ONE2=dn.one_format,
        DT=dt, MAGIC_BITS=magic[0], MAGIC_BASE=magic[1], PTX=ptx, TICKET=not grid_order_dispatch(),
        SORT_PP=next_pow2(p) if cfg1.expert_order and p <= configs.EXPERT_ORDER_MAX_PAIRS else 0,
        num_warps=cfg1.num_warps, num_stages=cfg1.num_stages,
    )  # fmt: skip
    return final


def grid_order_dispatch() -> bool:
    """Whether the one-launch decode may take its work items in grid order, i.e. blocks of a 1-D grid start in
    increasing order: NVIDIA GPUs (CUB's single-pass scan relies on it) and the interpreter (sequential); elsewhere
    the kernel draws an atomic ticket per program instead."""
    return torch.version.hip is None


def one_launch_pair(cfg1, cfg2) -> bool:
    """Whether (gate_up, down) configs can run as one launch: both one-launch GEMVs without split K, at the kernel's
    one num_warps / num_stages / item order."""
    if not all(isinstance(c, GemvConfig) and c.one_launch and c.split_k == 1 for c in (cfg1, cfg2)):
        return False
    return (cfg1.num_warps, cfg1.num_stages, cfg1.expert_order) == (cfg2.num_warps, cfg2.num_stages, cfg2.expert_order)


def fused_moe(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts,
    activation: str = "silu",
    config: Config | tuple[Config, Config] | None = None,
    expert_parallel: bool = False,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t, j].

    experts: a runtime `QuantizedExperts` module, or a (gate_up, down) pair of `KernelBlock`s.
    config: one `GemmConfig` / `GemvConfig` for both GEMMs, a (gate_up, down) pair, or None for `default_config`.
    expert_parallel: topk_ids may hold ids outside [0, E) (experts of other ranks); they contribute nothing.
    """
    if activation != "silu":
        raise ExqError(f"activation {activation!r} is not supported by the fused kernel", "use silu")
    gu, dn = experts if isinstance(experts, tuple) else kernel_blocks(experts)
    topk_ids = _check_inputs(hidden, topk_weights, topk_ids, gu, dn)
    t, h = hidden.shape
    k = topk_ids.shape[1]
    p = t * k
    if isinstance(config, tuple) and len(config) == 2:
        cfg1, cfg2 = config
    elif config is not None:
        cfg1 = cfg2 = config
    else:
        cfg1, cfg2 = default_configs(p, gu, dn)
    _check_config(cfg1)
    _check_config(cfg2)
    hidden = hidden.contiguous()
    topk_weights = topk_weights.reshape(-1).contiguous()
    inter = torch.empty(p, dn.in_features, dtype=hidden.dtype, device=hidden.device)
    if any(isinstance(c, GemvConfig) and c.one_launch for c in (cfg1, cfg2)):
        return _decode_one_launch(hidden, inter, topk_weights, topk_ids, gu, dn, cfg1, cfg2)
    if isinstance(cfg2, GemvConfig):
        # down finishes the top-k sum itself (last program per token and column tile): two launches at decode
        nt = -(-h // cfg2.block_n)
        zero_nt = nt if isinstance(cfg1, GemvConfig) else 0  # the gate_up GEMV zeroes the counters
        counters = (torch.empty if zero_nt else torch.zeros)(t * nt, dtype=torch.int32, device=hidden.device)
        if zero_nt:
            _gemv(hidden, inter, topk_weights, topk_ids, gu, k, True, False, cfg1, counters, zero_nt)
        else:
            dispatched = _dispatches(topk_ids, gu, p, cfg1)
            _run_gemm(hidden, inter, topk_weights, topk_ids, gu, p, k, True, False, cfg1, dispatched)
        final = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
        _gemv(inter, final, topk_weights, topk_ids, dn, 1, False, True, cfg2, counters)
        return final
    # the down launch finishes the top-k sum itself (its last program per token and column tile, v17) for row blocks
    # up to TOPK_SUM_MAX_BLOCK_M; not with expert parallelism: pairs routed outside [0, E) are computed by no
    # program, so their rows must read as zero and be summed afterwards
    finish = not expert_parallel and cfg2.block_m <= configs.TOPK_SUM_MAX_BLOCK_M
    counters = None
    if finish:  # zeroed by a gate_up GEMM launch, by torch before a GEMV one
        alloc = torch.zeros if isinstance(cfg1, GemvConfig) else torch.empty
        counters = alloc(t * -(-h // cfg2.block_n), dtype=torch.int32, device=hidden.device)
    pdl, early = _pdl_edges(cfg1, cfg2, gu, dn, hidden.device, expert_parallel)
    dispatched = _dispatches(topk_ids, gu, p, cfg1, cfg2, pdl=early)
    early = early and any(d.pdl for d in dispatched.values())
    if isinstance(cfg1, GemvConfig):
        _gemv(hidden, inter, topk_weights, topk_ids, gu, k, True, False, cfg1, counters=topk_ids)  # unused
    else:
        _run_gemm(hidden, inter, topk_weights, topk_ids, gu, p, k, True, False, cfg1, dispatched,
                  zero_counters=counters, pdl=(1 if pdl else 0) | (2 if early else 0))  # fmt: skip
    out = (torch.zeros if expert_parallel else torch.empty)(p, h, dtype=hidden.dtype, device=hidden.device)
    if not finish:
        _run_gemm(inter, out, topk_weights, topk_ids, dn, p, 1, False, True, cfg2, dispatched, pdl=2 if pdl else 0)
        return out.view(t, k, h).sum(dim=1)
    final = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    _run_gemm(inter, out, topk_weights, topk_ids, dn, p, 1, False, True, cfg2, dispatched, finish=(final, counters, k),
              pdl=2 if pdl else 0)  # fmt: skip
    return final


def _check_inputs(hidden, topk_weights, topk_ids, gu: KernelBlock, dn: KernelBlock) -> torch.Tensor:
    """Shapes, dtypes and devices the kernels rely on, checked on the host before any launch (a mismatch would read
    or write out of bounds). Returns the ids as int32. Ids outside [0, E) are not checked (that needs a device
    sync): they contribute nothing with expert_parallel=True and are undefined otherwise."""
    if hidden.dtype not in (torch.bfloat16, torch.float16):
        raise ExqError(f"fused_moe takes bf16 or fp16 activations, got {hidden.dtype}", "cast hidden first")
    if hidden.dim() != 2:
        raise ExqError(f"hidden must be [tokens, hidden_size], got shape {tuple(hidden.shape)}", "flatten the batch")
    t, h = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ExqError(
            f"topk_ids must be [tokens, top_k] with tokens = {t} (hidden's rows), got shape {tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ExqError(f"topk_ids must hold int32 / int64 expert ids, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ExqError(
            f"topk_weights must be floating point and shaped like topk_ids {tuple(topk_ids.shape)}, got "
            f"{topk_weights.dtype} {tuple(topk_weights.shape)}"
        )
    if gu.num_experts != dn.num_experts:
        raise ExqError(f"gate_up has {gu.num_experts} experts but down has {dn.num_experts}", "pass one layer's pair")
    if gu.in_features != h or dn.out_features != h or gu.out_features != 2 * dn.in_features:
        raise ExqError(
            f"expert shapes gate_up {gu.out_features}x{gu.in_features}, down {dn.out_features}x"
            f"{dn.in_features} do not fit hidden size {h}"
        )
    devices = {hidden.device, topk_ids.device, topk_weights.device, gu.fmt_slot.device, dn.fmt_slot.device}
    if len(devices) > 1:
        raise ExqError(f"fused_moe's inputs and experts are on different devices: {sorted(map(str, devices))}")
    return topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)


def _check_config(cfg) -> None:
    """Tile sizes the kernels can compile: powers of two, tensor-core minimums (16), gate/up halves."""

    def pow2(n) -> bool:
        return isinstance(n, int) and n > 0 and n & (n - 1) == 0

    if isinstance(cfg, GemmConfig):
        ok = (
            all(pow2(v) for v in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps))
            and min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16
            and isinstance(cfg.inline_dispatch, bool)
            and isinstance(cfg.fold_scales, bool)
            and isinstance(cfg.small_m, int)
            and (cfg.small_m == 0 or (pow2(cfg.small_m) and 16 <= cfg.small_m < cfg.block_m))
            and not (cfg.small_m and cfg.inline_dispatch)
        )
    elif isinstance(cfg, GemvConfig):
        ok = all(pow2(v) for v in (cfg.block_n, cfg.groups_per_step, cfg.num_warps)) and cfg.block_n >= 16
        ok = ok and isinstance(cfg.split_k, int) and cfg.split_k >= 1
        ok = ok and all(isinstance(f, bool) for f in (cfg.mma, cfg.one_launch, cfg.expert_order))
        ok = ok and (cfg.one_launch or not cfg.expert_order)
    else:
        raise ExqError(f"config must be a GemmConfig, a GemvConfig or a (gate_up, down) pair, got {cfg!r}")
    if not ok or cfg.num_stages < 1:
        raise ExqError(
            f"{cfg} cannot compile",
            "tile sizes and warps are powers of two, tiles at least 16, stages at least 1, flags True / False, "
            "small_m 0 or a power of two from 16 below block_m (dispatched blocks: not with inline_dispatch)",
        )


def _run_gemm(
    a, c, topk_weights, topk_ids, block, p, a_div, gated, mul_w, cfg: GemmConfig, dispatched, **epilogue
) -> None:
    """The tensor-core path: the inline dispatch up to INLINE_DISPATCH_PAIRS pairs, beyond it the row blocks of
    `_dispatches`. epilogue: `_gemm`'s finish / zero_counters / pdl."""
    if _inline(cfg, p):
        _gemm(a, c, topk_weights, None, block, p, a_div, gated, mul_w, cfg, topk_ids, **epilogue)
        return
    _gemm(a, c, topk_weights, dispatched[cfg.block_m], block, p, a_div, gated, mul_w, cfg, **epilogue)


def _inline(cfg: GemmConfig, pairs: int) -> bool:
    return cfg.inline_dispatch and pairs <= configs.INLINE_DISPATCH_PAIRS


def _dispatches(topk_ids, block: KernelBlock, pairs: int, *cfgs, pdl: bool = False) -> dict:
    """One dispatch per row-block size among these configs' GEMMs, shared by both projections and all made before
    the first GEMM launch: a programmatic dependent launch pairs with the launch just before it, so nothing may come
    between gate_up and down. pdl: the last one lets the launch after it (gate_up) start early. The chunk-sorted
    dispatch draws its tickets from the layer's counters (zero between calls, one layer on one stream at a time)."""
    sizes = list(dict.fromkeys(c.block_m for c in cfgs if isinstance(c, GemmConfig) and not _inline(c, pairs)))
    ticket = block.counters(1) if sizes else None
    return {bm: dispatch(topk_ids, block.num_experts, bm, pdl=pdl and bm == sizes[-1], ticket=ticket) for bm in sizes}


PDL = True  # a switch for A/B timing; fused_moe decides per layer where it applies
PDL_DISPATCH = True  # the same for gate_up launched early after the one-launch dispatch (v27)


def _pdl_edges(cfg1, cfg2, gu: KernelBlock, dn: KernelBlock, device, expert_parallel: bool = False):
    """Which launches of a tensor-core layer start early on Hopper, each waiting for the launch before it in its
    first instruction: (down after gate_up, v26, for row blocks up to configs.PDL_MAX_BLOCK_M; gate_up after the
    one-launch dispatch, v27: 0.3-0.8 % at T = 16-64 on olmoe / qwen3 / DeepSeek). Neither for experts that outgrow
    L2 (Mixtral: up to 1.3 / 1.1 % slower)."""
    if not (PDL and isinstance(cfg1, GemmConfig) and _has_pdl(device)) or gu.outgrows_l2 or dn.outgrows_l2:
        return False, False
    down = isinstance(cfg2, GemmConfig) and cfg2.block_m <= configs.PDL_MAX_BLOCK_M and not expert_parallel
    return down, PDL_DISPATCH


def _has_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper and later NVIDIA GPUs, with Triton's grid dependency control."""
    if interpreting() or device.type != "cuda":
        return False
    return _pdl_gpu(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _pdl_gpu(index: int) -> bool:  # once per GPU: fused_moe asks on every call
    return HAS_GDC and torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def kernel_blocks(experts) -> tuple[KernelBlock, KernelBlock]:
    """(gate_up, down) views of a runtime QuantizedExperts, built once and kept on the module."""
    cached = getattr(experts, "_kernel_blocks", None)
    if cached is None:
        cached = (kernel_block(experts.gate_up), kernel_block(experts.down))
        experts._kernel_blocks = cached
    return cached
