"""Quantization codec: packing bit layouts (hand-checked), round trips, RTN on hand-computed cases, and that stored
(packed) weights dequantize to exactly what the quantizer produced."""

from __future__ import annotations

import pytest
import torch

from exq.formats import FORMATS
from exq.quant.codec import dequantize, pack, quantize_rtn, unpack
from exq.quant.quantizers import quantize_clip, quantize_gptq, search_clip
from exq.runtime.experts import Slab

QUANTIZED = [n for n, f in FORMATS.items() if f.quantized]


def test_int4_packs_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[0x21, 0x0F]]


def test_int2_packs_four_per_byte_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]


def test_int3_packs_eight_codes_in_three_bytes():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(codes, 3).tolist() == [[word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 256), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 256 * bits // 8
    assert torch.equal(unpack(packed, bits, 256), codes)


def test_rtn_symmetric_hand_computed():
    w = torch.zeros(1, 128)
    w[0, :4] = torch.tensor([0.7, -0.35, 0.1, -0.7])
    q = quantize_rtn(FORMATS["int4"], w)
    assert q.scales.item() == pytest.approx(0.1, rel=1e-3)  # absmax / 7, in fp16
    s = q.scales.float().item()
    expected = torch.clamp(torch.round(w / s), -8, 7) * s
    assert torch.equal(q.dequantize(), expected)
    assert q.codes[0, :4].tolist() == [15, 8 - 4, 8 + 1, 1]  # q + 8


def test_rtn_asymmetric_hand_computed():
    w = torch.linspace(-0.2, 1.3, 128)[None]
    q = quantize_rtn(FORMATS["int4-asym"], w)
    s = q.scales.float().item()
    assert s == pytest.approx(1.5 / 15, rel=1e-3)
    assert q.zeros.item() == round(0.2 / s)
    expected = (torch.clamp(torch.round(w / s) + q.zeros.item(), 0, 15) - q.zeros.item()) * s
    assert torch.equal(q.dequantize(), expected)


def test_all_zero_group_stays_zero():
    for name in QUANTIZED:
        q = quantize_rtn(FORMATS[name], torch.zeros(2, 256))
        assert torch.equal(q.dequantize(), torch.zeros(2, 256)), name


@pytest.mark.parametrize("name", QUANTIZED)
def test_stored_slab_dequantizes_exactly_to_the_quantizer_output(name):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, 256, generator=g) * 0.05
    x = torch.randn(4, 512, 256, generator=g)
    h = x.transpose(1, 2) @ x / 512
    for q in (
        quantize_rtn(fmt, w),
        quantize_clip(fmt, w),
        quantize_gptq(fmt, w, h),
        quantize_gptq(fmt, w, h, act_order=True),
    ):
        slab = Slab(fmt, 4, 64, 256)
        slab.codes.copy_(pack(q.codes, fmt.bits))
        slab.scales.copy_(q.scales)
        if q.zeros is not None:
            slab.zeros.copy_(q.zeros)
        assert torch.equal(slab.dequantized(torch.float32), q.dequantize(torch.float32))
        # the codes respect the format's range
        assert int(q.codes.max()) < 2**fmt.bits


@pytest.mark.parametrize("name", ["int4", "int3-asym", "int2-asym"])
def test_clip_search_never_worse_than_full_range(name):
    fmt = FORMATS[name]
    w = torch.randn(8, 32, 256) * torch.rand(8, 32, 1)
    w[:, :, 7] = 5.0  # an outlier per row: clipping should pay off
    d = torch.rand(8, 256) + 0.1
    err = lambda q: (((w - q.dequantize()) ** 2) * d[:, None, :]).sum()  # noqa: E731
    assert err(quantize_clip(fmt, w, d)) <= err(quantize_rtn(fmt, w)) * (1 + 1e-6)
    assert (search_clip(fmt, w, d) <= 1.0).all()


def test_dequantize_shapes():
    fmt = FORMATS["int8"]
    q = quantize_rtn(fmt, torch.randn(3, 7, 13))  # per-row int8: any in_features
    assert q.scales.shape == (3, 7, 1)
    assert dequantize(fmt, q.codes, q.scales, None).shape == (3, 7, 13)
