"""Quantize / dequantize / pack for every format in `exq.formats`, vectorised over a stack of matrices.

Conventions (the checkpoint, the runtime and the kernels all follow them):
  symmetric b-bit:  scale = absmax / (2^(b-1) - 1), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1),
                    stored code = q + 2^(b-1) in [0, 2^b - 1];          w' = (code - 2^(b-1)) * scale
  asymmetric b-bit: scale = (max - min) / (2^b - 1), zero = clamp(round(-min / scale), 0, 2^b - 1),
                    code = clamp(round(w / scale) + zero, 0, 2^b - 1);  w' = (code - zero) * scale
Scales are rounded to fp16 before the codes are computed, so the codes are exact for the stored scales. Dequantized
values are computed in float32: (code - zero) * float32(scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exq.errors import ExqError
from exq.formats import Format

SCALE_DTYPE = torch.float16
_TINY = 2.0**-24  # smallest positive fp16: a group of zeros keeps a finite scale


@dataclass
class Quantized:
    """A stack of quantized matrices [..., out, in]: unpacked codes, fp16 scales [..., out, G], uint8 zeros or None."""

    fmt: Format
    codes: torch.Tensor  # uint8 [..., out, in]
    scales: torch.Tensor  # fp16 [..., out, G]
    zeros: torch.Tensor | None  # uint8 [..., out, G] (asymmetric formats)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.fmt, self.codes, self.scales, self.zeros, dtype)


def group_size(fmt: Format, in_features: int) -> int:
    return in_features if fmt.group_size is None else fmt.group_size


def _check(fmt: Format, w: torch.Tensor) -> None:
    if not fmt.quantized:
        raise ExqError(f"{fmt.name} is not a quantized format")
    if w.dim() < 2:
        raise ExqError(f"expected matrices [..., out, in], got shape {tuple(w.shape)}")
    if not fmt.applicable(w.shape[-2], w.shape[-1]):
        raise ExqError(f"{fmt.name} needs in_features divisible by {fmt.group_size}, got {w.shape[-1]}")


def grid(fmt: Format) -> tuple[int, int]:
    """(lowest, highest) integer level before the code offset: symmetric [-2^(b-1), 2^(b-1)-1], asym [0, 2^b-1]."""
    if fmt.symmetric:
        return -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
    return 0, 2**fmt.bits - 1


def params_from_range(fmt: Format, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 scales (and float zero points) for groups whose values span [lo, hi] (lo <= 0 <= hi for symmetric)."""
    if fmt.symmetric:
        qmax = 2 ** (fmt.bits - 1) - 1
        scale = (torch.maximum(hi.abs(), lo.abs()) / qmax).clamp_min(_TINY).to(SCALE_DTYPE)
        return scale, None
    qmax = 2**fmt.bits - 1
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax).clamp_min(_TINY).to(SCALE_DTYPE)
    zero = torch.round(-lo / scale.float()).clamp(0, qmax)
    return scale, zero


def codes_for(fmt: Format, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Codes of w (float32, [..., g]) for broadcastable scale / zero, as float (exact small integers)."""
    lo, hi = grid(fmt)
    if fmt.symmetric:
        return torch.clamp(torch.round(w / scale.float()), lo, hi) - lo
    return torch.clamp(torch.round(w / scale.float()) + zero, lo, hi)


def levels(fmt: Format, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Dequantized float32 values of float codes."""
    offset = -grid(fmt)[0] if fmt.symmetric else zero
    return (codes - offset) * scale.float()


def quantize_rtn(fmt: Format, w: torch.Tensor, clip: torch.Tensor | None = None) -> Quantized:
    """Round to nearest with group-wise scales; `clip` [..., out, G] in (0, 1] shrinks each group's range."""
    _check(fmt, w)
    in_f = w.shape[-1]
    g = group_size(fmt, in_f)
    wg = w.float().reshape(*w.shape[:-1], in_f // g, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale, zero = params_from_range(fmt, lo, hi)
    codes = codes_for(fmt, wg, scale[..., None], None if zero is None else zero[..., None])
    return Quantized(
        fmt,
        codes.reshape(w.shape).to(torch.uint8),
        scale,
        None if zero is None else zero.to(torch.uint8),
    )


def dequantize(
    fmt: Format, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype=torch.float32
) -> torch.Tensor:
    in_f = codes.shape[-1]
    g = group_size(fmt, in_f)
    cg = codes.float().reshape(*codes.shape[:-1], in_f // g, g)
    z = None if zeros is None else zeros.float()[..., None]
    return levels(fmt, cg, scales[..., None], z).reshape(codes.shape).to(dtype)


# ---- packing: codes of b bits, per row, little end first ----------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., in] -> uint8 [..., in * bits / 8]: the bit stream of each row, least significant bit first.

    int4: element 2j in the low nibble of byte j, 2j+1 in the high nibble. int2: four per byte, low bits first.
    int3: every 8 codes (24 bits) fill 3 bytes, code 0 in bits 0-2. int8: unchanged.
    """
    if bits == 8:
        return codes.to(torch.uint8)
    in_f = codes.shape[-1]
    per = 8 // bits if 8 % bits == 0 else 8  # codes per chunk: a byte for 2/4 bits, 3 bytes for 3 bits
    if in_f % per:
        raise ExqError(f"cannot pack {in_f} codes of {bits} bits per row (need a multiple of {per})")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], in_f // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)  # up to 24 bits
    n_bytes = per * bits // 8
    out = torch.stack([(word >> (8 * k)) & 0xFF for k in range(n_bytes)], dim=-1)
    return out.reshape(*codes.shape[:-1], in_f * bits // 8).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    if bits == 8:
        return packed.to(torch.uint8)
    if bits == 4:  # the common case, without the general path's int32 words: ~3x faster on a CPU
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], in_features)
    per = 8 // bits if 8 % bits == 0 else 8
    n_bytes = per * bits // 8
    p = packed.to(torch.int32).reshape(*packed.shape[:-1], in_features // per, n_bytes)
    word = sum(p[..., k] << (8 * k) for k in range(n_bytes))
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    c = (word[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], in_features).to(torch.uint8)
