"""Weight formats and their exact storage cost.

Every byte a format stores is counted here — packed codes, scales and zero points — and nowhere else: the compiler
allocates with these numbers, the checkpoint writer writes exactly these bytes, and the kernels read them. A weight
matrix is [out, in]; groups run along `in` (the reduction dimension), so `in` must be a multiple of the group size.

Storage of a quantized [out, in] matrix:
  codes   uint8 [out, in * bits / 8]  per row, little end first (for int4: element 2j in the low nibble of byte j)
  scales  fp16  [out, in / group]     (int8: [out, 1], per output channel)
  zeros   uint8 [out, in / group]     asymmetric formats only; integer zero point in [0, 2^bits - 1]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from exq.errors import ExqError

SCALE_BYTES = 2  # fp16
ZERO_BYTES = 1  # uint8


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    group_size: int | None  # None: one scale per output channel (int8); 0: not quantized (bf16)
    symmetric: bool = True
    runtimes: frozenset[str] = frozenset({"torch"})  # where a layer using it can run

    @property
    def quantized(self) -> bool:
        return self.group_size != 0

    def applicable(self, out_features: int, in_features: int) -> bool:
        return not self.group_size or in_features % self.group_size == 0

    def groups(self, in_features: int) -> int:
        if self.group_size == 0:
            return 0
        return 1 if self.group_size is None else in_features // self.group_size

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Exact bytes of an [out, in] matrix in this format, scales and zero points included."""
        if not self.applicable(out_features, in_features):
            raise ExqError(
                f"format {self.name} needs in_features divisible by {self.group_size}; got [{out_features}, "
                f"{in_features}]"
            )
        if not self.quantized:
            return out_features * in_features * self.bits // 8
        codes = out_features * -(-in_features * self.bits // 8)
        g = self.groups(in_features)
        return codes + out_features * g * (SCALE_BYTES + (0 if self.symmetric else ZERO_BYTES))

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 8 * self.nbytes(out_features, in_features) / (out_features * in_features)

    def definition(self) -> dict:
        """What the stored bytes mean (runtimes excluded: support can grow without changing a single byte)."""
        d = asdict(self)
        del d["runtimes"]
        return d

    def spec(self) -> dict:
        return {**self.definition(), "runtimes": sorted(self.runtimes)}


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bf16", 16, 0),
        Format("int8", 8, None),
        Format("int4", 4, 128),
        Format("int4-asym", 4, 128, symmetric=False),
        Format("int3", 3, 128),
        Format("int3-asym", 3, 128, symmetric=False),
        Format("int2-asym", 2, 128, symmetric=False),
    )
}
REFERENCE_FORMAT = "int4"  # the `int4` budget: uniform symmetric int4, group 128, fp16 scales


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ExqError(f"unknown format {name!r}", f"known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def parse_formats(names: str | list[str], runtime: str | None = None) -> list[Format]:
    """A comma-separated list (or list) of format names, checked against the registry and the target runtime."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    items = [n for n in items if n]
    if not items:
        raise ExqError("no formats given", f"choose from {', '.join(FORMATS)}")
    if len(set(items)) != len(items):
        raise ExqError(f"format list {items} repeats a format")
    fmts = [get_format(n) for n in items]
    if runtime is not None:
        bad = [f.name for f in fmts if runtime not in f.runtimes]
        if bad:
            ok = [f.name for f in FORMATS.values() if runtime in f.runtimes]
            raise ExqError(f"runtime {runtime!r} cannot run {', '.join(bad)}", f"it runs: {', '.join(ok)}")
    return fmts


def runtime_formats(runtime: str) -> list[Format]:
    return [f for f in FORMATS.values() if runtime in f.runtimes]
