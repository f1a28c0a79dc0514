"""Format byte accounting (hand-computed) and budget parsing."""

from __future__ import annotations

import pytest

from exq.compiler.budget import parse_budget
from exq.errors import ExqError
from exq.formats import FORMATS, get_format, parse_formats


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("bf16", (3, 5), 30),
        ("int8", (10, 256), 10 * 256 + 10 * 2),  # codes + one fp16 scale per row
        ("int4", (256, 256), 256 * 128 + 256 * 2 * 2),  # two codes per byte + 2 groups x fp16 per row
        ("int4-asym", (256, 256), 256 * 128 + 256 * 2 * (2 + 1)),  # + a uint8 zero point per group
        ("int3", (8, 128), 8 * 48 + 8 * 2),  # 128 x 3 bits = 48 bytes per row
        ("int3-asym", (8, 128), 8 * 48 + 8 * (2 + 1)),
        ("int2-asym", (4, 256), 4 * 64 + 4 * 2 * (2 + 1)),
    ],
)
def test_bytes_hand_computed(name, shape, expected):
    assert get_format(name).nbytes(*shape) == expected


def test_uniform_int4_is_4_125_bits_per_weight():
    assert get_format("int4").bits_per_weight(2048, 768 * 2) == pytest.approx(4.125)


def test_group_size_must_divide_in_features():
    fmt = get_format("int4")
    assert not fmt.applicable(64, 96) and fmt.applicable(64, 256)
    assert get_format("int8").applicable(7, 13) and get_format("bf16").applicable(7, 13)
    with pytest.raises(ExqError, match="divisible by 128"):
        fmt.nbytes(64, 96)


def test_unknown_and_repeated_formats():
    with pytest.raises(ExqError, match="unknown format 'int5'") as info:
        parse_formats("int4,int5")
    assert "int3-asym" in str(info.value)
    with pytest.raises(ExqError, match="repeats"):
        parse_formats(["int4", "int4"])
    with pytest.raises(ExqError, match="cannot run"):
        parse_formats("int4", runtime="no-such-runtime")
    assert [f.name for f in parse_formats(" bf16, int4 ")] == ["bf16", "int4"]
    assert set(FORMATS) >= {"bf16", "int8", "int4", "int3-asym", "int2-asym"}


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [
        ("int4", "format", "int4"),
        ("4.25bpw", "bpw", 4.25),
        ("3.2GB", "bytes", 3_200_000_000),
        ("900MiB", "bytes", 900 * 2**20),
        ("12345B", "bytes", 12345),
    ],
)
def test_budget_parsing(spec, kind, value):
    b = parse_budget(spec)
    assert (b.kind, b.value) == (kind, value)


def test_budget_resolution():
    whole = {"int4": 1000, "bf16": 4000}
    assert parse_budget("int4").resolve(whole, params=2000) == 1000
    assert parse_budget("4.25bpw").resolve(whole, params=2000) == 1062  # floor(2000 x 4.25 / 8)
    assert parse_budget("2KB").resolve(whole, params=2000) == 2000


@pytest.mark.parametrize("spec", ["four bits", "-3bpw", "0bpw", "3.2 parsecs", "int5", ""])
def test_bad_budgets(spec):
    with pytest.raises(ExqError):
        parse_budget(spec)
