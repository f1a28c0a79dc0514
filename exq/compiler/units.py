"""Units of allocation: the pieces of a model that each get one format.

Routed experts always: one unit per expert (gate+up+down), or per linear block (gate+up tied, down). Shared experts
(one unit per MoE layer) and attention (one unit per decoder layer) only when asked. Shapes come from the model
structure recorded in the profile, so the compiler never needs the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from exq.errors import ExqError
from exq.formats import Format

GRANULARITIES = ("expert", "block")
BLOCKS = ("gate_up", "down")


@dataclass(frozen=True)
class Unit:
    kind: str  # "expert", "shared" or "attention"
    layer: int  # MoE layer index for experts and shared experts; decoder layer index for attention
    expert: int  # -1 unless kind == "expert"
    block: str  # "expert" (gate_up + down), "gate_up", "down", "shared" or "attention"
    matrices: tuple[tuple[int, int], ...]  # (out, in) of every matrix the unit stores

    @property
    def key(self) -> str:
        if self.kind == "expert":
            return f"L{self.layer}.E{self.expert}.{self.block}"
        return f"L{self.layer}.{self.kind}"

    @property
    def params(self) -> int:
        return sum(o * i for o, i in self.matrices)


@cache
def _matrix_bytes(fmt: Format, matrices: tuple[tuple[int, int], ...]) -> int:
    return sum(fmt.nbytes(o, i) for o, i in matrices)


def unit_bytes(unit: Unit, fmt: Format) -> int | None:
    """Exact bytes of the unit in a format, or None if the format cannot store one of its matrices."""
    if not all(fmt.applicable(o, i) for o, i in unit.matrices):
        return None
    return _matrix_bytes(fmt, unit.matrices)


def build_units(
    structure: dict, granularity: str = "expert", include_shared: bool = False, include_attention: bool = False
) -> list[Unit]:
    if granularity not in GRANULARITIES:
        raise ExqError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
    units: list[Unit] = []
    for li, layer in enumerate(structure["moe_layers"]):
        h, i = int(layer["hidden_size"]), int(layer["intermediate_size"])
        gate_up, down = (2 * i, h), (h, i)
        for e in range(int(layer["num_experts"])):
            if granularity == "expert":
                units.append(Unit("expert", li, e, "expert", (gate_up, down)))
            else:
                units.append(Unit("expert", li, e, "gate_up", (gate_up,)))
                units.append(Unit("expert", li, e, "down", (down,)))
        if include_shared and layer["shared"]:
            units.append(Unit("shared", li, -1, "shared", tuple((int(o), int(n)) for _, o, n in layer["shared"])))
    if include_shared and not any(u.kind == "shared" for u in units):
        raise ExqError("--include-shared: this model has no shared experts")
    if include_attention:
        for d, linears in enumerate(structure["attention"]):
            if linears:
                units.append(Unit("attention", d, -1, "attention", tuple((int(o), int(n)) for _, o, n in linears)))
    return units


def bytes_table(units: list[Unit], formats: list[Format]) -> np.ndarray:
    """[U, F] int64 bytes; -1 where a format cannot store the unit."""
    out = np.full((len(units), len(formats)), -1, dtype=np.int64)
    for u, unit in enumerate(units):
        for f, fmt in enumerate(formats):
            b = unit_bytes(unit, fmt)
            if b is not None:
                out[u, f] = b
    return out
