"""Triton GEMMs of a mixed-precision MoE layer: every expert of one layer in its own format, in one launch.

Each program computes a [BLOCK_M, BLOCK_N] tile for one row block of the dispatch (all rows use one expert), or with
the inline dispatch the tiles of one expert's row blocks, found in topk_ids by the program itself; it reads
that expert's format code and slot, and streams the weights from the slab of that format, exactly as the checkpoint
stores them (`exq.formats`): bf16 [n, out, in]; int8 codes [n, out, in] (code - 128) with one fp16 scale per output
row; int4 codes [n, out, in / 2], element 2j in the low nibble of byte j, one fp16 scale (and for int4-asym a uint8
zero point) per 128 inputs; int3 codes [n, out, 3 in / 8], 8 codes in 3 bytes (code j in bits 3j .. 3j + 2), scales
(and int3-asym's zero points) per 128 inputs like int4.

Integer codes minus their offset are exact in bf16/fp16, so the tensor-core dot runs on raw codes and the group scale
multiplies the fp32 partial sum once per group, not every weight (FOLD, for the big prefill tiles: the scale
multiplies the decoded weights instead, so one accumulator suffices). For int4, the low and high nibbles of a byte meet
the even and odd input columns: two dots on [BLOCK_K / 2] slices, no nibble interleaving in registers.

gate_up (GATED) computes the gate and the up rows of the same columns and writes silu(gate) * up; down multiplies by
the routing weight. The reduction over top-k happens in the down launch's last program per (token, column tile): on the
GEMV paths (`moe_gemv_kernel`, whose MMA variant runs the tensor-core tile below on a single row, and
`moe_decode_kernel`, both GEMVs in one launch) and for tensor-core row blocks of up to 32 rows (FINISH_K); the big
prefill tiles leave it to one `sum` over the [T, k, H] result.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _a_tile(a_ptr, a_rows, a_mask, stride_am, cols, DT: tl.constexpr):
    return tl.load(a_ptr + a_rows[:, None] * stride_am + cols[None, :], mask=a_mask[:, None], other=0.0).to(DT)


@triton.jit
def _tile_dense(
    a_ptr, a_rows, a_mask, stride_am, w_ptr, s_ptr, slot, rows, N: tl.constexpr, K: tl.constexpr, k_lo,
    KS: tl.constexpr, INT8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """bf16 weights, or int8 codes (code - 128, exact in bf16/fp16) with one scale per output row applied at the end."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    base = w_ptr + slot * N * K + rows[None, :].to(tl.int64) * K
    ks = tl.arange(0, BK)
    for k0 in range(k_lo, k_lo + KS, BK):
        a = _a_tile(a_ptr, a_rows, a_mask, stride_am, k0 + ks, DT)
        w = tl.load(base + (k0 + ks)[:, None])
        if INT8:  # code - 128 via fp32 exponent bits (2^23 + code), not I2F at a quarter of the FMA rate
            w = ((w.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0).to(DT)
        acc = tl.dot(a, w.to(DT), acc)
    if INT8:
        acc = acc * tl.load(s_ptr + slot * N + rows).to(tl.float32)[None, :]
    return acc


# Four packed bytes -> the low nibbles (two 16-bit pairs) and the high nibbles (two pairs), each minus 8, exact.
# PRMT spreads bytes 0,1 (2,3) to the two 16-bit lanes, LOP3 masks a nibble under the magic exponent (the value
# becomes base + code: 128 in bf16, 1024 in fp16, where the step is 1), one packed FMA by 1.0 removes base + 8:
# 3 instructions per byte for both nibbles, where the generic code extracted every byte with its own PRMT.
_NIB_PTX = """{
.reg .b32 t0, t1, u0, u1, one, bias;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
shr.u32 u0, t0, 4;
shr.u32 u1, t1, 4;
lop3.b32 t0, t0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 t1, t1, 0x000F000F, MAGIC, 0xEA;
lop3.b32 u0, u0, 0x000F000F, MAGIC, 0xEA;
lop3.b32 u1, u1, 0x000F000F, MAGIC, 0xEA;
mov.b32 one, ONE;
mov.b32 bias, BIAS;
fma.rn.TYPE $0, t0, one, bias;
fma.rn.TYPE $1, t1, one, bias;
fma.rn.TYPE $2, u0, one, bias;
fma.rn.TYPE $3, u1, one, bias;
}"""
_NIB_BF16 = tl.constexpr(
    _NIB_PTX.replace("TYPE", "bf16x2")
    .replace("MAGIC", "0x43004300")
    .replace("ONE", "0x3F803F80")
    .replace("BIAS", "0xC308C308")  # -136
)
_NIB_F16 = tl.constexpr(
    _NIB_PTX.replace("TYPE", "f16x2")
    .replace("MAGIC", "0x64006400")
    .replace("ONE", "0x3C003C00")
    .replace("BIAS", "0xE408E408")  # -1032
)


@triton.jit
def _nibbles(b, off, MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr, DT: tl.constexpr, PTX: tl.constexpr = False):
    """(code - off) of every nibble of b as DT, low then high: exact small integers.

    With MAGIC_BITS (0x4300 for bf16, 0x6400 for fp16) a nibble becomes MAGIC_BASE + code by setting the
    exponent bits (one OR and a bitcast, no int->float conversion), then one subtraction. PTX (symmetric int4 on
    the GPU, off == 8): the same arithmetic in `_NIB_PTX`, four bytes per block."""
    if PTX:
        if MAGIC_BASE == 128:
            lo, hi = tl.inline_asm_elementwise(_NIB_BF16, "=r,=r,=r,=r,r", [b], (tl.bfloat16, tl.bfloat16), True, 4)
        else:
            lo, hi = tl.inline_asm_elementwise(_NIB_F16, "=r,=r,=r,=r,r", [b], (tl.float16, tl.float16), True, 4)
    elif MAGIC_BITS:
        base = (off + MAGIC_BASE).to(DT)
        lo = ((b & 0xF).to(tl.uint16) | MAGIC_BITS).to(DT, bitcast=True) - base
        hi = ((b >> 4).to(tl.uint16) | MAGIC_BITS).to(DT, bitcast=True) - base
    else:
        lo = ((b & 0xF).to(tl.int32) - off).to(DT)
        hi = ((b >> 4).to(tl.int32) - off).to(DT)
    return lo, hi


@triton.jit
def _tile_int4(
    a_ptr,
    a32_ptr,
    a_rows,
    a_mask,
    stride_am,
    w_ptr,
    s_ptr,
    z_ptr,
    slot,
    rows,
    N: tl.constexpr,
    K: tl.constexpr,
    k_lo,
    KS: tl.constexpr,
    ASYM: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    DT: tl.constexpr,
    MAGIC_BITS: tl.constexpr,
    MAGIC_BASE: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    PTX: tl.constexpr,
    FOLD: tl.constexpr = False,
):
    """INTERLEAVE: nibbles joined back into K order, one dot with the A tile as stored (big row blocks).
    Else two dots: low nibbles with A's even columns, high nibbles with the odd ones (no register shuffle).
    FOLD: the group scale (as DT) multiplies the decoded codes and the dots accumulate in place: one [BM, BN]
    accumulator, which the 128-row prefill tiles need to stay out of local memory; the weights then carry DT's
    rounding, as a dequantized copy would. Else the dots run on exact codes and each group's fp32 partial is
    scaled into a second accumulator.
    Measured and not kept (perf-notes, v13): the swapped product W x A^T (weights as the register operand) 1.1-1.6x
    slower; bytes pairing k and k + 64 (no join, contiguous A slices) 2-12 % slower at prefill; the two-dot form
    at 128 rows (activations as the register operand) 2-16 % slower."""
    # BK > 128: SUB group-sized sub-steps per loop iteration (the body unrolled), so each pipelined iteration
    # streams SUB groups' bytes and pays its barrier and waits once
    SUB: tl.constexpr = BK // 128 if BK > 128 else 1
    BKS: tl.constexpr = BK // SUB
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    half = tl.arange(0, BKS // 2)
    ks = tl.arange(0, BKS)
    groups: tl.constexpr = K // 128
    base = w_ptr + slot * (N * K // 2) + rows[None, :].to(tl.int64) * (K // 2)
    sbase = slot * (N * groups) + rows.to(tl.int64) * groups
    # scales (and zero points) are loaded one step ahead: in the MMA layout they are per-thread 2-byte gathers that
    # the pipeliner leaves in the loop, and each step would wait a memory round trip for them (a later sub-step's
    # load is issued at the top of its iteration and waited for after the sub-steps before it)
    g_end = (k_lo + KS) // 128 - 1
    scale_next = tl.load(s_ptr + sbase + k_lo // 128)
    zero_next = tl.load(z_ptr + sbase + k_lo // 128) if ASYM else scale_next
    for k0 in range(k_lo, k_lo + KS, BK):
        for u in tl.static_range(SUB):
            k1 = k0 + u * BKS
            b = tl.load(base + (k1 // 2 + half)[:, None])  # [BKS/2, BN] uint8
            if u == 0:
                scale, zero = scale_next, zero_next
                g_next = tl.minimum((k0 + BK) // 128, g_end)
                scale_next = tl.load(s_ptr + sbase + g_next)
                if ASYM:
                    zero_next = tl.load(z_ptr + sbase + g_next)
            else:
                scale = tl.load(s_ptr + sbase + k1 // 128)
                zero = tl.load(z_ptr + sbase + k1 // 128) if ASYM else scale
            if ASYM:
                off = zero.to(tl.int32)[None, :]
            else:
                off = 8
            lo, hi = _nibbles(b, off, MAGIC_BITS, MAGIC_BASE, DT, PTX and not ASYM)
            if FOLD:  # in the dot type: an fp32 product and a conversion back cost 1.3x the instructions (sm_90)
                sdt = scale.to(DT)[None, :]
                lo = lo * sdt
                hi = hi * sdt
            if INTERLEAVE:
                w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BKS, BN))
                a = _a_tile(a_ptr, a_rows, a_mask, stride_am, k1 + ks, DT)
                if FOLD:
                    acc = tl.dot(a, w, acc)
                else:
                    acc += tl.dot(a, w) * scale.to(tl.float32)[None, :]
            else:
                # A as int32 words (two columns each), split by bit operations: 16-byte loads the pipeliner can run
                # ahead, instead of two stride-2 loads of 2-byte elements that each step waited for
                words = tl.load(a32_ptr + a_rows[:, None] * (K // 2) + (k1 // 2 + half)[None, :],
                                mask=a_mask[:, None], other=0)  # fmt: skip
                adt = a_ptr.dtype.element_ty
                a_even = (words & 0xFFFF).to(tl.uint16).to(adt, bitcast=True).to(DT)
                a_odd = (words >> 16).to(tl.uint16).to(adt, bitcast=True).to(DT)
                if FOLD:
                    acc = tl.dot(a_odd, hi, tl.dot(a_even, lo, acc))
                else:
                    acc += tl.dot(a_odd, hi, tl.dot(a_even, lo)) * scale.to(tl.float32)[None, :]
    return acc


@triton.jit
def _int3_chunks(w32, t):
    """Three int32 words hold four 8-code chunks (3 bytes each, little end first): the 24-bit words of chunks
    4t + m, m = 0..3, for the word triples at w32 + 3t."""
    x0 = tl.load(w32 + 3 * t)
    x1 = tl.load(w32 + 3 * t + 1)
    x2 = tl.load(w32 + 3 * t + 2)
    c0 = x0 & 0xFFFFFF
    c1 = ((x0 >> 24) & 0xFF) | ((x1 & 0xFFFF) << 8)
    c2 = ((x1 >> 16) & 0xFFFF) | ((x2 & 0xFF) << 16)
    c3 = (x2 >> 8) & 0xFFFFFF
    return c0, c1, c2, c3


@triton.jit
def _code_values(word, shift, off):
    """3-bit codes at bit `shift` of each word, minus off, as exact fp32: exponent bits (2^23 + code), no I2F."""
    return (((word >> shift) & 7) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + off)


@triton.jit
def _int3_dot(acc, c, m: tl.constexpr, k0, a_ptr, a_rows, a_mask, stride_am, off, scale, BN: tl.constexpr,
              DT: tl.constexpr, FOLD: tl.constexpr):  # fmt: skip
    """acc + the product of chunks 4t + m of a group (c: [4, BN] words, t = 0..3) with their activation columns:
    code j of chunk 4t + m is input 32t + 8m + j, so the codes [4, 8, BN] reshape to K = 32 rows in order and the
    activations load as four contiguous runs of 8."""
    j = tl.arange(0, 8)
    w = _code_values(c[:, None, :], 3 * j[None, :, None], off)  # [4, 8, BN]
    if FOLD:
        w = w * scale.to(tl.float32)[None, None, :]
    w = tl.reshape(w, (32, BN)).to(DT)
    q = tl.arange(0, 32)
    cols = tl.max_contiguous(tl.multiple_of(k0 + 32 * (q // 8) + 8 * m + q % 8, 8), 8)
    return tl.dot(_a_tile(a_ptr, a_rows, a_mask, stride_am, cols, DT), w, acc)


@triton.jit
def _tile_int3(
    a_ptr, a_rows, a_mask, stride_am, w_ptr, s_ptr, z_ptr, slot, rows, N: tl.constexpr, K: tl.constexpr, k_lo,
    KS: tl.constexpr, ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
    FOLD: tl.constexpr = False, BYTES: tl.constexpr = False,
):  # fmt: skip
    """int3 codes, 8 per 3 bytes (code j of a chunk in bits 3j .. 3j + 2), one scale (and zero point) per 128
    inputs; w_ptr is the codes viewed as int32 words (12 per row per group). A K step is one group, in one of two
    forms (v15, `_expert_tile` picks):
    - words: the group's words through the cp.async pipeline, 4 dots of K = 32 (`_int3_dot`); the decoded codes
      reach the MMA through shared memory (the K-order reshape);
    - BYTES: each chunk's 3 bytes gathered from global memory (only the raw bytes pass through shared memory, 8x
      fewer than decoded codes; the gathers are not pipelined), 8 dots of K = 16, code j of the 16 chunks against
      activation columns 8 i + j (strided gathers, cheap for a few rows).
    FOLD as for int4."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    groups: tl.constexpr = K // 128
    i = tl.arange(0, 16)
    if BYTES:
        codes = w_ptr.to(tl.pointer_type(tl.uint8))
        base = codes + slot * (N * (K * 3 // 8)) + rows[None, :].to(tl.int64) * (K * 3 // 8) + 3 * i[:, None]
    else:
        words: tl.constexpr = K * 3 // 32  # int32 words per row
        base = w_ptr + slot * (N * words) + rows[None, :].to(tl.int64) * words
    sbase = slot * (N * groups) + rows.to(tl.int64) * groups
    for k0 in range(k_lo, k_lo + KS, 128):
        scale = tl.load(s_ptr + sbase + k0 // 128)
        if ASYM:
            off = tl.load(z_ptr + sbase + k0 // 128).to(tl.float32)[None, :]
        else:
            off = 4.0
        if FOLD:
            part = acc
        else:
            part = tl.zeros((BM, BN), dtype=tl.float32)
        if BYTES:
            p = base + k0 // 8 * 3
            word = tl.load(p).to(tl.int32) | (tl.load(p + 1).to(tl.int32) << 8) | (tl.load(p + 2).to(tl.int32) << 16)
            for j in tl.static_range(8):
                w = _code_values(word, 3 * j, off)
                if FOLD:
                    w = w * scale.to(tl.float32)[None, :]
                part = tl.dot(_a_tile(a_ptr, a_rows, a_mask, stride_am, k0 + 8 * i + j, DT), w.to(DT), part)
        else:
            if ASYM:
                off = off[None]  # against codes [4, 8, BN]
            c0, c1, c2, c3 = _int3_chunks(base + k0 // 128 * 12, tl.arange(0, 4)[:, None])  # [4, BN] each
            part = _int3_dot(part, c0, 0, k0, a_ptr, a_rows, a_mask, stride_am, off, scale, BN, DT, FOLD)
            part = _int3_dot(part, c1, 1, k0, a_ptr, a_rows, a_mask, stride_am, off, scale, BN, DT, FOLD)
            part = _int3_dot(part, c2, 2, k0, a_ptr, a_rows, a_mask, stride_am, off, scale, BN, DT, FOLD)
            part = _int3_dot(part, c3, 3, k0, a_ptr, a_rows, a_mask, stride_am, off, scale, BN, DT, FOLD)
        if FOLD:
            acc = part
        else:
            acc += part * scale.to(tl.float32)[None, :]
    return acc


@triton.jit
def _expert_tile(
    a_ptr, a32_ptr, a_rows, a_mask, stride_am, fmt, slot, rows, N: tl.constexpr, K: tl.constexpr, k_lo,
    KS: tl.constexpr, w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
    HAS_BF16: tl.constexpr, HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT4_ASYM: tl.constexpr,
    HAS_INT3: tl.constexpr, HAS_INT3_ASYM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr, INTERLEAVE: tl.constexpr, PTX: tl.constexpr,
    FOLD: tl.constexpr = False,
):  # fmt: skip
    """[BM, BN] fp32 = A rows x W[rows, k_lo : k_lo + KS]^T for one expert, whatever its format (formats absent
    compile away). K steps over 128 (several int4 groups) stay at 128 for bf16 / int8 experts, whose tiles they
    would double (v14: 9-16 % slower)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    BKD: tl.constexpr = BK if BK <= 128 else 128
    # v15 (H100, same process): the byte-gather int3 form is 12-21 % faster in layers of int3 experts only, but
    # 1-11 % slower for the whole layer when other formats share it (olmoe / qwen3, T = 1-64)
    INT3_BYTES: tl.constexpr = BM <= 32 and not (HAS_BF16 or HAS_INT8 or HAS_INT4 or HAS_INT4_ASYM)
    if HAS_BF16:
        if fmt == 0:
            acc = _tile_dense(a_ptr, a_rows, a_mask, stride_am, w16, w16, slot, rows, N, K, k_lo, KS, False,
                              BM, BN, BKD, DT)  # fmt: skip
    if HAS_INT8:
        if fmt == 1:
            acc = _tile_dense(a_ptr, a_rows, a_mask, stride_am, w8, s8, slot, rows, N, K, k_lo, KS, True,
                              BM, BN, BKD, DT)  # fmt: skip
    if HAS_INT4:
        if fmt == 2:
            acc = _tile_int4(a_ptr, a32_ptr, a_rows, a_mask, stride_am, w4, s4, s4, slot, rows, N, K, k_lo, KS, False,
                             BM, BN, BK, DT, MAGIC_BITS, MAGIC_BASE, INTERLEAVE, PTX, FOLD)  # fmt: skip
    if HAS_INT4_ASYM:
        if fmt == 3:
            acc = _tile_int4(a_ptr, a32_ptr, a_rows, a_mask, stride_am, wa, sa, za, slot, rows, N, K, k_lo, KS, True,
                             BM, BN, BK, DT, MAGIC_BITS, MAGIC_BASE, INTERLEAVE, PTX, FOLD)  # fmt: skip
    if HAS_INT3:
        if fmt == 4:
            acc = _tile_int3(a_ptr, a_rows, a_mask, stride_am, w3, s3, s3, slot, rows, N, K, k_lo, KS, False,
                             BM, BN, DT, FOLD, INT3_BYTES)  # fmt: skip
    if HAS_INT3_ASYM:
        if fmt == 5:
            acc = _tile_int3(a_ptr, a_rows, a_mask, stride_am, w3a, s3a, z3a, slot, rows, N, K, k_lo, KS, True,
                             BM, BN, DT, FOLD, INT3_BYTES)  # fmt: skip
    return acc


@triton.jit
def _out_columns(pid_n, N: tl.constexpr, BN: tl.constexpr, GATED: tl.constexpr):
    """A program's output columns (cols, in-range mask) and the weight rows it reads. GATED: BN/2 gate rows and the
    BN/2 matching up rows (N/2 further on), so one K loop serves both halves of silu(gate) * up."""
    j = tl.arange(0, BN)
    if GATED:
        cols = pid_n * (BN // 2) + (j % (BN // 2))
        ok = cols < N // 2
        rows = tl.where(ok, cols, 0) + tl.where(j < BN // 2, 0, N // 2)
    else:
        cols = pid_n * BN + j
        ok = cols < N
        rows = tl.where(ok, cols, 0)
    return cols, ok, rows


@triton.jit
def moe_gemm_kernel(
    a_ptr, a32_ptr, c_ptr, topk_w_ptr, sorted_ptr, block_expert_ptr, ids_ptr, fs_ptr,
    w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a, out_ptr, cnt_ptr,
    P, E, stride_am, stride_cm, ZERO_CNT,
    N: tl.constexpr, K: tl.constexpr,
    A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT4_ASYM: tl.constexpr,
    HAS_INT3: tl.constexpr, HAS_INT3_ASYM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr, INTERLEAVE: tl.constexpr, PTX: tl.constexpr,
    ROUTE_PP: tl.constexpr = 0, FOLD: tl.constexpr = False, GROUP: tl.constexpr = 1, ONE_FORMAT: tl.constexpr = -1,
    FINISH_K: tl.constexpr = 0, ZCH: tl.constexpr = 0,
):  # fmt: skip
    """GATED: W is [2I, K] per expert, C [P, I] = silu(A W[:I]^T) * (A W[I:]^T). Else C [P, N] = w_p * A W^T.

    A rows are pair // A_DIV (A_DIV = top_k reads the token's hidden state; 1 reads the pair's own row). GATED
    tiles hold BN / 2 gate rows and the BN / 2 matching up rows, so one K loop streams both.

    ROUTE_PP = 0: program (row block, column tile) of the dispatch. ROUTE_PP > 0 (a power of two >= P): no
    dispatch launch; program (expert, column tile) finds its pairs in topk_ids itself (a rank by prefix sum over
    the P ids, the order of a stable sort) and walks them BM rows at a time; sorted_ptr is then [E, ROUTE_PP]
    scratch.

    FINISH_K = top_k (down): the top-k sum in the epilogue. Each program counts its rows in their (token, column
    tile) counter (cnt_ptr) after writing them to C [P, N]; the program that brings a counter to top_k reads the
    token's top_k rows of C back in slot order and writes their fp32 sum to out [T, N]. No sum launch, the same
    bits as summing C afterwards, deterministic, and no program waits on another. ZCH > 0 (gate_up, which always
    runs just before the down launch): programs zero ZCH counters each, ZERO_CNT in all, so no memset is needed.
    """
    # v12: a 1-D grid, column tiles fastest. The tiles of one row block (of one expert, inline) run together: its A
    # rows come from HBM once and then from L2 (T = 4096: down's A is 67 MB for olmoe, re-read per column tile in
    # the row-block-major order: 1283.6 -> 1151.9 us), and the weight rows stream in address order (T = 16-64:
    # 4-7 % faster)
    # GROUP > 1 (experts too big to stay in L2 while one row block walks its tiles): GROUP row blocks take each
    # column tile together, so a weight tile is read once from HBM for all of them
    n_tiles: tl.constexpr = (N // 2 + BN // 2 - 1) // (BN // 2) if GATED else (N + BN - 1) // BN
    pid = tl.program_id(0)
    if ZCH > 0:
        z = pid * ZCH + tl.arange(0, ZCH)
        tl.store(cnt_ptr + z, tl.zeros((ZCH,), tl.int32), mask=z < ZERO_CNT)
    if GROUP == 1:
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
    else:
        first = (pid // (GROUP * n_tiles)) * GROUP
        size = tl.minimum(tl.num_programs(0) // n_tiles - first, GROUP)
        r = pid % (GROUP * n_tiles)
        pid_m = first + r % size
        pid_n = r // size
    if ROUTE_PP > 0:
        fmt, slot = _format_slot(fs_ptr, pid_m, ONE_FORMAT)  # the expert is the program's: no wait on the ids
        # this expert's pairs in stable order, compacted through scratch rows [E, ROUTE_PP] (sorted_ptr): every
        # column tile of the expert writes the same values, and reads back only what its own threads wrote
        q = tl.arange(0, ROUTE_PP)
        mine = (tl.load(ids_ptr + q, mask=q < P, other=-1) == pid_m).to(tl.int32)
        count = tl.sum(mine, axis=0)
        row = sorted_ptr + pid_m * ROUTE_PP
        tl.store(row + tl.cumsum(mine, axis=0) - 1, q, mask=mine > 0)
        tl.debug_barrier()  # the stores above land before any thread reads the row back
        j = tl.arange(0, BM)
        for r0 in range(0, count, BM):
            pairs = tl.load(row + r0 + j, mask=r0 + j < count, other=P)
            _row_block(a_ptr, a32_ptr, c_ptr, topk_w_ptr, fmt, slot,
                       w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
                       pairs, pid_n, P, stride_am, stride_cm, N, K, A_DIV, GATED, MUL_W,
                       HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM, BM, BN, BK, DT,
                       MAGIC_BITS, MAGIC_BASE, INTERLEAVE, PTX, FOLD, out_ptr, cnt_ptr, n_tiles, FINISH_K)  # fmt: skip
    else:
        e = tl.load(block_expert_ptr + pid_m)
        if e < E:
            fmt, slot = _format_slot(fs_ptr, e, ONE_FORMAT)
            pairs = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
            _row_block(a_ptr, a32_ptr, c_ptr, topk_w_ptr, fmt, slot,
                       w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
                       pairs, pid_n, P, stride_am, stride_cm, N, K, A_DIV, GATED, MUL_W,
                       HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM, BM, BN, BK, DT,
                       MAGIC_BITS, MAGIC_BASE, INTERLEAVE, PTX, FOLD, out_ptr, cnt_ptr, n_tiles, FINISH_K)  # fmt: skip


@triton.jit
def _format_slot(fs_ptr, e, ONE_FORMAT: tl.constexpr):
    """Expert e's format code and its slot in that format's slab, one packed word (format << 24 | slot) in L2 between
    the routing id and the first weight bytes. ONE_FORMAT >= 0: every expert has that format at slot = its id, so
    not even that (v16, H100: T = 1 7-10 % faster; the whole table preloaded before the id instead gained 0-2 % at
    T = 1-4 and lost 1-2 % from T = 64, so it is not used)."""
    if ONE_FORMAT >= 0:
        return ONE_FORMAT, e.to(tl.int64)
    w = tl.load(fs_ptr + e)
    return w >> 24, (w & 0xFFFFFF).to(tl.int64)


@triton.jit
def _row_block(
    a_ptr, a32_ptr, c_ptr, topk_w_ptr, fmt, slot, w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
    pairs, pid_n, P, stride_am, stride_cm,
    N: tl.constexpr, K: tl.constexpr,
    A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr,
    HAS_BF16: tl.constexpr, HAS_INT8: tl.constexpr, HAS_INT4: tl.constexpr, HAS_INT4_ASYM: tl.constexpr,
    HAS_INT3: tl.constexpr, HAS_INT3_ASYM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
    MAGIC_BITS: tl.constexpr, MAGIC_BASE: tl.constexpr, INTERLEAVE: tl.constexpr, PTX: tl.constexpr,
    FOLD: tl.constexpr, out_ptr, cnt_ptr, n_tiles, FINISH_K: tl.constexpr,
):  # fmt: skip
    """One [BM, BN] output tile of one expert (format code, slot) for these pairs (P = an empty row)."""
    pmask = pairs < P
    a_rows = (pairs // A_DIV).to(tl.int64)
    cols, ok, rows = _out_columns(pid_n, N, BN, GATED)
    acc = _expert_tile(a_ptr, a32_ptr, a_rows, pmask, stride_am, fmt, slot, rows, N, K, 0, K,
                       w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
                       HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM, BM, BN, BK, DT,
                       MAGIC_BITS, MAGIC_BASE, INTERLEAVE, PTX, FOLD)  # fmt: skip
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        out = gate * tl.sigmoid(gate) * up
        n = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        nmask = n < N // 2
    else:
        out = acc
        n = cols
        nmask = ok
    if MUL_W:
        w = tl.load(topk_w_ptr + pairs, mask=pmask, other=0.0).to(tl.float32)
        out = out * w[:, None]
    c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])
    if FINISH_K > 0:
        tl.debug_barrier()  # every thread's rows are written before any counter says so
        tok = pairs // FINISH_K
        seen = tl.atomic_add(cnt_ptr + tok * n_tiles + pid_n, 1, mask=pmask, sem="acq_rel", scope="gpu")
        last = pmask & (seen == FINISH_K - 1)
        if tl.sum(last.to(tl.int32), axis=0) > 0:
            total = tl.zeros((BM, BN), dtype=tl.float32)
            first = (tok * FINISH_K).to(tl.int64)
            for j in tl.static_range(FINISH_K):  # slot order, as a sum over [T, k, N] afterwards would take
                part = tl.load(c_ptr + (first + j)[:, None] * stride_cm + n[None, :],
                               mask=last[:, None] & nmask[None, :], other=0.0, cache_modifier=".cg")  # fmt: skip
                total += part.to(tl.float32)
            tl.store(out_ptr + tok[:, None].to(tl.int64) * N + n[None, :], total.to(out_ptr.dtype.element_ty),
                     mask=last[:, None] & nmask[None, :])  # fmt: skip


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
    PTX: tl.constexpr = False,
):  # fmt: skip
    """Both decode projections in one launch: the gate_up GEMV's programs, then the down GEMV's, as work items.

    Two launches cost a drain and a ramp between them, which at T = 1 is a large part of a layer (a read of the
    same bytes in two launches reaches only 53-62 % of the HBM floor, v14). Here each program takes a ticket
    (an atomic counter: tickets follow the order in which programs start) and does that work item: tickets below
    P x NT1 are gate_up items (pair, column tile), the rest down items (pair, column tile) of the same GEMV. A down
    item waits until every gate_up item of its pair has counted itself in sync_ptr[1 + pair]. It only ever waits on
    items of lower tickets, whose programs have started and never wait themselves, so it needs no assumption about
    how many programs are resident (unlike a grid barrier). Every counter is set back to zero by its last user
    (the ticket by the program that draws the last one, a pair's by its last down item, the top-k counters by the
    program that writes the token's row), so the workspace stays zero between launches with no memset.

    Measured (v19, H100, mixed plan): 5-11 % faster than two launches at 24-32 pairs, where the grid is a few waves
    deep; slower at T = 1 (every item resident at once, half of them waiting) and from 48 pairs."""
    NT1: tl.constexpr = (INTER + BN1 // 2 - 1) // (BN1 // 2)
    NT2: tl.constexpr = (H + BN2 - 1) // BN2
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == P * (NT1 + NT2) - 1:
        tl.store(sync_ptr, 0)  # the last ticket: every program has drawn its own
    if ticket < P * NT1:
        p = ticket // NT1
        _gemv_program(a_ptr, a32_ptr, mid_ptr, mid_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs1,
                      g16, g8, gs8, g4, gs4, ga, gsa, gza, g3, gs3, g3a, gs3a, gz3a, E, P, p, ticket % NT1, 0, NT1,
                      2 * INTER, H, A_BF16, TOP_K, True, False, G_BF16, G_INT8, G_INT4, G_INT4_ASYM, G_INT3,
                      G_INT3_ASYM, BN1, GPS1, 1, TOP_K, KP, MMA1, DT, MAGIC_BITS, MAGIC_BASE, PTX, ONE1,
                      False)  # fmt: skip
        tl.debug_barrier()  # every thread's intermediate columns are written before the count says so
        tl.atomic_add(sync_ptr + 1 + p, 1, sem="release", scope="gpu")
    else:
        j = ticket - P * NT1
        p = j // NT2
        ready = tl.atomic_add(sync_ptr + 1 + p, 0, sem="acquire", scope="gpu")
        while ready < NT1:
            ready = tl.atomic_add(sync_ptr + 1 + p, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()  # no thread reads the intermediate before the count is seen
        _gemv_program(mid_ptr, mid32_ptr, c_ptr, ws_ptr, cnt_ptr, topk_w_ptr, ids_ptr, fs2,
                      d16, d8, ds8, d4, ds4, da, dsa, dza, d3, ds3, d3a, ds3a, dz3a, E, P, p, j % NT2, 0, NT2,
                      H, INTER, A_BF16, 1, False, True, D_BF16, D_INT8, D_INT4, D_INT4_ASYM, D_INT3, D_INT3_ASYM,
                      BN2, GPS2, 1, TOP_K, KP, MMA2, DT, MAGIC_BITS, MAGIC_BASE, PTX, ONE2, True)  # fmt: skip
        # the pair's last down item sets its count back to zero
        if tl.atomic_add(sync_ptr + 1 + p, 1, sem="relaxed", scope="gpu") == NT1 + NT2 - 1:
            tl.store(sync_ptr + 1 + p, 0)


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
