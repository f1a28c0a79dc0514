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
GEMV paths (`exq.kernels.moe_gemv`, whose tensor-core variant runs `_expert_tile` below on a single row) and for
tensor-core row blocks of up to 32 rows (FINISH_K); the big
prefill tiles leave it to one `sum` over the [T, k, H] result.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

try:  # Hopper's grid dependency control and the launch option that uses it; without them the launches run in turn
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}
except ImportError:  # pragma: no cover - older Triton
    HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():
        pass

    @triton.jit
    def gdc_wait():
        pass


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
    FINISH_K: tl.constexpr = 0, ZCH: tl.constexpr = 0, SMALL_M: tl.constexpr = 0, PDL: tl.constexpr = 0,
):  # fmt: skip
    """GATED: W is [2I, K] per expert, C [P, I] = silu(A W[:I]^T) * (A W[I:]^T). Else C [P, N] = w_p * A W^T.

    A rows are pair // A_DIV (A_DIV = top_k reads the token's hidden state; 1 reads the pair's own row). GATED
    tiles hold BN / 2 gate rows and the BN / 2 matching up rows, so one K loop streams both.

    ROUTE_PP = 0: program (row block, column tile) of the dispatch. ROUTE_PP > 0 (a power of two >= P): no
    dispatch launch; program (expert, column tile) finds its pairs in topk_ids itself (a rank by prefix sum over
    the P ids, the order of a stable sort) and walks them BM rows at a time; sorted_ptr is then [E, ROUTE_PP]
    scratch.

    SMALL_M > 0 (dispatched blocks): a block whose real rows all lie in its first SMALL_M runs a SMALL_M-row tile
    instead (an expert's last, partial block): the big tiles are bound by decoding the weights, so a block costs
    about the same however few of its rows are real, and the smaller tile decodes them for less (64 rows: the big
    tile's K step and folding; 16-32 rows: the mma.sync tile's 128-input steps, exact codes).

    FINISH_K = top_k (down): the top-k sum in the epilogue. Each program counts its rows in their (token, column
    tile) counter (cnt_ptr) after writing them to C [P, N]; the program that brings a counter to top_k reads the
    token's top_k rows of C back in slot order and writes their fp32 sum to out [T, N]. No sum launch, the same
    bits as summing C afterwards, deterministic, and no program waits on another. ZCH > 0 (gate_up, which always
    runs just before the down launch): programs zero ZCH counters each, ZERO_CNT in all, so no memset is needed.

    PDL (Hopper's programmatic dependent launch, bits): 1 = gate_up lets the next launch start once all its programs
    have (v26); 2 = a launch started early: down's programs take the SMs gate_up's last ones leave free (v26), or
    gate_up's those of the dispatch (v27), and wait for that launch's end (and its writes) before their first access.
    """
    # v12: a 1-D grid, column tiles fastest. The tiles of one row block (of one expert, inline) run together: its A
    # rows come from HBM once and then from L2 (T = 4096: down's A is 67 MB for olmoe, re-read per column tile in
    # the row-block-major order: 1283.6 -> 1151.9 us), and the weight rows stream in address order (T = 16-64:
    # 4-7 % faster)
    # GROUP > 1 (experts too big to stay in L2 while one row block walks its tiles): GROUP row blocks take each
    # column tile together, so a weight tile is read once from HBM for all of them
    n_tiles: tl.constexpr = (N // 2 + BN // 2 - 1) // (BN // 2) if GATED else (N + BN - 1) // BN
    pid = tl.program_id(0)
    if PDL & 2:  # launched early (down after gate_up, gate_up after the dispatch): nothing is read or written
        gdc_wait()  # before the launch just before has ended
    if PDL & 1:  # gate_up: the down launch may start (and wait) once every program here has
        gdc_launch_dependents()
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
            small = False
            if SMALL_M > 0:  # the dispatch pads an expert's last block at its end: one entry tells
                small = tl.load(sorted_ptr + pid_m * BM + SMALL_M) >= P
            if small:
                if SMALL_M > 0:  # static: Triton compiles both sides of the runtime branch above
                    SBIG: tl.constexpr = SMALL_M >= 64  # the wgmma tile as configured; else the mma.sync tile
                    SBK: tl.constexpr = BK if SBIG or BK > 128 else 128
                    SFOLD: tl.constexpr = FOLD if SBIG else False
                    _row_block(a_ptr, a32_ptr, c_ptr, topk_w_ptr, fmt, slot,
                               w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
                               tl.load(sorted_ptr + pid_m * BM + tl.arange(0, SMALL_M)), pid_n, P, stride_am, stride_cm,
                               N, K, A_DIV, GATED, MUL_W,
                               HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM, SMALL_M, BN,
                               SBK, DT, MAGIC_BITS, MAGIC_BASE, SBIG, PTX, SFOLD,
                               out_ptr, cnt_ptr, n_tiles, FINISH_K)  # fmt: skip
            else:
                _row_block(a_ptr, a32_ptr, c_ptr, topk_w_ptr, fmt, slot,
                           w16, w8, s8, w4, s4, wa, sa, za, w3, s3, w3a, s3a, z3a,
                           tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM)), pid_n, P, stride_am, stride_cm,
                           N, K, A_DIV, GATED, MUL_W,
                           HAS_BF16, HAS_INT8, HAS_INT4, HAS_INT4_ASYM, HAS_INT3, HAS_INT3_ASYM, BM, BN, BK, DT,
                           MAGIC_BITS, MAGIC_BASE, INTERLEAVE, PTX, FOLD, out_ptr, cnt_ptr, n_tiles,
                           FINISH_K)  # fmt: skip


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
