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
    def _fill(ptr, lo, hi, value, FILL: tl.constexpr):
        """ptr[lo:hi] = value, FILL slots a step."""
        for s0 in range(lo, hi, FILL):
            s = s0 + tl.arange(0, FILL)
            tl.store(ptr + s, tl.full([FILL], 0, tl.int32) + value, mask=s < hi)

    @triton.jit
    def _first_slots(counts, ex, E, BLOCK_M: tl.constexpr):
        """Each expert's first slot: the row blocks of lower experts x BLOCK_M (bucket E and the lanes past it take
        none)."""
        blocks = tl.where(ex < E, (counts + BLOCK_M - 1) // BLOCK_M, 0)
        return (tl.cumsum(blocks, axis=0) - blocks) * BLOCK_M

    @triton.jit
    def _place(sorted_ptr, block_expert_ptr, dest, pair, se, E, BLOCK_M: tl.constexpr):
        """Every real pair into its slot. A block's first slot names its owner: every used block starts with a real
        pair (an expert's padding is at the end of its last block)."""
        real = se < E
        tl.store(sorted_ptr + dest, pair, mask=real)
        tl.store(block_expert_ptr + dest // BLOCK_M, se, mask=real & (dest % BLOCK_M == 0))

    @triton.jit
    def _dispatch_sorted(
        ids_ptr, sorted_ptr, block_expert_ptr, keys_ptr, counts_ptr, ticket_ptr, P, E, NB,
        BLOCK_M: tl.constexpr, PP: tl.constexpr, EP: tl.constexpr, NBP: tl.constexpr, FILL: tl.constexpr,
        PDL: tl.constexpr = False, CHUNKS: tl.constexpr = False, NCHP: tl.constexpr = 1,
    ):  # fmt: skip
        """Each program sorts a chunk of PP pairs by (expert, pair) as one key each, so a pair's slot is its sorted
        position plus its expert's offset (first block x BLOCK_M - pairs of lower experts), one gather of EP values.
        Work O(PP log^2 PP + EP + NB * BLOCK_M) where the one-hot rank it replaced was O(PP x EP): v27 (H100, one
        launch in a CUDA graph) 2.9 / 4.0 us at 128 / 512 pairs on 64 experts, 3.2 / 4.7 on 128, where that took
        9.6 / 8.6 and 17.6 / 11.9 (512 pairs: the three-launch chunked form).
        CHUNKS (several programs): the sort grows as PP log^2 PP, so larger batches are sorted in chunks side by
        side. Each program writes its sorted keys and per-expert counts, fills its share of the padding slots and
        draws a ticket; the program that draws the last one sees every chunk's counts, so it alone knows each
        expert's first block and each chunk's prefix within it, and places every chunk's pairs (in chunk order: a
        stable sort's order, so the same bits as one sort), then resets the ticket. One launch where the chunked
        form takes three. PDL: the next launch (gate_up) may start now; it waits for this one's end before it reads
        anything."""
        if PDL:
            gdc_launch_dependents()
        c = tl.program_id(0)
        p = tl.arange(0, PP)
        e = tl.load(ids_ptr + c * PP + p, mask=c * PP + p < P, other=-1).to(tl.int32)  # int64 ids: int32 histogram
        e = tl.where((e < 0) | (e >= E), E, e)  # bucket E: dropped ids and the lanes past P, sorted last
        key = tl.sort(e * PP + p)
        counts = tl.histogram(e, EP)
        ex = tl.arange(0, EP)
        b = tl.arange(0, NBP)
        if CHUNKS:
            nch = tl.num_programs(0)
            tl.store(keys_ptr + c * PP + p, key)
            tl.store(counts_ptr + c * EP + ex, counts)
            span = tl.cdiv(tl.cdiv(NB * BLOCK_M, nch), FILL) * FILL  # this program's share of the padding fill
            _fill(sorted_ptr, c * span, tl.minimum((c + 1) * span, NB * BLOCK_M), P, FILL)
            tl.debug_barrier()  # every thread's stores land before the ticket says so
            if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == nch - 1:
                # every chunk at once, as [chunk, expert] and [chunk, pair] tiles: no loop-carried chain
                r = tl.arange(0, NCHP)
                live = (r < nch)[:, None]
                cnt = tl.load(counts_ptr + r[:, None] * EP + ex[None, :], mask=live, other=0, cache_modifier=".cg")
                # a pair's slot: its expert's first slot + that expert's pairs in earlier chunks + its sorted
                # position in its chunk - the chunk's pairs of lower experts
                first_slot = _first_slots(tl.sum(cnt, axis=0), ex, E, BLOCK_M)
                offset = first_slot[None, :] + (tl.cumsum(cnt, axis=0) - cnt) - (tl.cumsum(cnt, axis=1) - cnt)
                k2 = tl.load(keys_ptr + r[:, None] * PP + p[None, :], mask=live, other=E * PP, cache_modifier=".cg")
                se = k2 // PP
                dest = p[None, :] + tl.gather(offset, se, 1)
                tl.store(block_expert_ptr + b, tl.full([NBP], 0, tl.int32) + E, mask=b < NB)
                tl.debug_barrier()  # the owners' fill lands before the owners below
                _place(sorted_ptr, block_expert_ptr, dest, r[:, None] * PP + k2 - se * PP, se, E, BLOCK_M)
                tl.store(ticket_ptr, 0)  # zero for the next call (calls on one stream run in order)
        else:
            se = key // PP
            first_pair = tl.cumsum(counts, axis=0) - counts
            dest = p + tl.gather(_first_slots(counts, ex, E, BLOCK_M) - first_pair, se, 0)
            _fill(sorted_ptr, 0, NB * BLOCK_M, P, FILL)  # every slot padding first
            tl.store(block_expert_ptr + b, tl.full([NBP], 0, tl.int32) + E, mask=b < NB)
            tl.debug_barrier()  # the fills above land before the scatters below (same program, other threads)
            _place(sorted_ptr, block_expert_ptr, dest, key - se * PP, se, E, BLOCK_M)

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
        _fill(sorted_ptr, used + c * span, tl.minimum(used + (c + 1) * span, NB * BLOCK_M), P, FILL)
        b = c * OB + tl.arange(0, OB)
        owner = tl.sum(((block_end[None, :] <= b[:, None]) & (ex[None, :] < E)).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, owner, mask=b < NB)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# pairs for the one-program sorted dispatch: its single-CTA sort grows as P log^2 P (v28, H100, 64 / 128 experts:
# 7.4 / 7.8 us at 1024 pairs, 24-25 at 2048)
SORTED_MAX_PAIRS = 512
# beyond it, chunks of SORT_CHUNK pairs sorted side by side in one launch, up to CHUNKED_SORT_MAX_PAIRS: 6.4 / 6.9 us
# at 1024 and 2048 pairs. The last program places every pair, so its share grows with P: from 4096 pairs the
# three-launch chunked form ties or wins (8192 pairs: 13.7-14.7 at 8 warps, 58 at 4 (spills), chunked 8.1-9.3)
SORT_CHUNK = 512
CHUNKED_SORT_MAX_PAIRS = 2048
# the last program's [chunk, pair] tile: 8192 already spills at 4 warps (58 us); sm_90 compiles were checked up to
# 16384 (Triton 3.6), larger ones never
CHUNK_TILE_MAX = 16384
# tl.gather arrived in Triton 3.3; with an older one the chunked form (any size) does the work
HAS_GATHER = triton is not None and hasattr(tl, "gather")

_TICKETS: dict = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """A ticket word for callers without their own (fused_moe passes its layer's counters): zero between calls, as
    the last program resets it, so one per device serves calls that run in order (one stream). Kept because a CUDA
    graph holds its address; under capture with none kept, a fresh zeroed one (a memset in the graph), not kept,
    since it holds no zero until the graph runs."""
    if str(device) in _TICKETS:
        return _TICKETS[str(device)]
    buf = torch.zeros(1, dtype=torch.int32, device=device)
    if not (buf.is_cuda and torch.cuda.is_current_stream_capturing()):
        _TICKETS[str(device)] = buf
    return buf


def chunk_tile(chunks: int, experts: int, num_warps: int) -> tuple[int, int]:
    """(NCHP, EP) of `_dispatch_sorted`: experts + 1 buckets. With chunks, the last program's [chunk, expert] tile
    has at least num_warps rows and 32 columns: Triton 3.6 fails to compile the sum or gather of a smaller one for
    sm_90 (an assertion in its thread-locality pass)."""
    ep = next_pow2(experts + 1)
    return (1, ep) if chunks == 1 else (max(next_pow2(chunks), num_warps), max(32, ep))


def dispatch_sorted(
    topk_ids: torch.Tensor,
    experts: int,
    block_m: int,
    num_warps: int = 4,
    pdl: bool = False,
    chunk: int = 0,
    ticket: torch.Tensor | None = None,
) -> Dispatch:
    """One launch of `_dispatch_sorted`: one program for the whole batch, or (chunk, a power of two, smaller than
    the batch) one per chunk of that many pairs, drawing tickets from `ticket` (an int32 word that is zero, used by
    no other launch running at the same time; default: one per device). pdl: the next launch may start early
    (Hopper, a programmatic dependent)."""
    p = topk_ids.numel()
    if chunk and (chunk & (chunk - 1) or chunk < 16):
        raise ValueError(f"dispatch chunk {chunk}: use a power of two from 16")
    pp = chunk if 0 < chunk < p else next_pow2(max(p, 16))
    nch = -(-p // pp)
    if nch > 1 and next_pow2(nch) * pp > CHUNK_TILE_MAX:
        raise ValueError(
            f"dispatch of {p} pairs in chunks of {chunk}: the last program's tile holds at most {CHUNK_TILE_MAX} pairs"
            " (next_pow2(chunks) x chunk); use larger chunks or dispatch_chunked"
        )
    nb = max_blocks(p, experts, block_m)
    nchp, ep = chunk_tile(nch, experts, num_warps)
    dev = topk_ids.device
    sorted_pairs = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    keys = counts = sorted_pairs  # unread by one program
    if nch > 1:
        keys = torch.empty(nch * pp, dtype=torch.int32, device=dev)
        counts = torch.empty(nch * ep, dtype=torch.int32, device=dev)
        ticket = _ticket(dev) if ticket is None else ticket
    else:
        ticket = sorted_pairs
    _dispatch_sorted[(nch,)](topk_ids.reshape(-1), sorted_pairs, block_expert, keys, counts, ticket, p, experts, nb,
                             BLOCK_M=block_m, PP=pp, EP=ep, NBP=next_pow2(nb), FILL=min(2048, next_pow2(nb * block_m)),
                             PDL=pdl, CHUNKS=nch > 1, NCHP=nchp,
                             num_warps=num_warps)  # fmt: skip
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


def dispatch(
    topk_ids: torch.Tensor, experts: int, block_m: int, pdl: bool = False, ticket: torch.Tensor | None = None
) -> Dispatch:
    """One kernel launch up to CHUNKED_SORT_MAX_PAIRS pairs, three beyond. pdl: let the next launch start early
    where the one-launch form runs (the result's `pdl` says whether it did). ticket: see `dispatch_sorted`."""
    if triton is None or not (topk_ids.is_cuda or interpreting()):
        return dispatch_torch(topk_ids, experts, block_m)
    p = topk_ids.numel()
    if p > CHUNKED_SORT_MAX_PAIRS or not HAS_GATHER:
        return dispatch_chunked(topk_ids, experts, block_m)
    chunk = 0 if p <= SORTED_MAX_PAIRS else SORT_CHUNK
    return dispatch_sorted(topk_ids, experts, block_m, pdl=pdl, chunk=chunk, ticket=ticket)


def interpreting() -> bool:
    """Triton runs on the CPU through its interpreter (CI); chosen by the environment before kernels are defined."""
    return os.environ.get("TRITON_INTERPRET") == "1"
