"""Token dispatch on the device: (token, slot) pairs sorted by expert, each expert padded to whole row blocks.

The GEMM kernels give each program one block of `block_m` rows that all use one expert, so every expert's weights
are read once per block. Shapes depend only on (pairs, experts, block_m), never on the routing, so the whole op can
be captured in a CUDA graph: the grid is the bound `max_blocks` and unused blocks exit at once.

Pair p = token * top_k + slot. `sorted_pairs` holds pair ids (P = padding); `block_expert` the expert of each block
(E = unused). Ids outside [0, E) (expert parallelism's non-local experts) are dropped: they appear in no block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # the kernels are an optional extra; the torch path below needs none of it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on installs without the gpu extra
    triton = None


@dataclass
class Dispatch:
    sorted_pairs: torch.Tensor  # int32 [max_blocks * block_m]
    block_expert: torch.Tensor  # int32 [max_blocks]
    block_m: int
    pdl: bool = False  # its launch lets the next one start early (a programmatic dependent that waits first)

    @property
    def num_blocks(self) -> int:
        return self.block_expert.numel()


def max_blocks(pairs: int, experts: int, block_m: int) -> int:
    """At most min(E, P) experts are non-empty and each wastes less than one block to padding."""
    return -(-pairs // block_m) + min(experts, pairs)


def dispatch_torch(topk_ids: torch.Tensor, experts: int, block_m: int) -> Dispatch:
    """Any size; a handful of small device ops, no host sync."""
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    dev = flat.device
    flat = torch.where((flat < 0) | (flat >= experts), experts, flat)  # bucket E: dropped
    counts = torch.zeros(experts + 1, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    blocks = (counts[:experts] + block_m - 1) // block_m  # bucket E (dropped pairs) takes no block
    block_end = blocks.cumsum(0)
    block_start = block_end - blocks
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first = counts.cumsum(0) - counts
    rank = torch.arange(p, device=dev) - first[sorted_e]
    nb = max_blocks(p, experts, block_m)
    start_of = torch.cat([block_start, block_start.new_full((1,), nb)])  # dropped pairs land past the blocks
    dest = start_of[sorted_e] * block_m + rank
    sorted_pairs = torch.full((nb * block_m + p,), p, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(block_end, torch.arange(nb, device=dev), right=True)
    return Dispatch(sorted_pairs[: nb * block_m], block_expert.to(torch.int32), block_m)


if triton is not None:
    from exq.kernels.moe_gemm import gdc_launch_dependents

    @triton.jit
    def _dispatch_sorted(
        ids_ptr, sorted_ptr, block_expert_ptr, P, E, NB,
        BLOCK_M: tl.constexpr, PP: tl.constexpr, EP: tl.constexpr, NBP: tl.constexpr, FILL: tl.constexpr,
        PDL: tl.constexpr = False,
    ):  # fmt: skip
        """One program: the pairs sorted by (expert, pair) as one key each, so a pair's slot is its sorted position
        plus its expert's offset (first block x BLOCK_M - pairs of lower experts), one gather of EP values. Work
        O(P log^2 P + EP + NB * BLOCK_M) where the one-hot rank it replaced was O(P x EP): v27 (H100, one launch in
        a CUDA graph) 2.9 / 4.0 us at 128 / 512 pairs on 64 experts, 3.2 / 4.7 on 128, where that took 9.6 / 8.6 and
        17.6 / 11.9 (512 pairs: the three-launch chunked form). PDL: the next launch (gate_up) may start now; it
        waits for this one's end before it reads anything."""
        if PDL:
            gdc_launch_dependents()
        p = tl.arange(0, PP)
        e = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.int32)  # int64 ids: the sm_90 histogram takes int32
        e = tl.where((e < 0) | (e >= E), E, e)  # bucket E: dropped ids and the lanes past P, sorted last
        key = tl.sort(e * PP + p)
        se = key // PP
        ex = tl.arange(0, EP)
        counts = tl.histogram(e, EP)
        blocks = tl.where(ex < E, (counts + BLOCK_M - 1) // BLOCK_M, 0)
        first_pair = tl.cumsum(counts, axis=0) - counts
        offset = (tl.cumsum(blocks, axis=0) - blocks) * BLOCK_M - first_pair
        dest = p + tl.gather(offset, se, 0)
        for s0 in range(0, NB * BLOCK_M, FILL):  # every slot padding first
            s = s0 + tl.arange(0, FILL)
            tl.store(sorted_ptr + s, tl.full([FILL], 0, tl.int32) + P, mask=s < NB * BLOCK_M)
        b = tl.arange(0, NBP)
        tl.store(block_expert_ptr + b, tl.full([NBP], 0, tl.int32) + E, mask=b < NB)
        tl.debug_barrier()  # the fills above land before the scatters below (same program, other threads)
        real = se < E
        tl.store(sorted_ptr + dest, key - se * PP, mask=real)
        # every used block starts with a real pair (an expert's padding is at the end of its last block)
        tl.store(block_expert_ptr + dest // BLOCK_M, se, mask=real & (dest % BLOCK_M == 0))

    @triton.jit
    def _dispatch_count(ids_ptr, counts_ptr, P, E, CH: tl.constexpr, EP: tl.constexpr):
        """Pass 1, one program per chunk of CH pairs: how many of them each expert got."""
        c = tl.program_id(0)
        p = c * CH + tl.arange(0, CH)
        e = tl.load(ids_ptr + p, mask=p < P, other=-1)
        e = tl.where((e < 0) | (e >= E), EP, e)  # dropped or past the end: no expert's column
        ex = tl.arange(0, EP)
        tl.store(counts_ptr + c * EP + ex, tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0))

    @triton.jit
    def _dispatch_prefix(counts_ptr, totals_ptr, NCH, EP: tl.constexpr, EB: tl.constexpr, RB: tl.constexpr):
        """Pass 2, one program per EB experts: their per-chunk counts become exclusive prefixes over chunks (in
        place) and their totals. Experts are independent, so this runs on EP / EB SMs, RB chunks per load."""
        ex = tl.program_id(0) * EB + tl.arange(0, EB)
        total = tl.zeros([EB], tl.int32)
        for c0 in range(0, NCH, RB):
            r = c0 + tl.arange(0, RB)
            ptrs = counts_ptr + r[:, None] * EP + ex[None, :]
            tile = tl.load(ptrs, mask=(r < NCH)[:, None], other=0)
            tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + total[None, :], mask=(r < NCH)[:, None])
            total += tl.sum(tile, axis=0)
        tl.store(totals_ptr + ex, total)

    @triton.jit
    def _dispatch_scatter(
        ids_ptr, counts_ptr, totals_ptr, sorted_ptr, block_expert_ptr, P, E, NB,
        BLOCK_M: tl.constexpr, CH: tl.constexpr, EP: tl.constexpr, FILL: tl.constexpr, OB: tl.constexpr,
    ):  # fmt: skip
        """Pass 3, one program per chunk. Every program derives each expert's first block from the totals (EP
        values, cheaper than a launch); pair p goes to its expert's first block + pairs of that expert in earlier
        chunks + its rank among them in this chunk (the same order as a stable sort). The program also takes its
        share of the padding slots (past an expert's rows in its last block, and blocks no expert needs) and of the
        blocks' owners; those slots are disjoint from the pairs', so no ordering between programs is needed."""
        c = tl.program_id(0)
        nch = tl.num_programs(0)
        ex = tl.arange(0, EP)
        total = tl.load(totals_ptr + ex)
        blocks = tl.where(ex < E, (total + BLOCK_M - 1) // BLOCK_M, 0)
        block_end = tl.cumsum(blocks, axis=0)
        start = block_end - blocks
        p = c * CH + tl.arange(0, CH)
        e = tl.load(ids_ptr + p, mask=p < P, other=-1)
        valid = (p < P) & (e >= 0) & (e < E)
        e = tl.where(valid, e, EP)
        onehot = (e[:, None] == ex[None, :]).to(tl.int32)
        rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
        first = tl.sum(onehot * start[None, :], axis=1) * BLOCK_M
        safe = tl.where(valid, e, 0)
        dest = first + tl.load(counts_ptr + c * EP + safe) + rank
        tl.store(sorted_ptr + dest, p, mask=valid)
        # padding: expert x's slots [start * BM + total, block_end * BM) for x = c, c + nch, ...
        j = tl.arange(0, BLOCK_M)
        for x in range(c, E, nch):
            lo = tl.sum(tl.where(ex == x, start * BLOCK_M + total, 0), axis=0)
            hi = tl.sum(tl.where(ex == x, block_end * BLOCK_M, 0), axis=0)
            tl.store(sorted_ptr + lo + j, tl.full([BLOCK_M], 0, tl.int32) + P, mask=lo + j < hi)
        used = tl.sum(blocks, axis=0) * BLOCK_M
        span = (NB * BLOCK_M - used + nch - 1) // nch  # unused blocks' slots, a span per program
        end = tl.minimum(used + (c + 1) * span, NB * BLOCK_M)
        for s0 in range(used + c * span, end, FILL):
            s = s0 + tl.arange(0, FILL)
            tl.store(sorted_ptr + s, tl.full([FILL], 0, tl.int32) + P, mask=s < end)
        b = c * OB + tl.arange(0, OB)
        owner = tl.sum(((block_end[None, :] <= b[:, None]) & (ex[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, owner, mask=b < NB)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# pairs for the one-program sorted dispatch: its single-CTA sort grows as P log^2 P, and from 2048 pairs the three
# launches of the chunked form are faster (v27, H100: 24.6 vs 7.9 us at 2048 pairs on 64 experts; 7.2 vs 8.0 at 1024)
SORTED_MAX_PAIRS = 1024
# tl.gather arrived in Triton 3.3; with an older one the chunked form (any size) does the work
HAS_GATHER = triton is not None and hasattr(tl, "gather")


def dispatch_sorted(
    topk_ids: torch.Tensor, experts: int, block_m: int, num_warps: int = 4, pdl: bool = False
) -> Dispatch:
    """One launch of `_dispatch_sorted`; pdl: the next launch may start early (Hopper, a programmatic dependent)."""
    p = topk_ids.numel()
    nb = max_blocks(p, experts, block_m)
    sorted_pairs = torch.empty(nb * block_m, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=topk_ids.device)
    _dispatch_sorted[(1,)](topk_ids.reshape(-1), sorted_pairs, block_expert, p, experts, nb, BLOCK_M=block_m,
                           PP=next_pow2(max(p, 16)), EP=next_pow2(experts + 1), NBP=next_pow2(nb),
                           FILL=min(2048, next_pow2(nb * block_m)), PDL=pdl, num_warps=num_warps)  # fmt: skip
    return Dispatch(sorted_pairs, block_expert, block_m, pdl)


def dispatch_chunked(topk_ids: torch.Tensor, experts: int, block_m: int, chunk: int = 64) -> Dispatch:
    """Any size in three launches (count per chunk, prefix per expert group, scatter), where the torch path takes
    ~35 small ones. v17: the prefix ran in one program over every chunk (5-44 us at 2-32 k pairs, H100), now on
    EP / 8 programs, and the padding and owners moved into the scatter's programs."""
    p = topk_ids.numel()
    ep = next_pow2(max(experts, 16))
    nch = -(-p // chunk)
    nb = max_blocks(p, experts, block_m)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1)
    counts = torch.empty(nch * ep, dtype=torch.int32, device=dev)
    totals = torch.empty(ep, dtype=torch.int32, device=dev)
    sorted_pairs = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    eb = 8
    _dispatch_count[(nch,)](ids, counts, p, experts, CH=chunk, EP=ep, num_warps=4)
    _dispatch_prefix[(ep // eb,)](counts, totals, nch, EP=ep, EB=eb, RB=min(512, next_pow2(nch)), num_warps=4)
    _dispatch_scatter[(nch,)](ids, counts, totals, sorted_pairs, block_expert, p, experts, nb, BLOCK_M=block_m,
                              CH=chunk, EP=ep, FILL=1024, OB=next_pow2(-(-nb // nch)), num_warps=4)  # fmt: skip
    return Dispatch(sorted_pairs, block_expert, block_m)


def dispatch(topk_ids: torch.Tensor, experts: int, block_m: int, pdl: bool = False) -> Dispatch:
    """One kernel launch for decode-sized batches (what dominates at 1-128 tokens), three beyond. pdl: let the next
    launch start early where the one-launch form runs (the result's `pdl` says whether it did)."""
    if triton is None or not (topk_ids.is_cuda or interpreting()):
        return dispatch_torch(topk_ids, experts, block_m)
    if topk_ids.numel() > SORTED_MAX_PAIRS or not HAS_GATHER:
        return dispatch_chunked(topk_ids, experts, block_m)
    return dispatch_sorted(topk_ids, experts, block_m, pdl=pdl)


def interpreting() -> bool:
    """Triton runs on the CPU through its interpreter (CI); chosen by the environment before kernels are defined."""
    return os.environ.get("TRITON_INTERPRET") == "1"
