"""Triton GEMVs of a mixed-precision MoE layer at decode sizes: one program per (pair, column tile, K split), no
dispatch (the pair's expert comes from topk_ids), every expert in its own format, as `moe_gemm` reads the slabs.

`moe_gemv_kernel` runs one projection (CUDA-core FMAs on the packed codes, or the tensor-core tile of `moe_gemm` on a
single row); the down launch's last program per (token, column tile) sums over top-k. `moe_decode_kernel` runs both
projections as the work items of one launch. `gemv_reduce_kernel` finishes a gate_up GEMV whose K was split.
"""

from __future__ import annotations

import triton
import triton.language as tl

from exq.kernels.moe_gemm import _code_values, _expert_tile, _format_slot, _int3_chunks, _out_columns


@triton.jit
def _gemv_rows(
    a_ptr, a32_ptr, a_row, w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a, fmt, slot, rows, kb_lo, kb_hi,
    N: tl.constexpr, K: tl.constexpr, A_BF16: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT4_ASYM: tl.constexpr,
    HAS_INT3: tl.constexpr, HAS_INT3_ASYM: tl.constexpr,
    BN: tl.constexpr, GPS: tl.constexpr,
):  # fmt: skip
    """[BN] fp32 = W[rows] . a for one activation row, with CUDA-core FMAs (no tensor-core staging).

    K steps of GPS groups of 128, walked by packed-byte offset kb (a counter times a constant, so the compiler sees
    64-byte alignment): int4 bytes load as [BN, GPS, 64], contiguous 64-byte runs per row in 16-byte vectors. A is
    read as int32 words (two columns each) and split into even / odd columns with bit operations, instead of two
    stride-2 loads."""
    acc = tl.zeros((BN,), dtype=tl.float32)
    r64 = rows.to(tl.int64)
    g_ix = tl.arange(0, GPS)
    j = tl.arange(0, 64)
    for i in range(0, (kb_hi - kb_lo) // (64 * GPS)):
        kb = kb_lo + i * (64 * GPS)  # a counter times a constant: the compiler proves the 64-byte alignment
        words = tl.load(a32_ptr + a_row * (K // 2) + kb + g_ix[:, None] * 64 + j[None, :])  # [GPS, 64] int32
        a_even, a_odd = _a_columns(words, A_BF16)
        if HAS_BF16:
            if fmt == 0:
                kk = 2 * kb + g_ix[:, None] * 128 + 2 * j[None, :]
                base = w16 + slot * (N * K) + r64[:, None, None] * K + kk[None, :, :]
                part = tl.load(base).to(tl.float32) * a_even[None] + tl.load(base + 1).to(tl.float32) * a_odd[None]
                acc += tl.sum(tl.sum(part, axis=2), axis=1)
        if HAS_INT8:
            if fmt == 1:
                kk = 2 * kb + g_ix[:, None] * 128 + 2 * j[None, :]
                base = w8 + slot * (N * K) + r64[:, None, None] * K + kk[None, :, :]
                lo = tl.load(base).to(tl.float32) - 128.0
                hi = tl.load(base + 1).to(tl.float32) - 128.0
                acc += tl.sum(tl.sum(lo * a_even[None] + hi * a_odd[None], axis=2), axis=1)
        if HAS_INT4:
            if fmt == 2:
                b, sc, z = _int4_loads(w4, s4, s4, slot, r64, kb, N, K, False, GPS)
                acc += _int4_math(b, sc, z, a_even, a_odd)
        if HAS_INT4_ASYM:
            if fmt == 3:
                b, sc, z = _int4_loads(wa, sa, za, slot, r64, kb, N, K, True, GPS)
                acc += _int4_math(b, sc, z, a_even, a_odd)
        if HAS_INT3:
            if fmt == 4:
                acc += _int3_gemv(w3, s3, s3, slot, r64, kb, N, K, False, GPS, a32_ptr, a_row, A_BF16, a_even, a_odd)
        if HAS_INT3_ASYM:
            if fmt == 5:
                acc += _int3_gemv(w3a, s3a, z3a, slot, r64, kb, N, K, True, GPS, a32_ptr, a_row, A_BF16, a_even, a_odd)
    if HAS_INT8:
        if fmt == 1:
            acc = acc * tl.load(s8 + slot * N + rows).to(tl.float32)
    return acc


@triton.jit
def _a_columns(words, A_BF16: tl.constexpr):
    """Even and odd activation columns (fp32) from int32 words that each hold two bf16 / fp16 values."""
    if A_BF16:
        return (words << 16).to(tl.float32, bitcast=True), (words & -65536).to(tl.float32, bitcast=True)
    lo = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int4_loads(w_ptr, s_ptr, z_ptr, slot, r64, kb, N: tl.constexpr, K: tl.constexpr, ASYM: tl.constexpr,
                GPS: tl.constexpr):  # fmt: skip
    """One K step of an int4 expert: packed bytes [BN, GPS, 64], scales and zero points [BN, GPS] (fp32)."""
    groups: tl.constexpr = K // 128
    g_ix = tl.arange(0, GPS)
    j = tl.arange(0, 64)
    b = tl.load(w_ptr + slot * (N * K // 2) + r64[:, None, None] * (K // 2) + (kb + g_ix[:, None] * 64 + j)[None])
    sidx = slot * (N * groups) + r64[:, None] * groups + kb // 64 + g_ix[None, :]
    if ASYM:
        z = tl.load(z_ptr + sidx).to(tl.float32)
    else:
        z = tl.full(sidx.shape, 8.0, tl.float32)
    return b, tl.load(s_ptr + sidx).to(tl.float32), z


@triton.jit
def _int3_gemv(w_ptr, s_ptr, z_ptr, slot, r64, kb, N: tl.constexpr, K: tl.constexpr, ASYM: tl.constexpr,
               GPS: tl.constexpr, a32_ptr, a_row, A_BF16: tl.constexpr, a_even, a_odd):  # fmt: skip
    """[BN] fp32 scaled sum over one K step (GPS groups from int4-byte offset kb) of an int3 expert (w_ptr: its
    codes as int32 words, 12 per row per group): chunk words [BN, GPS, 4] per m (`_int3_gemv_part`); the offset
    leaves the loop as z * sum(a) over the step's even / odd columns."""
    groups: tl.constexpr = K // 128
    words: tl.constexpr = K * 3 // 32
    g = kb // 64 + tl.arange(0, GPS)
    t = tl.arange(0, 4)
    c0, c1, c2, c3 = _int3_chunks(w_ptr + slot * (N * words) + r64[:, None, None] * words
                                  + (12 * g)[None, :, None], t[None, None, :])  # fmt: skip
    a_base = a32_ptr + a_row * (K // 2) + (64 * g)[:, None, None] + 16 * t[None, :, None]
    s = _int3_gemv_part(c0, 0, a_base, A_BF16)
    s += _int3_gemv_part(c1, 1, a_base, A_BF16)
    s += _int3_gemv_part(c2, 2, a_base, A_BF16)
    s += _int3_gemv_part(c3, 3, a_base, A_BF16)
    sidx = slot * (N * groups) + r64[:, None] * groups + g[None, :]
    if ASYM:
        z = tl.load(z_ptr + sidx).to(tl.float32)
    else:
        z = 4.0
    part = s - z * tl.sum(a_even + a_odd, axis=1)[None, :]
    return tl.sum(part * tl.load(s_ptr + sidx).to(tl.float32), axis=1)


@triton.jit
def _int3_gemv_part(c, m: tl.constexpr, a_base, A_BF16: tl.constexpr):
    """[BN, GPS] sums over chunks 4t + m (c: [BN, GPS, 4] words): codes 2q / 2q + 1 of chunk 4t + m are inputs
    32t + 8m + 2q (+ 1), the two halves of activation word 16t + 4m + q of the group."""
    q = tl.arange(0, 4)
    ae, ao = _a_columns(tl.load(a_base + 4 * m + q[None, None, :]), A_BF16)  # [GPS, 4, 4]
    cw = c[:, :, :, None]
    prod = _code_values(cw, 6 * q, 0.0) * ae[None] + _code_values(cw, 6 * q + 3, 0.0) * ao[None]
    return tl.sum(tl.sum(prod, axis=3), axis=2)


@triton.jit
def _int4_math(b, scale, z, a_even, a_odd):
    """[BN] fp32 scaled sum over one step's GPS groups, with no int->float conversion (a quarter of the FMA rate).

    Byte b = lo + 16 hi shifted left by 15 lands in the mantissa of 1.0f twice: whole, fb = 1 + b/256; masked to
    its top nibble, fh = 1 + hi/16 (a shift, an or and an and per byte, exact). Then
    lo ae + hi ao = fb (256 ae) + fh (16 ao - 256 ae) - 16 ao, and the offsets leave the loop as per-group sums of
    A: sum (c - z) a = S - 16 sum ao - z sum (ae + ao). Terms stay within 2x of the plain products (no cancellation)."""
    fb = (b.to(tl.int32) << 15) | 0x3F800000  # b fills mantissa bits 22..15: no mask needed
    fh = (fb & 0x3FF80000).to(tl.float32, bitcast=True)  # keep sign, exponent and the top nibble
    fb = fb.to(tl.float32, bitcast=True)
    a1 = 256.0 * a_even
    a2 = 16.0 * a_odd - a1
    s = tl.sum(fb * a1[None] + fh * a2[None], axis=2)  # [BN, GPS]
    part = s - (16.0 * tl.sum(a_odd, axis=1)[None, :] + z * tl.sum(a_even + a_odd, axis=1)[None, :])
    return tl.sum(part * scale, axis=1)


@triton.jit
def moe_gemv_kernel(
    a_ptr, a32_ptr, c_ptr, ws_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs_ptr,
    w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
    E, P,
    N: tl.constexpr, K: tl.constexpr, A_BF16: tl.constexpr,
    A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT4_ASYM: tl.constexpr,
    HAS_INT3: tl.constexpr, HAS_INT3_ASYM: tl.constexpr,
    BN: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr,
    TOP_K: tl.constexpr, KSP: tl.constexpr, ZERO_NT: tl.constexpr, ZERO_NTP: tl.constexpr,
    MMA: tl.constexpr = False, DT: tl.constexpr = tl.bfloat16, MAGIC_BITS: tl.constexpr = 0,
    MAGIC_BASE: tl.constexpr = 0, PTX: tl.constexpr = False, ONE_FORMAT: tl.constexpr = -1,
):  # fmt: skip
    """Decode path: one program per (pair, column tile, K split), no dispatch; the pair's expert comes from topk_ids.

    Pairs that share an expert each read its weights (from L2 when they run together), which is cheaper than sorting
    while experts see about one token each. SPLIT > 1 cuts K so that a few active experts still put enough loads in
    flight on every SM.

    GATED (gate_up): SPLIT > 1 writes fp32 partials [SPLIT, P, N] that `gemv_reduce_kernel` finishes; ZERO_NT > 0
    also zeroes the down launch's ZERO_NT counters per token (this launch always runs just before it, so the op
    needs no memset).
    Down: every program writes its weighted fp32 partial [SPLIT, P, N], then counts itself in its (token, column
    tile) counter; the last of the TOP_K x SPLIT programs of that tile sums their partials in a fixed order and
    writes C [T, N]: the top-k sum and the split reduction without another launch, deterministic, and nothing ever
    waits on another program (no residency assumption). Dropped ids (other ranks' experts) count with a zero
    partial, so a token with no local expert gets a zero row.

    MMA: the dot product on tensor cores instead: a [16, BK] A tile whose only loaded row is the pair's (the others
    masked, no memory traffic) against the expert's [BK, BN] weight tile, with the GEMM path's decode and its
    software-pipelined cp.async loads; tensor cores have work to spare at decode, CUDA cores and the layout
    shuffles of a reduction do not.
    """
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if ZERO_NT > 0:
        if (pid_n == 0) & (pid_s == 0) & (p % A_DIV == 0):
            z = tl.arange(0, ZERO_NTP)
            tl.store(cnt_ptr + (p // A_DIV) * ZERO_NT + z, tl.zeros((ZERO_NTP,), tl.int32), mask=z < ZERO_NT)
    _gemv_program(a_ptr, a32_ptr, c_ptr, ws_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs_ptr,
                  w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a, E, P, p, pid_n, pid_s, tl.num_programs(1),
                  N, K, A_BF16, A_DIV, GATED, MUL_W, HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3,
                  HAS_INT3_ASYM, BN, GPS, SPLIT, TOP_K, KSP, MMA, DT, MAGIC_BITS, MAGIC_BASE, PTX, ONE_FORMAT,
                  False)  # fmt: skip


@triton.jit
def _gemv_program(
    a_ptr, a32_ptr, c_ptr, ws_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs_ptr,
    w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a, E, P, p, pid_n, pid_s, n_tiles,
    N: tl.constexpr, K: tl.constexpr, A_BF16: tl.constexpr,
    A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT4_ASYM: tl.constexpr,
    HAS_INT3: tl.constexpr, HAS_INT3_ASYM: tl.constexpr,
    BN: tl.constexpr, GPS: tl.constexpr, SPLIT: tl.constexpr, TOP_K: tl.constexpr, KSP: tl.constexpr,
    MMA: tl.constexpr, DT: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr, PTX: tl.constexpr,
    ONE_FORMAT: tl.constexpr, RESET: tl.constexpr,
):  # fmt: skip
    """Program (pair p, column tile pid_n of n_tiles, K split pid_s) of `moe_gemv_kernel` (whose docstring says
    what it computes), shared with `moe_decode_kernel`. RESET (down): the program that finishes a (token, column
    tile) also sets its counter back to zero, for a launch that nothing zeroes beforehand."""
    e = tl.load(ids_ptr + p)
    valid = (e >= 0) & (e < E)
    cols, ok, rows = _out_columns(pid_n, N, BN, GATED)
    acc = tl.zeros((BN,), dtype=tl.float32)
    if valid:
        fmt, slot = _format_slot(fs_ptr, e, ONE_FORMAT)
        a_row = (p // A_DIV).to(tl.int64)
        kb_lo = pid_s * (K // 2 // SPLIT)
        if MMA:
            r = tl.arange(0, 16)
            tile = _expert_tile(a_ptr, a32_ptr, a_row + r * 0, r == 0, K, fmt, slot, rows, N, K, 2 * kb_lo, K // SPLIT,
                                w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
                                HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM,
                                16, BN, 128 * GPS, DT, MAGIC_BITS, MAGIC_BASE, False, PTX)  # fmt: skip
            acc = tl.sum(tile, axis=0)  # rows 1..15 are zero
        else:
            acc = _gemv_rows(a_ptr, a32_ptr, a_row, w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a, fmt, slot,
                             rows, kb_lo, kb_lo + K // 2 // SPLIT, N, K, A_BF16,
                             HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM, BN, GPS)  # fmt: skip
    if GATED:
        if valid:  # a program-uniform branch, not a scalar folded into the mask (newer interpreters reject that)
            if SPLIT > 1:
                tl.store(ws_ptr + (pid_s * P + p).to(tl.int64) * N + rows, acc, mask=ok)
            else:
                gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BN // 2)), (1, 0)))
                n = pid_n * (BN // 2) + tl.arange(0, BN // 2)
                out = gate * tl.sigmoid(gate) * up
                tl.store(c_ptr + p.to(tl.int64) * (N // 2) + n, out.to(c_ptr.dtype.element_ty), mask=n < N // 2)
    else:
        if MUL_W:
            acc = tl.where(valid, acc * tl.load(topk_w_ptr + p).to(tl.float32), 0.0)
        tl.store(ws_ptr + (pid_s * P + p).to(tl.int64) * N + cols, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        t = p // TOP_K
        done = tl.atomic_add(cnt_ptr + t * n_tiles + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == TOP_K * SPLIT - 1:
            r = tl.arange(0, KSP)  # KSP: TOP_K x SPLIT rounded up to a power of two
            src = ((r // TOP_K) * P + t * TOP_K + r % TOP_K).to(tl.int64) * N
            part = tl.load(ws_ptr + src[:, None] + cols[None, :], mask=(r < TOP_K * SPLIT)[:, None] & ok[None, :],
                           other=0.0, cache_modifier=".cg")  # fmt: skip
            tl.store(c_ptr + t.to(tl.int64) * N + cols, tl.sum(part, axis=0).to(c_ptr.dtype.element_ty), mask=ok)
            if RESET:
                tl.store(cnt_ptr + t * n_tiles + pid_n, 0)


@triton.jit
def moe_decode_kernel(
    a_ptr, a32_ptr, mid_ptr, mid32_ptr, c_ptr, ws_ptr, cnt_ptr, sync_ptr, topk_w_ptr, ids_ptr,
    fs1, g16, g8, gs8, g4, gs4, ga, gsa, gza, g3, gs3, g3a, gs3a, gz3a,
    fs2, d16, d8, ds8, d4, ds4, da, dsa, dza, d3, ds3, d3a, ds3a, dz3a,
    E, P,
    H: tl.constexpr, INTER: tl.constexpr, A_BF16: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
    G_BF16: tl.constexpr, G_INT8: tl.constexpr, G_INT4: tl.constexpr, G_INT4_ASYM: tl.constexpr,
    G_INT3: tl.constexpr, G_INT3_ASYM: tl.constexpr,
    D_BF16: tl.constexpr, D_INT8: tl.constexpr, D_INT4: tl.constexpr, D_INT4_ASYM: tl.constexpr,
    D_INT3: tl.constexpr, D_INT3_ASYM: tl.constexpr,
    BN1: tl.constexpr, GPS1: tl.constexpr, MMA1: tl.constexpr, ONE1: tl.constexpr,
    BN2: tl.constexpr, GPS2: tl.constexpr, MMA2: tl.constexpr, ONE2: tl.constexpr,
    DT: tl.constexpr = tl.bfloat16, MAGIC_BITS: tl.constexpr = 0, MAGIC_BASE: tl.constexpr = 0,
    PTX: tl.constexpr = False, TICKET: tl.constexpr = False, SORT_PP: tl.constexpr = 0,
):  # fmt: skip
    """Both decode projections in one launch: the gate_up GEMV's programs, then the down GEMV's, as work items.

    Two launches cost a drain and a ramp between them, which at T = 1 is a large part of a layer (a read of the
    same bytes in two launches reaches only 53-62 % of the HBM floor, v14). Program ids below P x NT1 are gate_up
    items (pair, column tile), the rest down items (pair, column tile) of the same GEMV. A down item waits until
    every gate_up item of its pair has counted itself in sync_ptr[pair]. It only ever waits on programs of
    lower ids, which never wait themselves: blocks of a 1-D grid are dispatched in increasing order (CUB's
    single-pass scan relies on the same), so those have started and will finish, with no assumption about how many
    programs are resident (unlike a grid barrier). Every counter is set back to zero by its last user (a pair's by
    its last down item, the top-k counters by the program that writes the token's row), so the workspace stays zero
    between launches with no memset.

    Measured (v19, H100, mixed plan): 5-11 % faster than two launches at 24-32 pairs, where the grid is a few waves
    deep; slower at T = 1 (every item resident at once, half of them waiting) and from 48 pairs. v22: programs took
    their role from an atomic ticket (start order) until then; the grid order was faster in 102 of 105 configs at
    T = 1-8, by up to 12.5 µs per layer (one hot atomic word less per program). TICKET keeps the ticket (in
    sync_ptr[P], reset by the program that draws the last one) for GPUs that do not promise that order."""
    NT1: tl.constexpr = (INTER + BN1 // 2 - 1) // (BN1 // 2)
    NT2: tl.constexpr = (H + BN2 - 1) // BN2
    item = tl.program_id(0)
    if TICKET:
        item = tl.atomic_add(sync_ptr + P, 1, sem="relaxed", scope="gpu")
        if item == P * (NT1 + NT2) - 1:
            tl.store(sync_ptr + P, 0)  # the last ticket: every program has drawn its own
    if item < P * NT1:
        p = item // NT1
        if SORT_PP > 0:
            p = _pair_by_expert(ids_ptr, P, p, E, SORT_PP)
        _gemv_program(a_ptr, a32_ptr, mid_ptr, mid_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs1,
                      g16, g8, gs8, g4, gs4, ga, gsa, gza, g3, gs3, g3a, gs3a, gz3a, E, P, p, item % NT1, 0, NT1,
                      2 * INTER, H, A_BF16, TOP_K, True, False, G_BF16, G_INT8, G_INT4, G_INT4_ASYM, G_INT3,
                      G_INT3_ASYM, BN1, GPS1, 1, TOP_K, KP, MMA1, DT, MAGIC_BITS, MAGIC_BASE, PTX, ONE1,
                      False)  # fmt: skip
        tl.debug_barrier()  # every thread's intermediate columns are written before the count says so
        tl.atomic_add(sync_ptr + p, 1, sem="release", scope="gpu")
    else:
        j = item - P * NT1
        p = j // NT2
        if SORT_PP > 0:
            p = _pair_by_expert(ids_ptr, P, p, E, SORT_PP)
        ready = tl.atomic_add(sync_ptr + p, 0, sem="acquire", scope="gpu")
        while ready < NT1:
            ready = tl.atomic_add(sync_ptr + p, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # no thread reads the intermediate before the count is seen
        _gemv_program(mid_ptr, mid32_ptr, c_ptr, ws_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs2,
                      d16, d8, ds8, d4, ds4, da, dsa, dza, d3, ds3, d3a, ds3a, dz3a, E, P, p, j % NT2, 0, NT2,
                      H, INTER, A_BF16, 1, False, True, D_BF16, D_INT8, D_INT4, D_INT4_ASYM, D_INT3, D_INT3_ASYM,
                      BN2, GPS2, 1, TOP_K, KP, MMA2, DT, MAGIC_BITS, MAGIC_BASE, PTX, ONE2, True)  # fmt: skip
        # the pair's last down item sets its count back to zero
        if tl.atomic_add(sync_ptr + p, 1, sem="relaxed", scope="gpu") == NT1 + NT2 - 1:
            tl.store(sync_ptr + p, 0)


@triton.jit
def _pair_by_expert(ids_ptr, P, r, E, PP: tl.constexpr):
    """The pair at position r when the P (<= PP) pairs are ordered by expert (then by pair): items of pairs that share
    an expert run next to each other, so the second reads the expert's weights from L2."""
    idx = tl.arange(0, PP)
    key = tl.load(ids_ptr + idx, mask=idx < P, other=E) * PP + idx
    rank = tl.sum((key[None, :] < key[:, None]).to(tl.int32), axis=1)
    return tl.sum(tl.where(rank == r, idx, 0))


@triton.jit
def gemv_reduce_kernel(ws_ptr, c_ptr, P, N: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr):
    """Finish a split gate_up GEMV: C[p] = silu(gate) * up from the SPLIT partial sums of pair p (the down
    projection finishes inside `moe_gemv_kernel`)."""
    row = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    nmask = n < N // 2
    gate = tl.zeros((BN,), dtype=tl.float32)
    up = tl.zeros((BN,), dtype=tl.float32)
    for s in range(SPLIT):
        base = ws_ptr + (s * P + row).to(tl.int64) * N
        gate += tl.load(base + n, mask=nmask, other=0.0)
        up += tl.load(base + N // 2 + n, mask=nmask, other=0.0)
    tl.store(c_ptr + row.to(tl.int64) * (N // 2) + n, (gate * tl.sigmoid(gate) * up).to(c_ptr.dtype.element_ty),
             mask=nmask)  # fmt: skip
