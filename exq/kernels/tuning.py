"""Tuned kernel tables: which kernel configuration won, per GPU, layer class and rows per active expert.

A table is measured by `exq bench kernels` (its sweep records the best config of every (shape, plan, tokens) cell)
and turned into a file by its `--table` option or `benchmarks/kernel_table.py` (`table_from_results`); tables ship in
`exq/kernels/tuned/`, and a user's own (another GPU, or their model's shapes) join them through `kernel_tables`. The
compiler's pass D (`exq.compiler.specialize`) reads them to pick each layer's configuration per batch size from the
profile's routing, and the runtime uses what the plan stored.

Key: the layer class (`int4` when every expert is int4/int4-asym, `bf16` when all are bf16, else `mixed`) and the
expected rows per active expert, the quantity that decides between the GEMV path, small row blocks and large
tensor-core tiles: a lookup (`choose`) takes the entry nearest in log(rows), whatever shape it was measured on. Rows
tie across shapes (exactly at T = 1, and at 16 / 64 rows under uniform routing), and there the entry measured on a
layer of the same sizes wins, then the one nearest in (token, slot) pairs. Measured (v20, H100,
`benchmarks/pass_d_choice.py`, docs/bench/v20/pass_d_choice_h100.json): at the table's own cells the pick is now the
measured best (with rows alone 10 of 68 cells took another shape's entry, up to 9 % slower); between them (T = 2, 8,
32, 128, 512) it comes within 3.0 % of the fastest of seven rules in geometric mean, where rows alone gave 3.3 %,
the same shape's nearest entry 8.5 % (its entries are 4x apart in T) and the op's default rule 3.6 %.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cache
from pathlib import Path

from exq.errors import FormatError
from exq.fileio import read_json
from exq.kernels.configs import KERNEL_FORMATS, Config, GemmConfig, GemvConfig

TABLE_FORMAT = "exq-kernel-table"
TABLE_SCHEMA = 2  # 2: each entry records its layer's sizes (`DIMS`) and batch size
DIMS = ("experts", "hidden", "intermediate", "top_k")
TUNED_DIR = Path(__file__).parent / "tuned"
CLASSES = ("int4", "mixed", "bf16")


def layer_class(formats: set[str]) -> str | None:
    """The table class of a layer's formats, or None when the tables have none: a format without a kernel (the
    layer runs in torch), or int3 experts (v15: not swept into the tables; the op's default rule picks, which at
    decode beats the mixed entries by 5-30 %)."""
    if not formats <= set(KERNEL_FORMATS) or formats & {"int3", "int3-asym"}:
        return None
    if formats <= {"int4", "int4-asym"}:
        return "int4"
    return "bf16" if formats == {"bf16"} else "mixed"


# a layer's choice: one config for both projections, or (gate_up, down) where each has its own (v14: at decode the
# two projections' best GEMV tiles differ on some shapes)
LayerConfig = Config | tuple[Config, Config]


def config_to_dict(cfg: LayerConfig) -> dict:
    """The stored form; a (gate_up, down) pair is gate_up's dict with down's under "down"."""
    if isinstance(cfg, tuple):
        return {**config_to_dict(cfg[0]), "down": config_to_dict(cfg[1])}
    return {"kind": "gemv" if isinstance(cfg, GemvConfig) else "gemm", **cfg.as_dict()}


# a flag that configs once had and no longer have: an entry holding it off still reads; on, it names a kernel
# variant that is gone (measured slower and removed, perf-notes v13)
_RETIRED_FLAGS = ("swap_ab",)


def config_from_dict(d: dict) -> LayerConfig:
    if "down" in d:
        if not isinstance(d["down"], dict) or "down" in d["down"]:
            raise FormatError(f"kernel config {d}: 'down' must hold one config")
        return config_from_dict({k: v for k, v in d.items() if k != "down"}), config_from_dict(d["down"])
    kind = d.get("kind")
    cls = {"gemv": GemvConfig, "gemm": GemmConfig}.get(kind)
    if cls is None:
        raise FormatError(f"unknown kernel config kind {kind!r}")
    if any(d.get(f) for f in _RETIRED_FLAGS):
        raise FormatError(f"kernel config {d} uses a removed variant (swap_ab)", "re-run `exq compile` to pick again")
    # a field's annotation is the string "bool" under postponed evaluation, the type itself without it
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(types) - {"kind", *_RETIRED_FLAGS})
    if unknown:
        raise FormatError(f"kernel config {d} has fields this exq does not know: {unknown}", "update exq or re-plan")
    return cls(**{k: bool(v) if types[k] in ("bool", bool) else int(v) for k, v in d.items() if k in types})


def parse_bench_config(value) -> LayerConfig | None:
    """A config as `exq bench kernels` recorded it: a GemmConfig tuple, 'GemvConfig(...)' / 'GemmConfig(...)', a
    (gate_up, down) pair as 'A + B', or None (the default rule of that run, unknown afterwards)."""
    if value is None:
        return None
    if isinstance(value, list):
        return GemmConfig(*value)
    if " + " in str(value):
        parts = str(value).split(" + ")
        if len(parts) != 2:
            raise FormatError(f"cannot read kernel config {value!r}")
        return parse_bench_config(parts[0]), parse_bench_config(parts[1])
    m = re.fullmatch(r"(GemmConfig|GemvConfig)\(([\w, ]+)\)", str(value))
    if not m:
        raise FormatError(f"cannot read kernel config {value!r}")
    try:
        args = [{"True": True, "False": False}.get(x.strip()) if x.strip() in ("True", "False") else int(x)
                for x in m.group(2).split(",")]  # fmt: skip
    except ValueError as e:
        raise FormatError(f"cannot read kernel config {value!r}") from e
    if m.group(1) == "GemmConfig" and len(args) == 8 and isinstance(args[7], bool):  # swap_ab's time (v12)
        if args[7]:
            raise FormatError(f"kernel config {value!r} uses a removed variant (swap_ab)", "re-run the sweep")
        args = args[:7]
    return (GemmConfig if m.group(1) == "GemmConfig" else GemvConfig)(*args)


def validate_table(t: dict, where: str) -> dict:
    if not isinstance(t, dict) or t.get("format") != TABLE_FORMAT:
        raise FormatError(f"{where} is not an exq kernel table")
    if t.get("schema_version") != TABLE_SCHEMA:
        raise FormatError(
            f"{where} is a kernel table of schema {t.get('schema_version')}, this exq reads schema {TABLE_SCHEMA}",
            f"upgrade it: python benchmarks/kernel_table.py --base {where} --output {where}",
        )
    try:
        for e in t["entries"]:
            ok = e["class"] in CLASSES and float(e["rows_per_expert"]) > 0 and int(e["tokens"]) > 0
            if not ok or sorted(e["dims"]) != sorted(DIMS) or min(int(v) for v in e["dims"].values()) < 1:
                raise FormatError(f"{where}: bad entry {e}")
            config_from_dict(e["config"])
        str(t["gpu"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where} is missing a field ({e})", "rebuild it with benchmarks/kernel_table.py") from e
    return t


@cache
def packaged_tables() -> dict[str, dict]:
    """GPU name -> table, for every table shipped with exq."""
    out = {}
    for f in sorted(TUNED_DIR.glob("*.json")):
        t = validate_table(read_json(f, "kernel table"), str(f))
        out[t["gpu"]] = t
    return out


def choose(
    table: dict, cls: str, rows_per_expert: float, dims: tuple[int, int, int, int], tokens: int
) -> LayerConfig | None:
    """The config of the class's entry nearest in log rows per active expert, to two decimals (about 1 %); among
    those, the entry of these layer sizes (experts, hidden, intermediate, top_k) first, then the one nearest in
    pairs (tokens x top_k). None when the class has no entry."""
    entries = [e for e in table["entries"] if e["class"] == cls]
    if not entries:
        return None
    want = dict(zip(DIMS, dims, strict=True))
    pairs = tokens * dims[3]

    def distance(e: dict) -> tuple[float, bool, float]:
        rows = abs(math.log(float(e["rows_per_expert"])) - math.log(max(rows_per_expert, 1e-3)))
        other = {k: int(v) for k, v in e["dims"].items()} != want
        return round(rows, 2), other, abs(math.log(int(e["tokens"]) * int(e["dims"]["top_k"]) / pairs))

    return config_from_dict(min(entries, key=distance)["config"])


def load_table(path: str | Path) -> dict:
    """A kernel table file (`exq bench kernels --table` or `benchmarks/kernel_table.py`), validated."""
    return validate_table(read_json(path, "kernel table"), str(path))


def kernel_tables(extra: list[str | Path] | tuple = ()) -> dict[str, dict]:
    """GPU name -> table: the packaged tables with the user's own (`exq bench kernels --table`: a GPU exq ships no
    table for, or their model's shapes on one it does) merged in, a user cell replacing the packaged cell of the same
    layer sizes, class and batch. Pass D's lookup prefers an entry of the layer's own sizes among equally near ones,
    so a model benched on its own shape gets its own measured configs."""
    out, seen = dict(packaged_tables()), {}
    for path in extra:
        t = load_table(path)
        if t["gpu"] in seen:
            raise FormatError(f"{seen[t['gpu']]} and {path} are both kernel tables for {t['gpu']}", "give one per GPU")
        seen[t["gpu"]] = path
        if t["gpu"] in out:
            cells = {_cell(e["dims"], e["class"], e["tokens"]): e for e in out[t["gpu"]]["entries"] + t["entries"]}
            t = t | {"source": out[t["gpu"]]["source"] + t["source"], "entries": list(cells.values())}
        out[t["gpu"]] = t
    return out


def _cell(dims: dict, cls: str, tokens: int) -> tuple:
    """What makes two table entries the same cell: the layer's sizes (not the name its run gave them), the class and
    the batch."""
    return tuple(int(dims[k]) for k in DIMS), cls, int(tokens)


def _row_dims(row: dict) -> dict:
    """A bench row's layer sizes: recorded in the row since custom shapes, else those of its named shape."""
    from exq.bench import SHAPES

    if isinstance(row.get("dims"), list) and len(row["dims"]) == len(DIMS):
        return dict(zip(DIMS, (int(v) for v in row["dims"]), strict=True))
    if row.get("shape") not in SHAPES:
        raise FormatError(
            f"shape {row.get('shape')!r} is not one of exq bench's shapes ({', '.join(SHAPES)}), and its row records"
            " no sizes",
            "re-run `exq bench kernels`: its rows record their sizes",
        )
    return dict(zip(DIMS, SHAPES[row["shape"]], strict=True))


def upgraded_table(t: dict, where: str) -> dict:
    """A schema-1 table (entries without their layer's sizes) as schema 2: the sizes of the bench shape each entry
    names. Other tables come back as they are."""
    if isinstance(t, dict) and t.get("schema_version") == 1 and isinstance(t.get("entries"), list):
        try:
            entries = [e | {"dims": _row_dims({"shape": e["shape"]})} for e in t["entries"]]
        except (KeyError, TypeError) as err:
            raise FormatError(f"{where}: an entry without its shape ({err})", "rebuild it from the results") from err
        return t | {"schema_version": TABLE_SCHEMA, "entries": entries}
    return t


def _row_config(row: dict) -> tuple[LayerConfig | None, float]:
    """The winning config of a bench row and its time: the swept best, else (the default rule won) its configs as
    the run recorded them, else for runs that recorded neither the fastest swept one."""
    cfg, us = parse_bench_config(row.get("exq_config")), row["exq_us"]
    if cfg is None and row.get("exq_default_config"):
        gu, dn = (parse_bench_config(n) for n in row["exq_default_config"])
        cfg = gu if gu == dn else (gu, dn)
    if cfg is None and row.get("exq_sweep"):
        name, us = min(row["exq_sweep"].items(), key=lambda kv: kv[1])
        cfg = parse_bench_config(name)
    return cfg, us


def table_from_results(results: list[tuple[str, dict]], base: dict | None = None, if_faster: tuple = ()) -> dict:
    """A kernel table from `exq bench kernels` results [(label, result)]: every (shape, plan, tokens) cell whose
    best config is known becomes an entry, keyed by its class and the rows per active expert of the bench's uniform
    routing, E_active = E (1 - (1 - k/E)^T). Later results override earlier ones for the same cell; those whose
    label is in if_faster replace a cell only with a faster time (a targeted run of a few candidates must not undo
    a full sweep's better pick). base: an existing table whose cells the results update. Only the table classes
    (int4, mixed, bf16) make entries."""
    import numpy as np

    from exq.compiler.specialize import rows_per_active_expert

    cells, gpu, sources = {}, None, []
    if base is not None:
        gpu, sources = base["gpu"], list(base["source"])
        cells = {_cell(e["dims"], e["class"], e["tokens"]): e for e in base["entries"]}
    for label, r in results:
        gpu = gpu or r["device"]
        if r["device"] != gpu:
            raise FormatError(f"{label} was measured on {r['device']}, not {gpu}", "one table per GPU")
        for row in r["rows"]:
            if row["plan"] not in CLASSES:  # e.g. the int3 plans: their layers share the "mixed" class
                continue
            cfg, us = _row_config(row)
            if cfg is None:
                continue
            dims = _row_dims(row)
            uniform = np.full(dims["experts"], 1.0 / dims["experts"])  # the benchmark's routing
            key = _cell(dims, row["plan"], row["tokens"])
            if label in if_faster and key in cells and cells[key]["us"] <= us:
                continue
            cells[key] = {
                "class": row["plan"],
                "shape": row["shape"],
                "tokens": row["tokens"],
                "rows_per_expert": round(rows_per_active_expert(uniform, dims["top_k"], row["tokens"]), 4),
                "dims": dims,
                "config": config_to_dict(cfg),
                "us": round(us, 2),
            }
    if gpu is None:
        raise FormatError("no benchmark results to make a kernel table of")
    table = {
        "format": TABLE_FORMAT,
        "schema_version": TABLE_SCHEMA,
        "gpu": gpu,
        "source": sources + [label for label, _ in results],
        "entries": sorted(cells.values(), key=lambda c: (c["class"], c["rows_per_expert"], c["shape"])),
    }
    return validate_table(table, "the new kernel table")
