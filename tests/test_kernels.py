"""Fused MoE kernels against plain torch: dispatch against a brute-force sort, the op against fp32 math on the
dequantized weights. On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest); EXQ_TEST_DEVICE=cuda runs
the same tests on a GPU."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from exq.errors import ExqError
from exq.kernels import GemmConfig, GemvConfig, fused_moe
from exq.kernels.dispatch import dispatch, dispatch_chunked, dispatch_sorted, dispatch_torch, max_blocks
from exq.kernels.synthetic import layout_for, mixed_formats, random_experts
from exq.kernels.tuning import parse_bench_config

ALL = {f: 1 / 6 for f in ("bf16", "int8", "int4", "int4-asym", "int3", "int3-asym")}  # every format the kernels run


def brute_force_dispatch(ids: list[list[int]], experts: int, block_m: int) -> tuple[list[int], list[int]]:
    flat = [e for row in ids for e in row]
    p = len(flat)
    nb = max_blocks(p, experts, block_m)
    pairs, owners = [], []
    for e in range(experts):
        mine = [i for i, x in enumerate(flat) if x == e]
        while mine:
            chunk, mine = mine[:block_m], mine[block_m:]
            pairs += chunk + [p] * (block_m - len(chunk))
            owners.append(e)
    pairs += [p] * (nb * block_m - len(pairs))
    owners += [experts] * (nb - len(owners))
    return pairs, owners


@pytest.mark.parametrize(
    "tokens,k,experts,block_m",
    # `dispatch` sorts one program's worth up to 512 pairs (64 x 8), chunks in one launch up to 2048 (300 x 6,
    # 128 x 8 on 256 experts: two chunks, 129 x 8: a partial third), three launches beyond (431 x 6, 257 x 8);
    # 128-row blocks on 128 experts: 16 k padding slots, filled in several steps
    [(1, 8, 64, 16), (7, 2, 8, 16), (33, 4, 16, 16), (64, 8, 128, 32), (300, 6, 24, 64), (431, 6, 40, 32),
     (128, 8, 256, 16), (129, 8, 64, 16), (257, 8, 64, 16), (16, 8, 128, 128)],
)  # fmt: skip
def test_dispatch_matches_brute_force(tokens, k, experts, block_m):
    gen = torch.Generator().manual_seed(tokens)
    # skewed routing: a few hot experts, many empty ones
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]) % max(k, experts // 3)
    want = brute_force_dispatch(ids.tolist(), experts, block_m)
    # chunked: several chunks of 16 pairs, a partial last one, experts split across chunks; chunks of 4: more
    # chunks than the prefix pass loads at once (512), more chunks than experts and the reverse
    chunked = [lambda i, e, b, c=c: dispatch_chunked(i, e, b, chunk=c) for c in (16, 4)]
    # chunks of 64 sorted side by side: one to 41 chunks, a partial last one, experts spanning chunks
    chunk_sorted = lambda i, e, b: dispatch_sorted(i, e, b, chunk=64)  # noqa: E731
    for impl in (dispatch, dispatch_torch, dispatch_sorted, chunk_sorted, *chunked):
        d = impl(ids.to(DEVICE).int(), experts, block_m)
        assert (d.sorted_pairs.tolist(), d.block_expert.tolist()) == want, impl.__name__


def test_dispatch_without_tl_gather_takes_the_chunked_form(monkeypatch):
    """A Triton without tl.gather (before 3.3) gets the same dispatch from the chunked kernels."""
    from exq.kernels import dispatch as dispatch_mod

    ids = torch.randint(0, 16, (9, 4), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    want = brute_force_dispatch(ids.tolist(), 16, 16)
    monkeypatch.setattr(dispatch_mod, "HAS_GATHER", False)
    monkeypatch.setattr(dispatch_mod, "dispatch_sorted", None)  # fails if called
    d = dispatch_mod.dispatch(ids.to(DEVICE), 16, 16)
    assert (d.sorted_pairs.tolist(), d.block_expert.tolist()) == want


def test_chunk_sorted_dispatch_resets_its_ticket_for_the_next_call(monkeypatch):
    """Past SORTED_MAX_PAIRS `dispatch` sorts chunks side by side in one launch; the program that draws the last
    ticket places every pair and zeroes the ticket, so calls with other chunk counts follow on the same word. In
    the op the layer's counters hold the ticket."""
    from exq.kernels import dispatch as dispatch_mod

    monkeypatch.setattr(dispatch_mod, "SORTED_MAX_PAIRS", 32)
    monkeypatch.setattr(dispatch_mod, "SORT_CHUNK", 16)
    monkeypatch.setattr(dispatch_mod, "CHUNKED_SORT_MAX_PAIRS", 128)
    monkeypatch.setattr(dispatch_mod, "dispatch_chunked", None)  # fails if called
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(11)
    for tokens, k, experts in [(10, 4, 8), (31, 4, 16), (5, 2, 8), (17, 6, 12)]:  # 3, 8, 1 and 7 chunks
        ids = torch.randint(-1, experts, (tokens, k), generator=gen)  # -1: another rank's expert
        want = brute_force_dispatch([[e % (experts + 99) for e in row] for row in ids.tolist()], experts, 16)
        d = dispatch_mod.dispatch(ids.to(DEVICE), experts, 16, ticket=ticket)
        assert (d.sorted_pairs.tolist(), d.block_expert.tolist()) == want
        assert ticket.item() == 0
    with pytest.raises(ValueError, match="power of two"):
        dispatch_mod.dispatch_sorted(ids.to(DEVICE), experts, 16, chunk=24)
    with pytest.raises(ValueError, match="at most 16384 pairs"):  # 1025 chunks of 16: a 2048 x 16 tile
        dispatch_mod.dispatch_sorted(torch.zeros(16400, dtype=torch.int32, device=DEVICE), experts, 16, chunk=16)
    experts, hidden, inter, k = 8, 256, 128, 4
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=12), device=DEVICE, seed=12)
    for tokens in (24, 9):  # 96 pairs: 6 chunks; 36 pairs: 3 chunks
        x, w, ids = routing(tokens, experts, k, 60 + tokens, hidden, torch.bfloat16)
        out = fused_moe(x, w, ids, mod, config=GemmConfig(16, 64, 128, 4, 2))
        assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
        assert mod._kernel_blocks[0].counters(1)[0].item() == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_dispatch_drops_ids_of_other_ranks(dtype):
    ids = torch.tensor([[0, -1], [5, 1], [1, 9]], dtype=dtype)  # 8 local experts: -1 and 9 are not ours
    pairs, owners = brute_force_dispatch([[0, 99], [5, 1], [1, 99]], 8, 16)
    for impl in (dispatch, dispatch_torch, dispatch_sorted, lambda i, e, b: dispatch_chunked(i, e, b, chunk=4)):
        d = impl(ids.to(DEVICE), 8, 16)
        assert d.block_expert.tolist() == owners
        assert d.sorted_pairs.tolist() == pairs


def reference(x, w, ids, mod) -> torch.Tensor:
    """fp32 math on the dequantized weights, every (token, slot) pair at once."""
    gu = mod.gate_up.dequantized(torch.float32)[ids]  # [T, k, 2I, H]
    dn = mod.down.dequantized(torch.float32)[ids]  # [T, k, H, I]
    h = torch.einsum("tkoh,th->tko", gu, x.float())
    g, u = h.chunk(2, dim=-1)
    y = torch.einsum("tkhi,tki->tkh", dn, F.silu(g) * u)
    return (y * w.float()[..., None]).sum(1)


def rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def routing(tokens, experts, k, seed, hidden, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    w, ids = torch.topk(logits.softmax(-1), k)
    return x.to(DEVICE), (w / w.sum(-1, keepdim=True)).to(dtype).to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize(
    "shares,dtype,tokens,config",
    [
        (ALL, torch.bfloat16, 5, None),
        (ALL, torch.float16, 1, None),
        (ALL, torch.bfloat16, 33, GemmConfig(32, 32, 64, 4, 2)),
        ({"int4": 1.0}, torch.bfloat16, 3, None),
        ({"bf16": 1.0}, torch.float16, 7, GemmConfig(16, 32, 128, 4, 2)),
        ({"int8": 0.5, "int4-asym": 0.5}, torch.bfloat16, 2, None),
        (ALL, torch.float16, 40, GemmConfig(64, 64, 128, 4, 2)),  # row blocks of 64: nibbles re-interleaved
        ({"int4": 0.5, "int4-asym": 0.5}, torch.float16, 9, GemmConfig(16, 64, 64, 4, 2)),
        # group scales folded into the decoded weights, one accumulator: joined nibbles, and even / odd dots
        (ALL, torch.bfloat16, 40, GemmConfig(64, 64, 128, 4, 2, fold_scales=True)),
        ({"int4": 0.5, "int4-asym": 0.5}, torch.float16, 9, GemmConfig(16, 64, 64, 4, 2, fold_scales=True)),
        (ALL, torch.bfloat16, 420, None),  # the default rule's prefill tile: 128 rows, scales folded, 1-D grid
        # two groups per K iteration (sub-steps unrolled): K = 256 is one iteration for gate_up, down keeps one group
        (ALL, torch.bfloat16, 9, (GemmConfig(16, 64, 256, 4, 2), GemmConfig(16, 64, 128, 4, 2))),
        (ALL, torch.float16, 40, (GemmConfig(64, 64, 256, 4, 2, fold_scales=True), GemmConfig(64, 64, 128, 4, 2))),
        # int4 A read as int32 words and int8 codes decoded by exponent bits, bf16 activations, an expert over 16 rows
        ({"int8": 0.5, "int4": 0.5}, torch.bfloat16, 17, GemmConfig(16, 128, 128, 4, 3)),
        (ALL, torch.bfloat16, 3, GemvConfig(32, 1, 4, 2)),  # the decode path, every format
        (ALL, torch.float16, 2, (GemvConfig(64, 2, 4, 2), GemvConfig(64, 1, 4, 2))),  # K steps of 2 groups
        (ALL, torch.bfloat16, 3, (GemvConfig(32, 1, 4, 2, split_k=2), GemvConfig(32, 1, 4, 2))),  # split gate_up
        # whole-K steps in 16-column tiles (v21: Mixtral's down at T = 1), one format at slot = id
        ({"int4": 1.0}, torch.bfloat16, 1, (GemvConfig(16, 2, 4, 1), GemvConfig(16, 1, 4, 1))),
        # the tensor-core GEMV: a 16-row tile holding one pair's row, every format, split K on both projections
        (ALL, torch.bfloat16, 3, GemvConfig(32, 1, 4, 2, mma=True)),
        (ALL, torch.float16, 5, (GemvConfig(64, 1, 4, 2, split_k=2, mma=True), GemvConfig(32, 1, 4, 2, mma=True))),
        (ALL, torch.bfloat16, 2, (GemvConfig(32, 1, 4, 2, mma=True), GemvConfig(32, 1, 4, 2))),  # mma then CUDA cores
        (ALL, torch.float16, 3, (GemvConfig(64, 2, 4, 3, mma=True), GemvConfig(32, 1, 4, 2, mma=True))),  # 2 groups
        # both projections in one launch of work items: CUDA cores, tensor cores, one of each
        (ALL, torch.bfloat16, 3, GemvConfig(32, 1, 4, 2, one_launch=True)),
        (
            ALL,
            torch.float16,
            5,
            (GemvConfig(64, 2, 4, 3, mma=True, one_launch=True), GemvConfig(64, 1, 4, 3, mma=True, one_launch=True)),
        ),
        (
            ALL,
            torch.bfloat16,
            1,
            (GemvConfig(32, 2, 4, 3, mma=True, one_launch=True), GemvConfig(64, 1, 4, 3, one_launch=True)),
        ),
        # one launch with the pairs' items in expert order (a rank per program)
        (ALL, torch.bfloat16, 5, GemvConfig(32, 1, 4, 2, one_launch=True, expert_order=True)),
        # int3 (8 codes in 3 bytes): GEMV steps of 2 groups; layers of int3 only take the byte-gather tile up to 32
        # rows (folded scales too) and the word tile beyond, layers with other formats the word tile everywhere
        ({"int3": 0.5, "int4": 0.5}, torch.float16, 3, (GemvConfig(32, 2, 4, 2), GemvConfig(64, 1, 4, 2))),
        ({"int3": 0.5, "int3-asym": 0.5}, torch.bfloat16, 6, GemmConfig(32, 64, 128, 4, 2, inline_dispatch=True)),
        ({"int3-asym": 1.0}, torch.float16, 9, GemmConfig(16, 64, 128, 4, 2, fold_scales=True)),
        ({"int3": 1.0}, torch.bfloat16, 40, GemmConfig(64, 64, 128, 4, 2)),
        ({"int3-asym": 0.75, "bf16": 0.25}, torch.float16, 40, GemmConfig(128, 64, 64, 4, 2, fold_scales=True)),
    ],
)
def test_fused_moe_matches_torch(shares, dtype, tokens, config):
    experts, hidden, inter, k = 8, 256, 128, 2
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, shares, seed=tokens), device=DEVICE, seed=1)
    x, w, ids = routing(tokens, experts, k, tokens, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=config)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    if tokens * k < experts:
        assert len(set(ids.flatten().tolist())) < experts  # some experts received no token


@pytest.mark.parametrize("block_m,dtype", [(16, torch.bfloat16), (32, torch.float16)])
def test_inline_dispatch_walks_every_row_block_of_a_hot_expert(block_m, dtype, monkeypatch):
    """Programs per expert rank their own pairs in topk_ids: an expert with several row blocks, foreign ids, and
    the same bits as the dispatched path (same rows in the same blocks); past the size limit the op dispatches."""
    from exq.kernels import configs

    experts, hidden, inter, k = 8, 256, 128, 2
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=2), device=DEVICE, seed=6)
    x, w, ids = routing(40, experts, k, 5, hidden, dtype)
    ids[:, 1] = torch.where(ids[:, 1] == 3, ids[:, 0], ids[:, 1])
    ids[:, 0] = 3  # expert 3 in every token: 40 rows
    assert bool((ids[:, 0] != ids[:, 1]).all())
    cfg = GemmConfig(block_m, 64, 128, 4, 2, inline_dispatch=True)
    plain = GemmConfig(block_m, 64, 128, 4, 2)
    out = fused_moe(x, w, ids, mod, config=cfg)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    assert torch.equal(out, fused_moe(x, w, ids, mod, config=plain))
    foreign = ids.clone()
    foreign[::2, 1] = -1
    got = fused_moe(x, w, foreign, mod, config=cfg, expert_parallel=True)
    assert torch.equal(got, fused_moe(x, w, foreign, mod, config=plain, expert_parallel=True))
    monkeypatch.setattr(configs, "INLINE_DISPATCH_PAIRS", 16)
    assert torch.equal(fused_moe(x, w, ids, mod, config=cfg), out)


@pytest.mark.parametrize(
    "dtype,split,mma", [(torch.bfloat16, 2, False), (torch.float16, 2, False), (torch.bfloat16, 2, True)]
)
def test_split_k_gemv_reduces_partials_and_top_k(dtype, split, mma):
    """Both projections split along K: partial sums, silu*up and the weighted top-k sum in the reduce kernels."""
    experts, hidden, inter, k = 8, 256, 256, 3
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=7), device=DEVICE, seed=4)
    x, w, ids = routing(5, experts, k, 3 if dtype == torch.float16 else 2, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=GemvConfig(64, 1, 4, 2, split_k=split, mma=mma))
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    foreign = ids.clone()
    foreign[:, -1] = -1  # a slot of another rank adds nothing
    out = fused_moe(x, w, foreign, mod, config=GemvConfig(64, 1, 4, 2, split_k=split, mma=mma), expert_parallel=True)
    assert rel_err(out, reference(x, w[:, :-1], ids[:, :-1], mod)) < 1e-2


@pytest.mark.parametrize(
    "fmt,dtype,config",
    [
        ("int4", torch.bfloat16, GemvConfig(32, 1, 4, 2)),
        ("int4-asym", torch.float16, GemvConfig(64, 2, 4, 2)),
        ("int4", torch.float16, GemvConfig(32, 1, 4, 2, split_k=2)),  # one K step per split
        ("int4-asym", torch.bfloat16, GemvConfig(16, 2, 2, 2)),
        ("int4", torch.bfloat16, GemvConfig(32, 1, 4, 3, mma=True)),  # tensor cores
        ("int4-asym", torch.float16, GemvConfig(32, 1, 4, 2, split_k=2, mma=True)),
        ("int3", torch.bfloat16, GemvConfig(32, 2, 4, 2)),  # int3: chunk words across two groups per step
        ("int3-asym", torch.float16, GemvConfig(32, 1, 4, 2, split_k=2)),
        ("int3", torch.float16, GemvConfig(32, 1, 4, 3, mma=True)),
    ],
)
def test_gemv_single_group_format(fmt, dtype, config):
    """The GEMV path on layers of one group-quantized format (the case the runtime sends it), both activation
    dtypes: the int32-word activation split and the mantissa-bit code decode against fp32 torch math."""
    experts, hidden, inter, k = 8, 512, 256, 2
    mod = random_experts(experts, hidden, inter, [fmt] * experts, device=DEVICE, seed=5)
    x, w, ids = routing(3, experts, k, 11, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=config)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2


@pytest.mark.parametrize(
    "fmt,config",
    [
        ("int4", GemvConfig(32, 1, 4, 2)),
        ("int4-asym", GemvConfig(32, 1, 4, 2, split_k=2, mma=True)),
        ("int4", GemmConfig(16, 64, 128, 4, 2)),
        ("bf16", GemmConfig(16, 64, 128, 4, 2, inline_dispatch=True)),
        ("int3", GemvConfig(32, 1, 4, 2)),
    ],
)
def test_one_format_layers_skip_the_table_loads(fmt, config):
    """A layer of one format in expert-id order reads expert e at slot e without the (format, slot) tables: the
    same bits as through the tables; a layer whose slab order is not the id order keeps the tables."""
    import dataclasses

    from exq.kernels.moe_op import KERNEL_FORMATS, kernel_block, kernel_blocks

    experts, hidden, inter, k = 8, 256, 256, 2
    mod = random_experts(experts, hidden, inter, [fmt] * experts, device=DEVICE, seed=8)
    gu, dn = kernel_blocks(mod)
    assert gu.one_format == dn.one_format == KERNEL_FORMATS[fmt]
    x, w, ids = routing(6, experts, k, 4, hidden, torch.bfloat16)
    out = fused_moe(x, w, ids, (gu, dn), config=config)
    tables = tuple(dataclasses.replace(b, one_format=-1) for b in (gu, dn))
    assert torch.equal(out, fused_moe(x, w, ids, tables, config=config))
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    mod.gate_up.order = mod.gate_up.order[::-1]  # slab position != expert id: the tables are needed
    assert kernel_block(mod.gate_up).one_format == -1


@pytest.mark.parametrize("formats", [["int4"] * 8, ["int3-asym"] * 8, ["bf16"] * 8, ["int4", "bf16"] * 4])
def test_blocks_of_one_format_are_stored_in_id_order(formats):
    """The layout pass orders a slab by heat; a one-format block is put in id order in memory (same weights per
    expert, so the kernels may read expert e at slot e); a mixed block keeps its slabs."""
    from exq.kernels.moe_op import kernel_block
    from exq.runtime.experts import QuantizedBlock

    layout = layout_for(formats)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3)).tolist()
    for _, start, count in layout["slabs"]:  # shuffle each slab's order, as the layout pass would
        ids = layout["order"][start : start + count]
        layout["order"][start : start + count] = [ids[i] for i in perm if i < count]
    block = QuantizedBlock(layout, 64, 256)
    for slab in block.slabs.values():
        for t in slab.buffers(recurse=False):
            t.copy_(torch.randint(0, 255, t.shape).to(t.dtype) if t.dtype == torch.uint8 else torch.randn(t.shape))
    before = block.dequantized(torch.float32)
    block.store_in_id_order()
    assert torch.equal(block.dequantized(torch.float32), before)
    one = len(set(formats)) == 1
    assert (block.order == list(range(8))) == one
    assert (kernel_block(block).one_format >= 0) == one


@pytest.mark.parametrize(
    "dtype,tokens,config",
    [
        (torch.bfloat16, 5, GemvConfig(32, 1, 4, 2)),
        (torch.float16, 3, GemvConfig(64, 1, 4, 2, split_k=2)),  # 3 x 2 partials per tile: a masked power of two
        (torch.bfloat16, 1, (GemmConfig(16, 64, 128, 4, 2), GemvConfig(32, 1, 4, 2))),  # counters zeroed by torch
    ],
)
def test_gemv_down_sums_top_k_in_its_last_program(dtype, tokens, config):
    """The down GEMV's last program per (token, column tile) sums the weighted top-k partials: the same bits on a
    second call (the gate_up launch re-zeroes the counters), a zero row for a token whose experts all live on
    other ranks, dropped slots adding nothing."""
    experts, hidden, inter, k = 8, 256, 256, 3
    fmts = mixed_formats(experts, {"int4": 0.5, "int4-asym": 0.5}, seed=tokens)
    mod = random_experts(experts, hidden, inter, fmts, device=DEVICE, seed=6)
    x, w, ids = routing(tokens, experts, k, 20 + tokens, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=config)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    assert torch.equal(fused_moe(x, w, ids, mod, config=config), out)
    foreign = ids.clone()
    foreign[0] = -1  # token 0: no local expert
    foreign[-1, 1:] = experts  # the last token keeps one local expert
    out = fused_moe(x, w, foreign, mod, config=config, expert_parallel=True)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    if tokens > 1:
        kept = ((foreign >= 0) & (foreign < experts)).to(w.dtype)
        assert rel_err(out, reference(x, w * kept, ids, mod)) < 1e-2


@pytest.mark.parametrize(
    "cfg",
    [
        GemvConfig(32, 1, 4, 2, 1),
        GemvConfig(32, 1, 4, 2, 2),
        GemvConfig(32, 1, 4, 2, one_launch=True),  # counters in a workspace each launch leaves zeroed
        GemmConfig(16, 64, 128, 4, 2, inline_dispatch=True),  # down's epilogue sums top-k, gate_up zeroes counters
        GemmConfig(32, 64, 128, 4, 2),
    ],
)
def test_op_needs_no_fresh_memory_and_replays_in_a_cuda_graph(monkeypatch, cfg):
    """Every buffer the op allocates with torch.empty starts as garbage (what a replayed CUDA graph or a reused
    allocation leaves): the in-kernel counters must be reset and every workspace written before it is read. On a
    GPU the op is also captured once and replayed on new activations and routing."""
    experts, hidden, inter, k = 16, 512, 256, 4
    mod = random_experts(experts, hidden, inter, ["int4"] * experts, device=DEVICE, seed=8)
    x, w, ids = routing(2, experts, k, 30, hidden, torch.bfloat16)
    want = reference(x, w, ids, mod)
    real_empty = torch.empty

    def dirty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(7)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", dirty)
        for _ in range(2):
            assert rel_err(fused_moe(x, w, ids, mod, config=cfg), want) < 1e-2
    if DEVICE != "cuda":
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe(x, w, ids, mod, config=cfg)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w, ids, mod, config=cfg)
    for seed in (31, 32, 33):
        x2, w2, ids2 = routing(2, experts, k, seed, hidden, torch.bfloat16)
        x.copy_(x2), w.copy_(w2), ids.copy_(ids2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(x2, w2, ids2, mod)) < 1e-2


@pytest.mark.parametrize(
    "config",
    [
        GemmConfig(16, 64, 128, 4, 2, inline_dispatch=True),
        (GemmConfig(16, 64, 256, 4, 2), GemmConfig(32, 64, 128, 4, 2)),  # down's own dispatch, made before gate_up
        GemmConfig(64, 64, 128, 4, 2),  # down without the top-k sum in its epilogue
    ],
)
def test_down_launched_early_gives_the_same_bits(config, monkeypatch):
    """On Hopper the down GEMM is a programmatic dependent of gate_up (v26): launched while gate_up runs, it waits
    for gate_up's end before its first access; so is gate_up of the one-launch dispatch before it (v27). The same
    bits as the launches in order, eagerly and replayed in a CUDA graph on new routing; on CPU (the interpreter) the
    launches stay in order."""
    from exq.kernels import moe_op

    experts, hidden, inter, k = 16, 512, 256, 4
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=5), device=DEVICE, seed=5)
    x, w, ids = routing(24, experts, k, 50, hidden, torch.bfloat16)
    out = fused_moe(x, w, ids, mod, config=config)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    if DEVICE != "cuda":
        assert not moe_op._has_pdl(x.device)
        return
    assert moe_op._has_pdl(x.device) == (torch.cuda.get_device_capability()[0] >= 9)
    cfgs = config if isinstance(config, tuple) else (config,)
    made = list(moe_op._dispatches(ids, moe_op.kernel_blocks(mod)[0], ids.numel(), *cfgs, pdl=True).values())
    assert [d.pdl for d in made] == [False] * (len(made) - 1) + [True] * bool(made)  # only the one before gate_up
    monkeypatch.setattr(moe_op, "PDL", False)
    assert torch.equal(fused_moe(x, w, ids, mod, config=config), out)
    monkeypatch.setattr(moe_op, "PDL", True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe(x, w, ids, mod, config=config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fused_moe(x, w, ids, mod, config=config)
    for seed in (51, 52):
        x2, w2, ids2 = routing(24, experts, k, seed, hidden, torch.bfloat16)
        x.copy_(x2), w.copy_(w2), ids.copy_(ids2)
        replayed.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(moe_op, "PDL", False)
        assert torch.equal(replayed, fused_moe(x, w, ids, mod, config=config))
        monkeypatch.setattr(moe_op, "PDL", True)


@pytest.mark.parametrize(
    "dtype,tokens,config",
    [
        (torch.bfloat16, 5, GemmConfig(16, 64, 128, 4, 2)),  # dispatched row blocks
        (torch.float16, 21, GemmConfig(16, 32, 128, 4, 2, inline_dispatch=True)),  # a hot expert over 2 blocks
        (torch.bfloat16, 40, GemmConfig(64, 64, 64, 4, 2, fold_scales=True)),  # the prefill tile, 4 column tiles
        (torch.bfloat16, 3, (GemvConfig(32, 1, 4, 2), GemmConfig(16, 64, 128, 4, 2))),  # counters zeroed by torch
    ],
)
def test_gemm_down_sums_top_k_in_its_epilogue(dtype, tokens, config, monkeypatch):
    """The down GEMM's last program per (token, column tile) sums the token's top-k rows in slot order: the same
    bits as the separate sum (the expert-parallel path keeps it) and on a second call (gate_up re-zeroes the
    counters), whichever program comes last. Any row block may do it (the op uses it up to 32 rows)."""
    from exq.kernels import configs

    monkeypatch.setattr(configs, "TOPK_SUM_MAX_BLOCK_M", 128)
    experts, hidden, inter, k = 8, 256, 128, 3
    fmts = mixed_formats(experts, {"int4": 0.5, "bf16": 0.25, "int8": 0.25}, seed=tokens)
    mod = random_experts(experts, hidden, inter, fmts, device=DEVICE, seed=9)
    x, w, ids = routing(tokens, experts, k, 40 + tokens, hidden, dtype)
    if tokens > 20:
        # expert 2 over two 16-row blocks (slot 0 of the first 20 tokens, where no other slot holds it already)
        ids[:20, 0] = torch.where((ids[:20, 1:] == 2).any(1), ids[:20, 0], 2)
    out = fused_moe(x, w, ids, mod, config=config)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    summed_after = fused_moe(x, w, ids, mod, config=config, expert_parallel=True).float()
    if DEVICE == "cuda":
        assert torch.equal(summed_after, out.float())
    else:  # the interpreter truncates fp32 -> bf16 where torch (and the GPU) round: one unit in the last place
        assert torch.allclose(summed_after, out.float(), rtol=2**-7, atol=0)
    assert torch.equal(fused_moe(x, w, ids, mod, config=config), out)


def test_expert_parallel_ids_contribute_nothing():
    experts, hidden, inter = 8, 128, 128
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL), device=DEVICE, seed=2)
    x, w, ids = routing(4, experts, 2, 3, hidden, torch.bfloat16)
    foreign = ids.clone()
    foreign[:, 1] = -1  # the second choice lives on another rank
    out = fused_moe(x, w, foreign, mod, expert_parallel=True)
    ref = reference(x, w[:, :1], ids[:, :1], mod)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("mma", [False, True])
@pytest.mark.parametrize("grid_order", [True, False])
def test_one_launch_leaves_its_counters_zeroed(mma, grid_order, monkeypatch):
    """The one-launch decode kernel's counters (a count per pair, a count per token and column tile) are
    all set back to zero by their last user, so launch after launch runs without a memset; ids of other ranks
    still count (their down items must not wait forever) and contribute nothing. Both item orders: the grid's, and
    the atomic ticket kept for GPUs without in-order block dispatch (its word reset by the last program too)."""
    from exq.kernels import moe_op
    from exq.kernels.moe_op import kernel_blocks

    monkeypatch.setattr(moe_op, "grid_order_dispatch", lambda: grid_order)

    experts, hidden, inter, k = 8, 256, 128, 3
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=4), device=DEVICE, seed=4)
    # the ticket runs with the pairs in expert order (ids of other ranks ranked too)
    cfg = GemvConfig(32, 1, 4, 2, mma=mma, one_launch=True, expert_order=not grid_order)
    for tokens, seed in ((3, 40), (1, 41), (6, 42)):
        x, w, ids = routing(tokens, experts, k, seed, hidden, torch.bfloat16)
        assert rel_err(fused_moe(x, w, ids, mod, config=cfg), reference(x, w, ids, mod)) < 1e-2
        foreign = ids.clone()
        foreign[:, 1] = -1
        out = fused_moe(x, w, foreign, mod, config=cfg, expert_parallel=True)
        keep = [0, 2]
        assert rel_err(out, reference(x, w[:, keep], ids[:, keep], mod)) < 1e-2
        counters = kernel_blocks(mod)[0]._counters
        assert len(counters) == 1 and counters[0].numel() >= tokens * k + 1 + tokens * hidden // 32
        assert not counters[0].any()


def test_one_launch_needs_both_projections():
    from exq.kernels.moe_op import KernelBlock, default_configs, kernel_blocks

    mod = random_experts(8, 256, 128, ["int4"] * 8, device=DEVICE)
    x, w, ids = routing(2, 8, 2, 0, 256, torch.bfloat16)
    one = GemvConfig(32, 1, 4, 2, one_launch=True)
    for pair in (
        (one, GemvConfig(32, 1, 4, 2)),
        (GemvConfig(32, 1, 4, 2), one),
        (one, GemvConfig(32, 1, 4, 3, one_launch=True)),
    ):
        with pytest.raises(ExqError, match="one_launch"):
            fused_moe(x, w, ids, mod, config=pair)
    with pytest.raises(ExqError, match="one_launch"):
        fused_moe(x, w, ids, mod, config=GemvConfig(32, 1, 4, 2, split_k=2, one_launch=True))
    with pytest.raises(ExqError, match="one_launch"):  # one item order for the whole launch
        fused_moe(x, w, ids, mod, config=(one, replace(one, expert_order=True)))
    with pytest.raises(ExqError, match="cannot compile"):  # an item order needs the one launch
        fused_moe(x, w, ids, mod, config=GemvConfig(32, 1, 4, 2, expert_order=True))
    # the default rule asks for one launch on layers with int4 experts at 16-32 pairs (v22; v19 from 17, mixed
    # formats only), K steps of two groups where K allows (a down K of 384 takes one); two launches around it and
    # on layers with int3 experts (both projections' rules must agree)
    plan = random_experts(128, 256, 256, mixed_formats(128, PLAN_V18), device=DEVICE)
    blocks = kernel_blocks(plan)
    two_groups = GemvConfig(64, 2, 4, 3, mma=True)
    one = replace(two_groups, one_launch=True)
    for pairs in (16, 24, 32):
        assert default_configs(pairs, *blocks) == (one, one)
    assert default_configs(48, *blocks) == (two_groups,) * 2
    assert default_configs(8, *blocks) == (GemvConfig(64, 1, 4, 4, mma=True),) * 2
    odd = random_experts(64, 256, 384, mixed_formats(64, PLAN_V18), device=DEVICE)
    assert default_configs(24, *kernel_blocks(odd)) == (one, replace(one, groups_per_step=1))
    int4 = random_experts(128, 256, 256, mixed_formats(128, {"int4": 1.0}), device=DEVICE)
    assert default_configs(16, *kernel_blocks(int4)) == (one, one)
    assert not default_configs(8, *kernel_blocks(int4))[0].one_launch
    int3 = random_experts(64, 256, 256, mixed_formats(64, {"int3": 0.5, "int4": 0.5}), device=DEVICE)
    assert not any(c.one_launch for c in default_configs(24, *kernel_blocks(int3)))
    # experts too big for L2 (Mixtral's shape, sizes only): the GEMVs below a pair per expert, row blocks from there
    # (they read a shared expert once, the GEMVs once per pair)
    ids = torch.zeros(8, dtype=torch.int32)
    big = (
        KernelBlock(2 * 14336, 4096, ids, {}, frozenset({"int4"})),
        KernelBlock(4096, 14336, ids, {}, frozenset({"int4"})),
    )
    assert big[0].outgrows_l2 and big[1].outgrows_l2
    assert all(isinstance(c, GemvConfig) for c in default_configs(4, *big))
    assert all(isinstance(c, GemmConfig) and c.block_m == 16 for c in default_configs(8, *big))
    x, w, ids = routing(12, 128, 2, 5, 256, torch.bfloat16)
    assert rel_err(fused_moe(x, w, ids, plan), reference(x, w, ids, plan)) < 1e-2


@pytest.mark.parametrize(
    "shares,dtype,tokens,config",
    [
        ({"int4": 0.5, "int4-asym": 0.5}, torch.bfloat16, 9, GemmConfig(16, 128, 256, 4, 3, inline_dispatch=True)),
        ({"int4": 0.5, "int4-asym": 0.5}, torch.float16, 21, GemmConfig(32, 64, 512, 4, 2, fold_scales=True)),
        (ALL, torch.bfloat16, 30, GemmConfig(16, 64, 256, 4, 2)),
        (ALL, torch.bfloat16, 3, GemvConfig(32, 2, 4, 2, mma=True)),  # the tensor-core GEMV, one pair per tile
        ({"int4": 0.5, "int4-asym": 0.5}, torch.float16, 2, GemvConfig(64, 2, 4, 3, split_k=2, mma=True)),
    ],
)
def test_multi_group_k_steps_carry_scales_across_iterations(shares, dtype, tokens, config):
    """K steps of 2-4 groups over several loop iterations (K = 1024): each sub-step's scale and zero point, and
    the one loaded a step ahead for the next iteration, belong to their own group."""
    experts, hidden, inter, k = 8, 1024, 512, 2
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, shares, seed=tokens), device=DEVICE, seed=2)
    x, w, ids = routing(tokens, experts, k, tokens, hidden, dtype)
    assert rel_err(fused_moe(x, w, ids, mod, config=config), reference(x, w, ids, mod)) < 1e-2


def test_default_rule_for_experts_too_big_for_l2(monkeypatch):
    """Experts whose weights outgrow L2 (Mixtral's): dispatched row blocks side by side, not one program walking an
    expert's blocks (the inline dispatch), and the 128-row tile from 48 rows per expert (v14)."""
    from exq.kernels import configs
    from exq.kernels.moe_op import default_config, kernel_blocks

    int4 = kernel_blocks(random_experts(8, 512, 256, ["int4"] * 8, device=DEVICE))[0]
    mixed = kernel_blocks(random_experts(8, 512, 256, mixed_formats(8, ALL, seed=0), device=DEVICE))[0]
    bf16 = kernel_blocks(random_experts(8, 512, 256, ["bf16"] * 8, device=DEVICE))[0]
    assert default_config(128, 8, bf16).inline_dispatch
    monkeypatch.setattr(configs, "GROUP_WEIGHT_BYTES", 0)
    assert default_config(64, 8, int4) == GemmConfig(16, 128, 256, 4, 3)
    assert default_config(64, 8, mixed) == GemmConfig(16, 128, 256, 4, 3)
    # beyond 8 rows per expert, experts outgrowing L2 take 32-row blocks with the 16-row tile for partial ones (v25)
    assert default_config(128, 8, mixed) == GemmConfig(32, 128, 256, 4, 3, small_m=16)
    assert default_config(128, 8, bf16) == GemmConfig(16, 128, 128, 4, 4)  # one group, dispatched
    # the prefill tile's partial blocks: on the 64-row tile while an expert's block mostly holds <= 64 rows (v25),
    # else on the 16-row tile (v24)
    assert default_config(8 * 64, 8, int4) == GemmConfig(128, 128, 64, 8, 3, fold_scales=True, small_m=64)
    assert default_config(8 * 128, 8, int4) == GemmConfig(128, 128, 64, 8, 3, fold_scales=True, small_m=16)
    assert default_config(8 * 64, 8, bf16).small_m == 0  # v24's partial-block tile measured on int4 / mixed only


def test_default_rule_dispatches_int4_layers_of_16_to_48_rows_per_expert():
    """v29: at 17-48 rows per expert a layer with int4 experts takes dispatched 32-row blocks, also where the inline
    dispatch would apply (at most INLINE_DISPATCH_PAIRS pairs); layers without int4 experts keep it."""
    from exq.kernels.configs import INLINE_DISPATCH_PAIRS
    from exq.kernels.moe_op import default_config, kernel_blocks

    for fmts, inline in ((["int4"] * 8, False), (mixed_formats(8, PLAN_V18, seed=0), False), (["bf16"] * 8, True)):
        block = kernel_blocks(random_experts(8, 512, 256, fmts, device=DEVICE))[0]
        for per_expert in (17, 24, 48):
            assert 8 * per_expert <= INLINE_DISPATCH_PAIRS
            assert default_config(8 * per_expert, 8, block) == GemmConfig(32, 128, 128, 4, 3, inline_dispatch=inline)


PLAN_V18 = {"bf16": 0.25, "int8": 0.25, "int4": 0.5}


def test_default_rule_picks_a_path_per_layer_kind():
    """Without a planned config: the CUDA-core GEMV for int4 layers at decode, the tensor-core GEMV once bf16 /
    int8 experts are in the layer (all-bf16 layers too), GEMM row blocks for more pairs than experts."""
    from exq.kernels.moe_op import default_config, kernel_blocks

    blocks = {
        kind: kernel_blocks(random_experts(8, 256, 128, mixed_formats(8, shares, seed=0), device=DEVICE))[0]
        for kind, shares in (("int4", {"int4": 1.0}), ("mixed", ALL), ("bf16", {"bf16": 1.0}))
    }
    assert default_config(8, 8, blocks["int4"]) == GemvConfig(64, 2, 4, 2)  # few experts: GEMV up to E pairs
    assert default_config(8, 8, blocks["mixed"]).mma
    # layers of bf16 / int8 / int4 experts past a pair per 8 experts: the tensor-core GEMV takes two groups per K
    # step (v18); up to a pair per 8 experts, and for layers without int4 experts, one
    plan = kernel_blocks(random_experts(8, 256, 128, mixed_formats(8, PLAN_V18), device=DEVICE))[0]
    assert default_config(8, 8, plan) == GemvConfig(64, 2, 4, 3, mma=True)
    assert default_config(1, 8, plan) == GemvConfig(64, 1, 4, 4, mma=True)
    assert default_config(8, 8, blocks["bf16"]) == GemvConfig(64, 1, 4, 4, mma=True)
    assert default_config(8, 8, blocks["bf16"]).mma
    assert isinstance(default_config(9, 8, blocks["bf16"]), GemmConfig)
    assert default_config(9, 8, blocks["int4"]) == GemmConfig(16, 128, 256, 4, 3)  # v27: a dispatch launch
    assert default_config(9, 8, blocks["bf16"]).inline_dispatch  # v11: no dispatch launch at small sizes
    assert default_config(8 * 64, 8, blocks["mixed"]).block_m == 128  # small experts: 128-row tile from 48 rows
    assert default_config(8 * 40, 8, blocks["mixed"]).block_m == 32
    many = kernel_blocks(random_experts(64, 256, 128, ["int4"] * 64, device=DEVICE))[0]
    assert isinstance(default_config(32, 64, many), GemvConfig)  # E / 2 pairs
    assert isinstance(default_config(64, 64, many), GemmConfig)  # E pairs: the 16-row tile wins (v13)
    assert default_config(64, 64, many).block_m == 16
    # layers with int4 experts at 16-row tiles with K a multiple of 256: two groups per K iteration, 128 columns
    # (v14), row blocks from the dispatch launch (v27); all-bf16 layers keep 128-input steps
    wide = kernel_blocks(random_experts(64, 512, 128, ["int4"] * 64, device=DEVICE))[0]
    assert default_config(256, 64, wide) == GemmConfig(16, 128, 256, 4, 3)
    assert default_config(512, 64, wide) == GemmConfig(16, 128, 256, 4, 3)
    assert default_config(9, 8, blocks["mixed"]) == GemmConfig(16, 128, 256, 4, 3)
    assert default_config(9, 8, blocks["bf16"]).block_k == 128
    # int4 at a pair or less per 8 experts: 4-group K steps when K allows them; tensor cores when K % 256 != 0
    assert default_config(8, 64, wide) == GemvConfig(32, 4, 4, 2)
    assert default_config(9, 64, wide) == GemvConfig(64, 2, 4, 2)
    odd = kernel_blocks(random_experts(64, 384, 128, ["int4"] * 64, device=DEVICE))[0]
    assert default_config(8, 64, odd).mma
    # layers with int3 experts at decode: the tensor-core GEMV with K cut in two where K allows (v15)
    int3 = kernel_blocks(random_experts(8, 256, 128, mixed_formats(8, {"int4": 0.5, "int3": 0.5}), device=DEVICE))
    assert default_config(8, 8, int3[0]) == GemvConfig(64, 1, 4, 3, split_k=2, mma=True)  # K = 256
    assert default_config(8, 8, int3[1]) == GemvConfig(64, 1, 4, 4, mma=True)  # K = 128: one 128-step per split
    assert default_config(512, 64, odd).block_k == 128  # K a multiple of 128 only: one group per step


@pytest.mark.parametrize(
    "dtype,tokens,config",
    [
        # 32-row blocks, partial ones on the 16-row tile; down sums top-k in its epilogue on both tiles
        (torch.bfloat16, 40, GemmConfig(32, 64, 128, 4, 2, small_m=16)),
        # the 64-row wgmma tile (joined nibbles, folded scales), partial blocks on the 16-row mma.sync tile
        (torch.float16, 40, GemmConfig(64, 64, 64, 4, 2, fold_scales=True, small_m=16)),
        # 128 rows, partial blocks on the same tile at 64 rows
        (torch.bfloat16, 150, GemmConfig(128, 64, 64, 4, 2, fold_scales=True, small_m=64)),
    ],
)
def test_partial_row_blocks_take_the_small_tile(dtype, tokens, config):
    """Blocks whose rows fit in small_m run the small tile in the same launch as the full ones: every format, both
    activation types; the routing has blocks of both kinds (else the test would not reach the branch)."""
    from exq.kernels.dispatch import dispatch

    experts, hidden, inter, k = 8, 256, 128, 2
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=tokens), device=DEVICE, seed=3)
    x, w, ids = routing(tokens, experts, k, 70 + tokens, hidden, dtype)
    ids[: tokens // 2, 0] = torch.where((ids[: tokens // 2, 1:] == 5).any(1), ids[: tokens // 2, 0], 5)  # a hot one
    d = dispatch(ids.to(torch.int32), experts, config.block_m)
    rows = (d.sorted_pairs.view(-1, config.block_m) < tokens * k).sum(1)[: d.num_blocks].tolist()
    assert any(0 < r <= config.small_m for r in rows) and any(r > config.small_m for r in rows), rows
    out = fused_moe(x, w, ids, mod, config=config)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2


def test_errors_name_the_problem():
    from exq.kernels.moe_op import kernel_blocks

    mod = random_experts(4, 128, 128, ["int4"] * 4, device=DEVICE)
    x, w, ids = routing(2, 4, 2, 0, 128, torch.bfloat16)
    with pytest.raises(ExqError, match="activation"):
        fused_moe(x, w, ids, mod, activation="gelu")
    with pytest.raises(ExqError, match="bf16 or fp16"):
        fused_moe(x.float(), w, ids, mod)
    with pytest.raises(ExqError, match="hidden size"):
        fused_moe(torch.randn(2, 256, dtype=torch.bfloat16, device=DEVICE), w, ids, mod)
    with pytest.raises(ExqError, match="tokens = 1"):  # would read past hidden's last row
        fused_moe(x[:1], w, ids, mod)
    with pytest.raises(ExqError, match="top_k"):
        fused_moe(x, w, ids.reshape(-1), mod)
    with pytest.raises(ExqError, match="int32 / int64"):
        fused_moe(x, w, ids.float(), mod)
    with pytest.raises(ExqError, match="shaped like topk_ids"):
        fused_moe(x, w[:, :1], ids, mod)
    with pytest.raises(ExqError, match="4 experts but down has 8"):
        other = random_experts(8, 128, 128, ["int4"] * 8, device=DEVICE)
        fused_moe(x, w, ids, (kernel_blocks(mod)[0], kernel_blocks(other)[1]))
    assert torch.equal(fused_moe(x, w, ids.long(), mod), fused_moe(x, w, ids, mod))  # int64 ids work alike
    with pytest.raises(ExqError, match="cannot compile"):
        fused_moe(x, w, ids, mod, config=GemmConfig(8, 64, 128))
    with pytest.raises(ExqError, match="cannot compile"):
        fused_moe(x, w, ids, mod, config=(GemmConfig(16), GemvConfig(48, 1)))
    with pytest.raises(ExqError, match="divide in_features 128"):  # a two-group K step on K = 128
        fused_moe(x, w, ids, mod, config=GemmConfig(16, 64, 256))
    with pytest.raises(ExqError, match="flags True / False"):
        fused_moe(x, w, ids, mod, config=GemmConfig(16, inline_dispatch="yes"))
    for bad in (
        GemmConfig(32, small_m=32),
        GemmConfig(64, small_m=24),
        GemmConfig(32, small_m=16, inline_dispatch=True),
    ):
        with pytest.raises(ExqError, match="small_m 0 or a power of two"):
            fused_moe(x, w, ids, mod, config=bad)
    with pytest.raises(ExqError, match="cannot compile"):
        fused_moe(x, w, ids, mod, config=GemvConfig(32, 1, one_launch="yes"))
    with pytest.raises(ExqError, match="GemmConfig, a GemvConfig"):
        fused_moe(x, w, ids, mod, config={"block_m": 16})
    with pytest.raises(ExqError, match="divisible by 128 x groups_per_step"):  # K = 128: no 2-group step
        fused_moe(x, w, ids, mod, config=GemvConfig(32, 2, mma=True))
    with pytest.raises(ExqError, match="divisible by 128"):  # K = 128 cannot split in 2 steps of 128
        fused_moe(x, w, ids, mod, config=GemvConfig(32, 1, split_k=2, mma=True))
    int2 = random_experts(4, 128, 128, ["int4"] * 4, device=DEVICE)
    int2.gate_up.slab_spec[0] = ("int2-asym", 0, 4)
    with pytest.raises(ExqError, match="no fused kernel"):
        fused_moe(x, w, ids, int2)


def test_bench_without_a_gpu_says_so(capsys, tmp_path, monkeypatch):
    from exq.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "kernels", "--output", str(tmp_path / "k.json")]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "kernels", "--layers", "4"]) != 0
    assert "at least 8" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()


def test_bench_sweep_skips_a_tile_the_gpu_cannot_hold(monkeypatch):
    """A candidate that does not fit (shared memory) is recorded as skipped; the sweep goes on with the rest."""
    from triton.runtime.errors import OutOfResources

    import exq.bench.kernels as bk
    import exq.kernels as ek

    def fake_op(x, w, ids, mod, config=None):
        if any(c is not None and c.block_m == 128 for c in (config if isinstance(config, tuple) else (config,))):
            raise OutOfResources(245760, 232448, "shared memory")
        return x

    # the default rule twice (the first timing thrown away), the two tiles that fit, then the runner-up on one
    # projection with the best on the other (the tile that did not fit is not tried again there)
    timings = iter([99.0, 30.0, 20.0, 25.0, 22.0, 21.0])
    monkeypatch.setattr(ek, "fused_moe", fake_op)
    monkeypatch.setattr(bk, "graph_time_us", lambda step, layers, reps: step(0) is None or next(timings))
    mods = [random_experts(4, 128, 128, ["int4"] * 4, seed=s) for s in range(2)]
    x, w, ids = routing(3, 4, 2, 0, 128, torch.bfloat16)
    routes = [(w.cpu(), ids.cpu().to(torch.int32))] * 2
    cands = [GemmConfig(16, 64, 128), GemmConfig(128, 128, 128, 8, 3), GemmConfig(32, 64, 128)]
    row = bk.bench_layer(x.cpu(), routes, mods, "int4", (4, 128, 128, 2), 2, 3, None, bk.Floors(1e12, 1e15), cands)
    assert list(row["exq_skipped"]) == [bk.config_name(cands[1])]
    assert "shared memory" in row["exq_skipped"][bk.config_name(cands[1])]
    assert row["exq_default_us"] == 30.0
    assert row["exq_us"] == 20.0 and row["exq_config"] == bk.config_name(cands[0])
    assert row["exq_sweep"][bk.config_name((cands[0], cands[2]))] == 21.0
    assert parse_bench_config(row["exq_config"]) == cands[0]  # the name reads back as the same config


def test_sglang_wheel_that_is_not_one_is_named(tmp_path):
    import zipfile

    from exq.bench import sglang_ref

    with pytest.raises(ExqError, match="no sglang wheel at"):
        sglang_ref.load(tmp_path / "missing.whl")
    (tmp_path / "text.whl").write_text("not a zip")
    with pytest.raises(ExqError, match="not a wheel"):
        sglang_ref.load(tmp_path / "text.whl")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("other/__init__.py", "")
    with pytest.raises(ExqError, match=r"fused_moe_triton_kernels\.py"):
        sglang_ref.load(tmp_path / "other.whl")


@pytest.mark.parametrize("group", [3, 16])  # 13 row blocks: a last group of 1, one group of all
def test_grouped_row_block_order_gives_the_same_bits(group, monkeypatch):
    """Experts too big for L2 take each column tile with several row blocks together (a different program order,
    a partial last group): every tile is still computed once, exactly as in the plain order."""
    from exq.kernels import configs

    experts, hidden, inter, k = 8, 256, 128, 2
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=3), device=DEVICE, seed=7)
    x, w, ids = routing(37, experts, k, 11, hidden, torch.bfloat16)
    cfg = GemmConfig(16, 64, 128, 4, 2)
    plain = fused_moe(x, w, ids, mod, config=cfg)
    monkeypatch.setattr(configs, "GROUP_WEIGHT_BYTES", 0)
    monkeypatch.setattr(configs, "GROUP_ROW_BLOCKS", group)
    assert torch.equal(fused_moe(x, w, ids, mod, config=cfg), plain)
    assert rel_err(plain, reference(x, w, ids, mod)) < 1e-2


def test_bench_candidates_are_valid_and_cover_each_tile_kind():
    """Every config `exq bench kernels` sweeps passes the op's validation, and each regime gets its tile kinds:
    inline-dispatch small tiles at decode sizes, folded big tiles at prefill (never for all-bf16 layers)."""
    from exq.bench import PLANS, SHAPES, group_quantized
    from exq.bench.kernels import default_candidates
    from exq.kernels.moe_op import _check_config

    for plan in PLANS:
        for t in (1, 4, 16, 64, 256, 1024, 4096):
            cands = default_candidates(plan, t, SHAPES["olmoe-1b-7b"])
            assert cands and len(set(cands)) == len(cands)
            for c in cands:
                _check_config(c)
            if t == 1:  # the CUDA-core GEMV only where every expert is group-quantized (int4 / int3)
                cuda_cores = any(isinstance(c, GemvConfig) and not c.mma for c in cands)
                assert cuda_cores == group_quantized(plan) == (plan in ("int4", "int3"))
            big = [c for c in cands if isinstance(c, GemmConfig) and c.fold_scales]
            assert (plan != "bf16" and t >= 1024) <= bool(big) and (plan != "bf16" or not big)
            if t in (16, 64):
                assert any(isinstance(c, GemmConfig) and c.inline_dispatch and c.block_m == 16 for c in cands)


def benchmark_module(name: str):
    """A script of benchmarks/ (not a package) loaded as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_sweep_candidates_are_valid_for_every_shape():
    """benchmarks/kernel_sweep.py's candidate lists (single configs and (gate_up, down) pairs), fitted to each bench
    shape, pass the op's validation; a one-launch candidate stays a pair the kernel can run as one launch."""
    from exq.bench import PLANS, SHAPES
    from exq.kernels.moe_op import _check_config, one_launch_pair

    sweep = benchmark_module("kernel_sweep")
    pick = sweep.candidates(None)
    pairs_seen = 0
    for shape in SHAPES.values():
        _, h, i, _ = shape
        for plan in PLANS:
            for t in (1, 4, 16, 64, 256, 1024, 4096):
                cands = pick(plan, t, shape)
                assert cands and len(set(cands)) == len(cands)
                for c in cands:
                    parts = c if isinstance(c, tuple) else (c, c)
                    for part, k_in in zip(parts, (h, i), strict=True):
                        _check_config(part)
                        if isinstance(part, GemvConfig):
                            assert k_in % part.k_step == 0, (c, k_in)
                    if any(getattr(p, "one_launch", False) for p in parts):
                        assert one_launch_pair(*parts), c
                    pairs_seen += isinstance(c, tuple)
    assert pairs_seen  # the per-projection pairs (e.g. one launch with 128-column down items) are among them


def test_kernel_sweep_dispatch_variants_pair_each_table_config_with_the_other_dispatch():
    """--dispatch-variants: per table cell its config and the same tiles with the other dispatch on every GEMM
    projection; never the inline dispatch with small_m or past INLINE_DISPATCH_PAIRS (the op rejects / ignores it)."""
    from exq.bench import SHAPES
    from exq.kernels.configs import INLINE_DISPATCH_PAIRS
    from exq.kernels.moe_op import _check_config

    sweep = benchmark_module("kernel_sweep")
    inline, plain = GemmConfig(16, 64, 128, 4, 2, inline_dispatch=True), GemmConfig(16, 64, 128, 4, 2)
    blocked = GemmConfig(32, 64, 128, 4, 2, small_m=16)
    entry = {"shape": "olmoe-1b-7b", "class": "int4", "tokens": 16}
    table = {"entries": [
        {**entry, "config": {"kind": "gemm", **inline.as_dict(), "down": {"kind": "gemm", **blocked.as_dict()}}},
        {**entry, "tokens": 64, "config": {"kind": "gemm", **plain.as_dict()}},
        {**entry, "tokens": 256, "config": {"kind": "gemv", **GemvConfig(64, 2, 4, 3).as_dict()}},
    ]}  # fmt: skip
    pick = sweep.dispatch_variants(table)
    olmoe = SHAPES["olmoe-1b-7b"]
    assert pick("int4", 16, olmoe) == [(inline, blocked), (plain, blocked)]
    assert pick("int4", 64, olmoe) == [plain, inline]
    assert pick("int4", 256, olmoe) == [GemvConfig(64, 2, 4, 3)]  # no GEMM: nothing to flip
    assert pick("mixed", 16, olmoe) == [] and pick("int4", 16, SHAPES["qwen3-30b-a3b"]) == []
    many = INLINE_DISPATCH_PAIRS // olmoe[3] + 1  # past the inline limit: dispatched rows stay dispatched
    table["entries"][1]["tokens"] = many
    assert pick("int4", many, olmoe) == [plain]
    for c in (inline, plain, blocked):
        _check_config(c)


def test_dispatch_bench_forms_agree_with_a_brute_force_dispatch_and_it_plots(tmp_path, monkeypatch):
    """benchmarks/dispatch_bench.py: every form it times gives the brute-force dispatch, chunk forms only where they
    split the batch; its plot is written; without a GPU it says so and writes nothing."""
    bench = benchmark_module("dispatch_bench")
    forms = bench.forms(600, [256, 512, 1024], [4])
    assert set(forms) == {"dispatch", "chunked", "sorted", "chunk256_w4", "chunk512_w4"}
    assert "sorted" not in bench.forms(bench.SORT_MAX + 1, [], [4])
    ids = torch.randint(0, 24, (100, 6), generator=torch.Generator().manual_seed(4), dtype=torch.int32)
    want = brute_force_dispatch(ids.tolist(), 24, 16)
    for name, fn in forms.items():
        d = fn(ids.to(DEVICE), 24, 16)
        assert (d.sorted_pairs.tolist(), d.block_expert.tolist()) == want, name
    rows = [{"experts": 24, "top_k": 6, "block_m": 16, "pairs": p, "best": {"sorted": p / 100, "chunked": 5.0}}
            for p in (300, 600)]  # fmt: skip
    bench.plot(rows, tmp_path / "dispatch.png")
    assert (tmp_path / "dispatch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.experts_top_k("128X6") == (128, 6)
    for bad in ("64-8", "8x16", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="top-k"):
            bench.experts_top_k(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["dispatch_bench.py", "--output", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit, match="NVIDIA GPU"):
        bench.main()
    assert not (tmp_path / "out.json").exists()


def test_pdl_edges_only_on_hopper_tiles_whose_experts_stay_in_l2(monkeypatch):
    """Which launches start early (v26 / v27): down after gate_up for row blocks up to PDL_MAX_BLOCK_M without
    expert parallelism, gate_up after the one-launch dispatch; neither with a GEMV gate_up, for experts that outgrow
    L2, off either switch, or without PDL on the device (the interpreter)."""
    from exq.kernels import configs, moe_op

    small = moe_op.kernel_blocks(random_experts(8, 256, 128, ["int4"] * 8))
    tile, big_rows = GemmConfig(16, 64, 128, 4, 2), GemmConfig(128, 64, 64, 8, 2)
    cpu = torch.device("cpu")
    assert moe_op._pdl_edges(tile, tile, *small, cpu) == (False, False)  # no PDL under the interpreter / on CPU
    monkeypatch.setattr(moe_op, "_has_pdl", lambda device: True)
    assert moe_op._pdl_edges(tile, tile, *small, cpu) == (True, True)
    assert moe_op._pdl_edges(tile, big_rows, *small, cpu) == (big_rows.block_m <= configs.PDL_MAX_BLOCK_M, True)
    assert moe_op._pdl_edges(tile, tile, *small, cpu, expert_parallel=True) == (False, True)
    assert moe_op._pdl_edges(GemvConfig(64, 2, 4, 3), tile, *small, cpu) == (False, False)
    monkeypatch.setattr(moe_op, "PDL_DISPATCH", False)
    assert moe_op._pdl_edges(tile, tile, *small, cpu) == (True, False)
    monkeypatch.setattr(moe_op, "PDL", False)
    assert moe_op._pdl_edges(tile, tile, *small, cpu) == (False, False)
    monkeypatch.setattr(moe_op, "PDL", True)
    monkeypatch.setattr(moe_op, "PDL_DISPATCH", True)
    monkeypatch.setattr(configs, "GROUP_WEIGHT_BYTES", 0)  # every expert outgrows L2 (Mixtral's case)
    big = moe_op.kernel_blocks(random_experts(8, 256, 128, ["int4"] * 8))
    assert big[0].outgrows_l2 and moe_op._pdl_edges(tile, tile, *big, cpu) == (False, False)


def test_bench_refines_decode_configs_per_projection():
    """The sweep's decode refinement: each GEMV candidate for one projection against the best on the other, then the
    pair of the two winners (a made-up timer whose best gate_up and down tiles differ)."""
    from exq.bench.kernels import per_projection

    best, a, b = GemvConfig(64, 2), GemvConfig(32, 4), GemvConfig(128, 1, mma=True)
    cost = {best: (10.0, 10.0), a: (8.0, 12.0), b: (11.0, 7.0)}  # (gate_up, down) µs per config
    times = per_projection(best, 20.0, [best, a, b, GemmConfig(16)], lambda pair: cost[pair[0]][0] + cost[pair[1]][1])
    assert times[a, best] == 18.0 and times[best, b] == 17.0
    assert times[a, b] == 15.0 and len(times) == 5  # 2 x 2 one-sided, the pair
    slow_gate_up = per_projection(
        best, 20.0, [a], lambda pair: cost[pair[0]][0] + cost[pair[1]][1] + 9 * (pair[0] != best)
    )
    assert list(slow_gate_up) == [(a, best), (best, a)]  # gate_up keeps best: no pair
    # one-launch GEMVs pair only with each other, at the kernel's one num_warps / num_stages
    one, one2, one_slow = (GemvConfig(64, 2, 4, 3, mma=True, one_launch=True), GemvConfig(64, 1, 4, 3, mma=True,
                           one_launch=True), GemvConfig(64, 1, 4, 4, mma=True, one_launch=True))  # fmt: skip
    paired = per_projection(one, 20.0, [one, one2, one_slow, a, b], lambda pair: 20.0)
    assert set(paired) == {(one2, one), (one, one2)}
    assert set(per_projection(a, 20.0, [a, b, one, one2], lambda pair: 20.0)) == {(b, a), (a, b)}


def test_bench_report_plots_any_plans(tmp_path):
    """The table and plot of `exq bench kernels` take whatever plans a run timed (an int3-only shape had no line to
    draw and failed on its log axis)."""
    from exq.bench import report

    def row(shape, plan, t, us):
        return {"shape": shape, "plan": plan, "tokens": t, "pairs": 8 * t, "hbm_floor_us": us / 3, "exq_us": us,
                "exq_pct_of_hbm_floor": 100 / 3, "compute_floor_us": 0.1 * t}  # fmt: skip

    rows = [row("olmoe-1b-7b", "int4", t, 20.0 * t) for t in (1, 4)]
    rows += [row("qwen3-30b-a3b", p, t, 40.0 * t) for p in ("int3", "mixed-int3") for t in (1, 4)]
    result = {"device": "GPU", "torch": "2", "triton": "3", "sglang": None, "layers_per_graph": 8, "reps": 50,
              "floors": {"copy_bytes_per_s": 3e12, "bf16_flops": 8e14}, "rows": rows}  # fmt: skip
    assert report.plot(result, tmp_path / "k.png").stat().st_size > 0
    table = report.markdown(result)
    assert "| qwen3-30b-a3b | 4 | mixed-int3 |" in table and table.count("\n| ") == len(rows) + 1


def test_kernel_status_takes_each_figure_from_the_last_run_that_measured_it(tmp_path):
    """benchmarks/kernel_status.py's cells: a later run overrides a cell's floor and compute shares, the ratio to
    SGLang only from rows that timed SGLang; plans and batch sizes outside the issue's are left out. Hand-computed
    figures; a result without rows stops with a message naming the file."""
    import subprocess
    import sys
    from pathlib import Path

    from exq.bench import report

    def row(plan, t, us, floor, compute, sglang=None):
        out = {"shape": "olmoe-1b-7b", "plan": plan, "tokens": t, "exq_us": us, "hbm_floor_us": floor,
               "compute_floor_us": compute}  # fmt: skip
        return out | ({"sglang_default_us": sglang} if sglang else {})

    old = {"device": "GPU", "rows": [row("int4", 4, 50.0, 30.0, 1.0, sglang=200.0), row("int4", 2, 40.0, 30.0, 1.0),
                                     row("bf16", 4, 60.0, 50.0, 1.0)]}  # fmt: skip
    new = {"device": "GPU", "rows": [row("int4", 4, 40.0, 30.0, 2.0), row("mixed", 1024, 400.0, 100.0, 150.0)]}
    cells = report.status_cells([old, new])
    assert set(cells) == {("olmoe-1b-7b", "int4", 4), ("olmoe-1b-7b", "mixed", 1024)}
    assert cells["olmoe-1b-7b", "int4", 4] == {"floor_pct": 75.0, "compute_pct": 5.0, "x_sglang": 4.0}
    assert cells["olmoe-1b-7b", "mixed", 1024] == {"floor_pct": 25.0, "compute_pct": 37.5}
    assert report.status_plot(cells, "GPU", tmp_path / "s.png").stat().st_size > 0
    assert report.status_by_batch(cells).splitlines() == [
        "| shape | plan | T = 4 | T = 1024 |",
        "|---|---|---|---|",
        "| olmoe-1b-7b | int4 | 75.0 %, 4.00× | - |",
        "| olmoe-1b-7b | mixed | - | 37.5 % cf |",
    ]
    (tmp_path / "bad.json").write_text('{"rows": 1}')
    script = Path(__file__).parents[1] / "benchmarks" / "kernel_status.py"
    run = subprocess.run([sys.executable, str(script), "bad.json", "--output", "s2.png"], cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0 and "bad.json is not an `exq bench kernels` result" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "s2.png").exists()


def test_kernel_status_names_a_row_it_cannot_use(tmp_path):
    """benchmarks/kernel_status.py: a row missing a figure, or results with no int4 / mixed row at the issue's batch
    sizes, stop with a message (no traceback) and no plot."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "kernel_status.py"
    (tmp_path / "partial.json").write_text('{"device": "G", "rows": [{"shape": "x", "plan": "int4", "tokens": 4}]}')
    (tmp_path / "bf16.json").write_text('{"device": "G", "rows": [{"shape": "x", "plan": "bf16", "tokens": 4}]}')
    for name, said in (("partial.json", "lacks a usable 'hbm_floor_us'"), ("bf16.json", "no int4 / mixed rows")):
        run = subprocess.run([sys.executable, str(script), name, "--output", "s.png"], cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode != 0 and said in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not (tmp_path / "s.png").exists()
