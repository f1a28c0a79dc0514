"""Budgets: `int4` (the bytes of uniform int4-g128 for the same units), `4.25bpw`, or a size such as `3.2GB`.

A size counts the bytes of the allocated units only (weights, scales and zero points of the experts, plus shared
experts / attention when they are included); embeddings and norms are not part of the plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exq.errors import ExqError
from exq.formats import FORMATS, REFERENCE_FORMAT

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_BPW = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*bpw\s*$")
_MULT = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


@dataclass(frozen=True)
class Budget:
    spec: str  # as the user wrote it
    kind: str  # "format", "bpw" or "bytes"
    value: float | str

    def resolve(self, unit_format_bytes: dict[str, int], params: int) -> int:
        """Bytes allowed. `unit_format_bytes[name]` = bytes of all units in that format (absent if inapplicable)."""
        if self.kind == "format":
            if self.value not in unit_format_bytes:
                raise ExqError(f"budget {self.spec}: format {self.value} cannot store every unit of this model")
            return unit_format_bytes[str(self.value)]
        if self.kind == "bpw":
            return int(params * float(self.value) / 8)
        return int(self.value)


def parse_budget(spec: str) -> Budget:
    s = str(spec).strip()
    if s in FORMATS:
        return Budget(s, "format", s)
    if m := _BPW.match(s):
        bpw = float(m.group(1))
        if bpw <= 0:
            raise ExqError(f"budget {spec!r} must be positive")
        return Budget(s, "bpw", bpw)
    if m := _SIZE.match(s):
        value = float(m.group(1)) * _MULT[m.group(2)]
        if value < 1:
            raise ExqError(f"budget {spec!r} must be at least 1 byte")
        return Budget(s, "bytes", int(value))
    raise ExqError(
        f"cannot read budget {spec!r}",
        f"use a format name ({REFERENCE_FORMAT}: uniform int4 group-128 bytes), bits per weight (4.25bpw) or a size "
        "(3.2GB, 900MiB)",
    )


def describe_bytes(n: int, params: int) -> str:
    return f"{n:,} bytes ({n / 1e9:.4g} GB, {8 * n / params:.4f} bits per weight)"
