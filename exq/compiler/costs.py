"""Cost sources: what putting a unit in a format costs the model. The solver minimises the sum under the budget.

Two sources behind one interface (`cost_table(units, formats) -> [U, F]`, inf where unknown):

- `SensitivityTable` — measured: cost[(layer, expert, block, format)], written by `exq sensitivity`. Its file format is
  defined (and validated) here.
- `FrequencyProxy` — from the routing profile alone: routed-token share x parameters x a per-format noise factor.
  This is the frequency-driven idea kept as a baseline and for models with no calibration run; measured on the
  fixture models it allocates worse than uniform int4, so it is never the default when a table exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from exq.compiler.units import BLOCKS, Unit
from exq.errors import ExqError, FormatError
from exq.fileio import load_sealed, save_sealed, seal, sha256_bytes
from exq.formats import FORMATS, Format
from exq.models.fingerprint import check_same_model

SENSITIVITY_FORMAT = "exq.sensitivity"
SENSITIVITY_SCHEMA = 1


class CostSource(Protocol):
    def cost_table(self, units: list[Unit], formats: list[Format]) -> np.ndarray: ...

    def describe(self) -> dict: ...


@dataclass
class SensitivityTable:
    """Measured damage of quantizing one block of one expert (all else bf16), in units comparable across layers.

    routed[l, e, b, f]: MoE layer l, expert e, block b in BLOCKS, format `formats[f]`; NaN = not measured.
    shared[l, f] / attention[d, f]: optional, for shared experts per MoE layer and attention per decoder layer.
    A unit's cost for a format is the sum over its blocks (the table assumes additivity; bf16 costs 0).
    """

    model: dict
    formats: list[str]
    routed: np.ndarray
    shared: np.ndarray | None = None
    attention: np.ndarray | None = None
    cost_unit: str = "nats of KL(bf16 || quantized) per token"
    method: dict = field(default_factory=dict)  # quantizer per format, tokens used, calibration notes

    def __post_init__(self) -> None:
        self._validate(Path("<in memory>"))

    # ---- validation -----------------------------------------------------------------------------------------
    def _validate(self, path: Path) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise FormatError(f"sensitivity table {path} is invalid: {what}", "re-create it with `exq sensitivity`")

        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise FormatError(
                f"sensitivity table {path} uses unknown format(s) {', '.join(unknown)}",
                f"this exq knows {', '.join(FORMATS)}; upgrade exq or re-create the table",
            )
        need(len(set(self.formats)) == len(self.formats), "repeated format")
        layers = self.model.get("structure", {}).get("moe_layers")
        need(bool(layers), "model structure missing")
        n_f = len(self.formats)
        e_max = max(int(lay["num_experts"]) for lay in layers)
        need(self.routed.shape == (len(layers), e_max, len(BLOCKS), n_f), f"routed shape {self.routed.shape}")
        need(self.routed.dtype == np.float64, "routed dtype must be float64")
        for arr, name in ((self.routed, "routed"), (self.shared, "shared"), (self.attention, "attention")):
            if arr is not None:
                need(not np.isinf(arr).any(), f"{name} has infinite costs")
        if "bf16" in self.formats:
            col = self.routed[..., self.formats.index("bf16")]
            need(bool(np.all(np.isnan(col) | (col == 0))), "bf16 costs must be 0 (bf16 is the reference)")
        if self.shared is not None:
            need(self.shared.shape == (len(layers), n_f), f"shared shape {self.shared.shape}")
        if self.attention is not None:
            n_dec = len(self.model["structure"]["attention"])
            need(self.attention.shape == (n_dec, n_f), f"attention shape {self.attention.shape}")

    # ---- file -----------------------------------------------------------------------------------------------
    def _header(self) -> dict:
        return {
            "format": SENSITIVITY_FORMAT,
            "schema_version": SENSITIVITY_SCHEMA,
            "model": self.model,
            "formats": self.formats,
            "format_specs": {f: FORMATS[f].definition() for f in self.formats},
            "blocks": list(BLOCKS),
            "cost_unit": self.cost_unit,
            "method": self.method,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"routed": self.routed}
        if self.shared is not None:
            arrays["shared"] = self.shared
        if self.attention is not None:
            arrays["attention"] = self.attention
        return arrays

    def save(self, path: str | Path) -> Path:
        return save_sealed(path, self._header(), self._arrays())

    @property
    def content_sha256(self) -> str:
        hashes = {k: sha256_bytes(np.ascontiguousarray(v).tobytes()) for k, v in self._arrays().items()}
        return seal({**self._header(), "arrays_sha256": hashes})["content_sha256"]

    @classmethod
    def load(cls, path: str | Path, model: dict | None = None) -> SensitivityTable:
        path = Path(path)
        h, arrays = load_sealed(path, SENSITIVITY_FORMAT, SENSITIVITY_SCHEMA, "sensitivity table", "exq sensitivity")
        try:
            table = cls.__new__(cls)
            table.model, table.formats = dict(h["model"]), [str(f) for f in h["formats"]]
            table.routed = arrays["routed"]
            table.shared, table.attention = arrays.get("shared"), arrays.get("attention")
            table.cost_unit, table.method = str(h["cost_unit"]), dict(h["method"])
            specs = dict(h["format_specs"])
            if list(h["blocks"]) != list(BLOCKS):
                raise FormatError(f"sensitivity table {path} has blocks {h['blocks']}, expected {list(BLOCKS)}")
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"sensitivity table {path} is missing a field ({e})", "re-create it") from e
        table._validate(path)
        changed = [
            f
            for f in table.formats
            if {k: v for k, v in dict(specs.get(f) or {}).items() if k != "runtimes"} != FORMATS[f].definition()
        ]
        if changed:
            raise FormatError(
                f"sensitivity table {path} measured format(s) {', '.join(changed)} with another definition than "
                "this exq's",
                "re-create it with `exq sensitivity`",
            )
        if model is not None:
            check_same_model(table.model, model, f"sensitivity table {path}")
        return table

    # ---- cost source ----------------------------------------------------------------------------------------
    def cost_table(self, units: list[Unit], formats: list[Format]) -> np.ndarray:
        missing = [f.name for f in formats if f.name != "bf16" and f.name not in self.formats]
        if missing:
            raise ExqError(
                f"the sensitivity table has no costs for format(s) {', '.join(missing)} "
                f"(it measured {', '.join(self.formats)})",
                "drop them from --formats or re-run `exq sensitivity` with them",
            )
        if any(u.kind == "shared" for u in units) and self.shared is None:
            raise ExqError("--include-shared needs shared-expert costs, which this sensitivity table lacks")
        if any(u.kind == "attention" for u in units) and self.attention is None:
            raise ExqError("--include-attention needs attention costs, which this sensitivity table lacks")
        cols = [self.formats.index(f.name) if f.name in self.formats else -1 for f in formats]
        out = np.zeros((len(units), len(formats)))
        for u, unit in enumerate(units):
            for f, col in enumerate(cols):
                if col < 0:  # bf16 not in the table: the reference, cost 0
                    continue
                if unit.kind == "expert":
                    blocks = range(len(BLOCKS)) if unit.block == "expert" else [BLOCKS.index(unit.block)]
                    out[u, f] = sum(self.routed[unit.layer, unit.expert, b, col] for b in blocks)
                else:
                    out[u, f] = (self.shared if unit.kind == "shared" else self.attention)[unit.layer, col]
        return np.where(np.isnan(out), np.inf, out)

    def describe(self) -> dict:
        return {
            "kind": "sensitivity",
            "cost_unit": self.cost_unit,
            "method": self.method,
            "sha256": self.content_sha256,
        }


# Relative mean squared error of round-to-nearest at b bits shrinks about 4x per bit; asymmetric grids waste less
# range. Only the ratios matter to the solver.
def _noise(fmt: Format) -> float:
    if not fmt.quantized:
        return 0.0
    return math.pow(4.0, -fmt.bits) * (1.0 if fmt.symmetric else 0.7)


@dataclass
class FrequencyProxy:
    """cost = share of routed tokens x parameters x noise(format); shared experts and attention see every token."""

    profile: object  # RoutingProfile

    def cost_table(self, units: list[Unit], formats: list[Format]) -> np.ndarray:
        freq = [self.profile.frequency(i) / self.profile.layers[i].top_k for i in range(len(self.profile.layers))]
        noise = np.array([_noise(f) for f in formats])
        weight = np.array([freq[u.layer][u.expert] if u.kind == "expert" else 1.0 for u in units])
        params = np.array([u.params for u in units], dtype=np.float64)
        return (weight * params)[:, None] * noise[None, :]

    def describe(self) -> dict:
        return {"kind": "frequency-proxy", "sha256": self.profile.content_sha256}
