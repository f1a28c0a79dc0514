"""`RoutingProfile`: what the router did on calibration text, and its file format.

On disk a profile is two files written atomically: `NAME.json` (metadata, per-layer summary, a hash of its own content
and of the arrays file) and `NAME.npz` (the count arrays). Counts are stored per domain; totals and every normalised
view (frequencies, shares, conditional co-activation) are derived, never stored twice. Loading checks the schema, both
hashes, every shape and the counting invariants (counts sum to tokens x top-k; co-activation rows sum to
count_i x k_next), so a truncated, hand-edited or mismatched file is refused with a message saying which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exq.errors import FormatError
from exq.fileio import load_sealed, save_sealed, seal, sha256_bytes
from exq.models.fingerprint import check_same_model

FORMAT = "exq.routing-profile"
SCHEMA_VERSION = 1


@dataclass
class LayerProfile:
    """Counts for one MoE layer, one row per domain."""

    index: int
    layer_index: int
    num_experts: int
    top_k: int
    counts: np.ndarray  # [D, E] int64: tokens whose router chose the expert
    gate_mass: np.ndarray  # [D, E] float64: sum of the routing weights applied to the expert
    token_entropy_sum: np.ndarray  # [D] float64: sum over tokens of the router distribution's entropy (nats)
    cosel: np.ndarray  # [D, E, E] int64: tokens choosing both i and j here (diagonal: counts)
    coact: np.ndarray | None  # [D, E, E_next] int64: tokens choosing i here and j at the next MoE layer


@dataclass
class DomainInfo:
    name: str
    file: str  # the path as it was given (to re-read the same text in later stages)
    sha256: str
    tokens: int


@dataclass
class RoutingProfile:
    model: dict
    domains: list[DomainInfo]
    layers: list[LayerProfile]
    seq_len: int
    batch_size: int
    dtype: str
    exq_version: str = field(default_factory=lambda: _exq_version())
    schema_version: int = SCHEMA_VERSION

    # ---- views -------------------------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.domains)

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def _rows(self, domain: str | None) -> slice | int:
        if domain is None:
            return slice(None)
        names = self.domain_names
        if domain not in names:
            raise KeyError(f"no domain {domain!r} in this profile (has {', '.join(names)})")
        return names.index(domain)

    def _tokens(self, domain: str | None) -> int:
        return self.tokens if domain is None else self.domains[self.domain_names.index(domain)].tokens

    def counts(self, layer: int, domain: str | None = None) -> np.ndarray:
        c = self.layers[layer].counts[self._rows(domain)]
        return c.sum(axis=0) if domain is None else c.copy()

    def gate_mass(self, layer: int, domain: str | None = None) -> np.ndarray:
        g = self.layers[layer].gate_mass[self._rows(domain)]
        return g.sum(axis=0) if domain is None else g.copy()

    def frequency(self, layer: int, domain: str | None = None) -> np.ndarray:
        """Fraction of tokens that routed to each expert (sums to top-k)."""
        return self.counts(layer, domain) / self._tokens(domain)

    def share(self, layer: int, domain: str | None = None) -> np.ndarray:
        """Each expert's share of the layer's routed token-slots (sums to 1)."""
        c = self.counts(layer, domain)
        return c / c.sum()

    def marginal_entropy(self, layer: int, domain: str | None = None) -> float:
        """Entropy (nats) of the expert-share distribution: ln(E) when load is uniform."""
        p = self.share(layer, domain)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def mean_token_entropy(self, layer: int, domain: str | None = None) -> float:
        """Mean over tokens of the entropy (nats) of the router's distribution over experts."""
        s = self.layers[layer].token_entropy_sum[self._rows(domain)]
        return float(np.sum(s) / self._tokens(domain))

    def coselection(self, layer: int, domain: str | None = None) -> np.ndarray:
        """S[i, j]: tokens that chose both experts i and j at MoE layer `layer` (S[i, i] = counts)."""
        c = self.layers[layer].cosel[self._rows(domain)]
        return c.sum(axis=0) if domain is None else c.copy()

    def coactivation(self, layer: int, domain: str | None = None) -> np.ndarray:
        """C[i, j]: tokens that chose expert i at MoE layer `layer` and expert j at layer `layer + 1`."""
        c = self.layers[layer].coact
        if c is None:
            raise IndexError(f"MoE layer {layer} is the last one; co-activation runs from layer l to l + 1")
        c = c[self._rows(domain)]
        return c.sum(axis=0) if domain is None else c.copy()

    def next_layer_probability(self, layer: int, domain: str | None = None) -> np.ndarray:
        """P(j chosen at layer + 1 | i chosen at layer); rows sum to the next layer's top-k (0 for unused i)."""
        c = self.coactivation(layer, domain).astype(np.float64)
        n = self.counts(layer, domain).astype(np.float64)[:, None]
        return np.divide(c, n, out=np.zeros_like(c), where=n > 0)

    def summary(self) -> list[dict]:
        out = []
        for i, lp in enumerate(self.layers):
            share = self.share(i)
            out.append(
                {
                    "moe_layer": i,
                    "layer_index": lp.layer_index,
                    "num_experts": lp.num_experts,
                    "top_k": lp.top_k,
                    "marginal_entropy": round(self.marginal_entropy(i), 6),
                    "marginal_entropy_normalised": round(self.marginal_entropy(i) / math.log(lp.num_experts), 6),
                    "mean_token_entropy": round(self.mean_token_entropy(i), 6),
                    "max_over_uniform_share": round(float(share.max() * lp.num_experts), 4),
                    "unused_experts": int((self.counts(i) == 0).sum()),
                }
            )
        return out

    # ---- file format -------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for i, lp in enumerate(self.layers):
            arrays[f"layer{i}.counts"] = lp.counts
            arrays[f"layer{i}.gate_mass"] = lp.gate_mass
            arrays[f"layer{i}.token_entropy_sum"] = lp.token_entropy_sum
            arrays[f"layer{i}.cosel"] = lp.cosel
            if lp.coact is not None:
                arrays[f"layer{i}.coact"] = lp.coact
        return arrays

    def _header(self) -> dict:
        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "exq_version": self.exq_version,
            "model": self.model,
            "run": {"seq_len": self.seq_len, "batch_size": self.batch_size, "dtype": self.dtype, "tokens": self.tokens},
            "domains": [vars(d) for d in self.domains],
            "layers": [
                {"moe_layer": i, "layer_index": lp.layer_index, "num_experts": lp.num_experts, "top_k": lp.top_k}
                for i, lp in enumerate(self.layers)
            ],
            "summary": self.summary(),
        }

    def save(self, path: str | Path) -> Path:
        """Write NAME.json and NAME.npz; returns the JSON path."""
        return save_sealed(path, self._header(), self._arrays())

    @property
    def content_sha256(self) -> str:
        """Identity of this profile's content (what a compiled artifact records as its input)."""
        return seal(
            {**self._header(), "arrays_sha256": {k: sha256_bytes(v.tobytes()) for k, v in self._arrays().items()}}
        )["content_sha256"]

    @classmethod
    def load(cls, path: str | Path, model: dict | None = None) -> RoutingProfile:
        """Read and validate a profile; `model` (a fingerprint) makes it refuse a profile of another model."""
        path = Path(path)
        header, arrays = load_sealed(path, FORMAT, SCHEMA_VERSION, "routing profile", "exq profile")
        prof = _validate(header, arrays, path)
        if model is not None:
            check_same_model(prof.model, model, f"routing profile {path}")
        return prof


def _exq_version() -> str:
    from exq import __version__

    return __version__


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise FormatError(f"routing profile {path} is invalid: {what}", "re-create it with `exq profile`")


def _validate(h: dict, arrays: dict, path: Path) -> RoutingProfile:
    try:
        run, model, layers_meta = h["run"], h["model"], h["layers"]
        domains = [DomainInfo(**d) for d in h["domains"]]
        seq_len, batch_size, dtype = int(run["seq_len"]), int(run["batch_size"]), str(run["dtype"])
        shapes = [(int(m["num_experts"]), int(m["top_k"]), int(m["layer_index"])) for m in layers_meta]
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"routing profile {path} is missing a field ({e})", "re-create it with `exq profile`") from e
    _need(isinstance(model, dict) and bool(domains) and bool(shapes), path, "empty model, domains or layers")
    _need(bool(arrays), path, "no arrays file")

    n_dom = len(domains)
    tok = np.array([d.tokens for d in domains], dtype=np.int64)
    layers: list[LayerProfile] = []
    for i, (e, k, layer_index) in enumerate(shapes):
        get = arrays.get
        counts, mass, ent = get(f"layer{i}.counts"), get(f"layer{i}.gate_mass"), get(f"layer{i}.token_entropy_sum")
        _need(counts is not None and mass is not None and ent is not None, path, f"layer {i} arrays missing")
        _need(counts.shape == (n_dom, e) and counts.dtype == np.int64, path, f"layer {i} counts shape/dtype")
        _need(mass.shape == (n_dom, e) and ent.shape == (n_dom,), path, f"layer {i} gate_mass/entropy shape")
        _need(
            (counts >= 0).all() and np.array_equal(counts.sum(axis=1), tok * k),
            path,
            f"layer {i} counts do not sum to tokens x top_k",
        )
        cosel = get(f"layer{i}.cosel")
        _need(cosel is not None and cosel.shape == (n_dom, e, e), path, f"layer {i} co-selection shape")
        _need(
            np.array_equal(np.diagonal(cosel, axis1=1, axis2=2), counts)
            and np.array_equal(cosel.sum(axis=2), counts * k)
            and np.array_equal(cosel, cosel.transpose(0, 2, 1)),
            path,
            f"layer {i} co-selection is inconsistent with the counts",
        )
        coact = get(f"layer{i}.coact")
        if i + 1 < len(shapes):
            e_next, k_next, _ = shapes[i + 1]
            _need(coact is not None and coact.shape == (n_dom, e, e_next), path, f"layer {i} co-activation shape")
            _need(
                np.array_equal(coact.sum(axis=2), counts * k_next),
                path,
                f"layer {i} co-activation rows do not sum to count x next top_k",
            )
        else:
            _need(coact is None, path, "co-activation stored for the last layer")
        layers.append(LayerProfile(i, layer_index, e, k, counts, mass, ent, cosel, coact))
    return RoutingProfile(
        model=model,
        domains=domains,
        layers=layers,
        seq_len=seq_len,
        batch_size=batch_size,
        dtype=dtype,
        exq_version=str(h.get("exq_version")),
        schema_version=int(h["schema_version"]),
    )
