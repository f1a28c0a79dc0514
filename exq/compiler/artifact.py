"""The compiled plan: a versioned, sealed JSON file that later stages (quantize, kernels, serve) follow.

It records the model fingerprint (with the matrix shapes), the budget and the bytes used, every unit's format, the
layout permutation, the prefetch schedule, where the costs came from, the solver's result and hashes of its inputs.
It holds no timings or dates, so the same inputs give byte-identical files. Loading re-counts every unit's bytes from
the shapes and the format registry — independently of the solver — and refuses a plan over its budget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from exq.compiler.layout import check_layout
from exq.compiler.units import BLOCKS, GRANULARITIES, Unit, build_units, unit_bytes
from exq.errors import FormatError
from exq.fileio import load_sealed, save_sealed
from exq.formats import FORMATS
from exq.models.fingerprint import check_same_model

PLAN_FORMAT = "exq.plan"
PLAN_SCHEMA = 1


def _exq_version() -> str:
    from exq import __version__

    return __version__


@dataclass
class Artifact:
    model: dict
    granularity: str
    runtime: str
    candidates: list[str]
    budget: dict  # {"spec": as written, "bytes": allowed}
    experts: list[dict[str, list[str]]]  # per MoE layer: {"gate_up": [format per expert], "down": [...]}
    shared: list[str] | None  # per MoE layer, when shared experts were allocated
    attention: list[str | None] | None  # per decoder layer, when attention was allocated
    layout: list[dict]  # per MoE layer: {"gate_up": {"order", "slabs"}, "down": {...}}
    prefetch: dict  # {"candidates": m, "transitions": [layer][expert] -> [[j, p], ...]}
    cost_source: dict
    solver: dict
    inputs: dict
    routing: list[list[float]] | None = None  # per MoE layer, each expert's share of routed slots (for reports)
    kernels: dict | None = None  # pass D: {gpu: [per MoE layer: {"class", "configs": {T: config}} | None]}
    exq_version: str = field(default_factory=_exq_version)

    # ---- derived --------------------------------------------------------------------------------------------
    def units(self) -> list[tuple[Unit, str]]:
        """Every allocated unit with its format, rebuilt from the model structure."""
        structure = self.model["structure"]
        units = build_units(structure, self.granularity, self.shared is not None, self.attention is not None)
        out = []
        for u in units:
            if u.kind == "expert":
                block = "gate_up" if u.block == "expert" else u.block
                out.append((u, self.experts[u.layer][block][u.expert]))
            elif u.kind == "shared":
                out.append((u, self.shared[u.layer]))
            else:
                out.append((u, self.attention[u.layer]))
        return out

    def count_bytes(self) -> tuple[int, int]:
        """(bytes, parameters) of all allocated units, counted from shapes and the format registry."""
        total = params = 0
        for u, name in self.units():
            b = unit_bytes(u, FORMATS[name])
            if b is None:
                raise FormatError(f"plan puts {u.key} in {name}, which cannot store its matrices {u.matrices}")
            total += b
            params += u.params
        return total, params

    def summary(self) -> dict:
        used, params = self.count_bytes()
        by_fmt: Counter = Counter()
        n_fmt: Counter = Counter()
        for u, name in self.units():
            by_fmt[name] += unit_bytes(u, FORMATS[name])
            n_fmt[name] += 1
        return {
            "bytes": used,
            "params": params,
            "bits_per_weight": round(8 * used / params, 6),
            "budget_bytes": self.budget["bytes"],
            "units_per_format": dict(sorted(n_fmt.items())),
            "bytes_per_format": dict(sorted(by_fmt.items())),
        }

    # ---- file -----------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        used_formats = sorted({name for _, name in self.units()} | set(self.candidates))
        return {
            "format": PLAN_FORMAT,
            "schema_version": PLAN_SCHEMA,
            "exq_version": self.exq_version,
            "model": self.model,
            "granularity": self.granularity,
            "runtime": self.runtime,
            "candidates": self.candidates,
            "format_specs": {f: FORMATS[f].definition() for f in used_formats},
            "budget": self.budget,
            "summary": self.summary(),
            "plan": {"experts": self.experts, "shared": self.shared, "attention": self.attention},
            "layout": self.layout,
            "prefetch": self.prefetch,
            "cost_source": self.cost_source,
            "solver": self.solver,
            "inputs": self.inputs,
            "routing": self.routing,
            "kernels": self.kernels,
        }

    def save(self, path: str | Path) -> Path:
        return save_sealed(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, model: dict | None = None) -> Artifact:
        path = Path(path)
        h, _ = load_sealed(path, PLAN_FORMAT, PLAN_SCHEMA, "compiled plan", "exq compile")
        try:
            unknown = sorted({n for n in h["candidates"] if n not in FORMATS} | set(h["format_specs"]) - set(FORMATS))
            if unknown:
                raise FormatError(
                    f"compiled plan {path} uses unknown format(s) {', '.join(unknown)}",
                    f"this exq knows {', '.join(FORMATS)}; upgrade exq or re-compile",
                )
            for name, spec in h["format_specs"].items():
                if dict(spec) != FORMATS[name].definition():
                    raise FormatError(f"compiled plan {path} defines {name} differently from this exq; re-compile it")
            art = cls(
                model=dict(h["model"]),
                granularity=str(h["granularity"]),
                runtime=str(h["runtime"]),
                candidates=list(h["candidates"]),
                budget={"spec": str(h["budget"]["spec"]), "bytes": int(h["budget"]["bytes"])},
                experts=h["plan"]["experts"],
                shared=h["plan"]["shared"],
                attention=h["plan"]["attention"],
                layout=h["layout"],
                prefetch=h["prefetch"],
                cost_source=h["cost_source"],
                solver=h["solver"],
                inputs=h["inputs"],
                routing=h.get("routing"),
                kernels=h.get("kernels"),
                exq_version=str(h["exq_version"]),
            )
            recorded = int(h["summary"]["bytes"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(
                f"compiled plan {path} is missing a field ({e})", "re-create it with `exq compile`"
            ) from e
        art.validate(path, recorded)
        if model is not None:
            check_same_model(art.model, model, f"compiled plan {path}")
        return art

    def validate(self, path: Path | str = "<plan>", recorded_bytes: int | None = None) -> None:
        def bad(what: str) -> FormatError:
            return FormatError(f"compiled plan {path} is invalid: {what}", "re-create it with `exq compile`")

        if self.granularity not in GRANULARITIES:
            raise bad(f"granularity {self.granularity!r}")
        layers = self.model["structure"]["moe_layers"]
        if len(self.experts) != len(layers) or len(self.layout) != len(layers):
            raise bad("plan and layout must have one entry per MoE layer")
        for li, (plan, lay, meta) in enumerate(zip(self.experts, self.layout, layers, strict=True)):
            for block in BLOCKS:
                fmts = plan[block]
                if len(fmts) != int(meta["num_experts"]):
                    raise bad(f"layer {li} {block}: {len(fmts)} formats for {meta['num_experts']} experts")
                unknown = [f for f in fmts if f not in FORMATS]
                if unknown:
                    raise FormatError(f"compiled plan {path} uses unknown format {unknown[0]!r}")
                why = check_layout(lay[block], fmts)
                if why:
                    raise bad(f"layer {li} {block} layout: {why}")
            if self.granularity == "expert" and plan["gate_up"] != plan["down"]:
                raise bad(f"layer {li}: expert granularity needs one format per expert")
        if self.routing is not None and [len(r) for r in self.routing] != [int(m["num_experts"]) for m in layers]:
            raise bad("routing shares do not match the experts")
        if self.kernels is not None:
            why = check_kernels(self.kernels, len(layers))
            if why:
                raise bad(f"kernel configurations: {why}")
        used = {name for _, name in self.units()}
        not_runnable = sorted(f for f in used if self.runtime not in FORMATS[f].runtimes)
        if not_runnable:
            raise bad(f"runtime {self.runtime!r} cannot run {', '.join(not_runnable)}")
        total, _ = self.count_bytes()
        if recorded_bytes is not None and total != recorded_bytes:
            raise bad(f"it records {recorded_bytes:,} bytes but its units take {total:,}")
        if total > self.budget["bytes"]:
            raise bad(f"its units take {total:,} bytes, over the budget of {self.budget['bytes']:,}")


def check_kernels(kernels: dict, n_layers: int) -> str | None:
    """Why pass D's section is malformed, or None."""
    from exq.kernels.tuning import config_from_dict

    try:
        for gpu, layers in kernels.items():
            if len(layers) != n_layers:
                return f"{gpu}: {len(layers)} entries for {n_layers} MoE layers"
            for entry in layers:
                if entry is not None:
                    for t, cfg in entry["configs"].items():
                        int(t)
                        config_from_dict(cfg)
    except (AttributeError, KeyError, TypeError, ValueError, FormatError) as e:
        return str(e)
    return None
