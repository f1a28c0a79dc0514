"""Run calibration tokens through a model and count what every router chose.

A forward hook on each router reads the (logits, weights, expert ids) the router itself returned, so the counts are the
model's real decisions, never a re-derivation. All statistics accumulate on the model's device by scatter-add: no
per-token Python, no host sync until the end.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from exq.data.corpus import Domain, load_domains, split_tokens
from exq.errors import ExqError
from exq.fileio import sha256_file
from exq.models import MoELayer, fingerprint, load_model, load_tokenizer, moe_layers
from exq.models.base import Adapter
from exq.models.loading import context_len
from exq.profiling.routing_profile import DomainInfo, LayerProfile, RoutingProfile

log = logging.getLogger(__name__)


class _RouterTap:
    """Accumulates one layer's statistics from its router's outputs, one row per domain."""

    def __init__(self, layers: list[MoELayer], n_domains: int, device: torch.device) -> None:
        self.layers = layers
        self.domain = 0
        self.counts = [torch.zeros(n_domains, m.num_experts, dtype=torch.long, device=device) for m in layers]
        self.mass = [torch.zeros(n_domains, m.num_experts, dtype=torch.float64, device=device) for m in layers]
        self.entropy = [torch.zeros(n_domains, dtype=torch.float64, device=device) for _ in layers]
        self.cosel = [torch.zeros(n_domains, m.num_experts**2, dtype=torch.long, device=device) for m in layers]
        self.coact = [
            torch.zeros(n_domains, a.num_experts * b.num_experts, dtype=torch.long, device=device)
            for a, b in itertools.pairwise(layers)
        ]
        self._prev_ids: torch.Tensor | None = None

    def set_domain(self, d: int) -> None:
        self.domain = d

    def start_batch(self) -> None:
        self._prev_ids = None

    def observe(self, i: int, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
        layer, d = self.layers[i], self.domain
        e, k = layer.num_experts, layer.top_k
        ids = ids.reshape(-1, k)
        flat = ids.reshape(-1)
        # index_add_, not bincount: CUDA's bincount reads the max id back to the host, a sync per call.
        self.counts[i][d].index_add_(0, flat, torch.ones_like(flat))
        self.mass[i][d].index_add_(0, flat, weights.reshape(-1).to(torch.float64))
        same = (ids[:, :, None] * e + ids[:, None, :]).reshape(-1)
        self.cosel[i][d].index_add_(0, same, torch.ones_like(same))
        p = layer.rule.probabilities(logits.reshape(-1, e))
        self.entropy[i][d] -= torch.special.xlogy(p, p).sum(dtype=torch.float64)
        if i > 0 and self._prev_ids is not None:
            pairs = (self._prev_ids[:, :, None] * e + ids[:, None, :]).reshape(-1)
            self.coact[i - 1][d].index_add_(0, pairs, torch.ones_like(pairs))
        self._prev_ids = ids

    def layer_profiles(self) -> list[LayerProfile]:
        out = []
        for i, m in enumerate(self.layers):
            coact = None
            if i + 1 < len(self.layers):
                coact = self.coact[i].cpu().numpy().reshape(-1, m.num_experts, self.layers[i + 1].num_experts)
            out.append(
                LayerProfile(
                    index=i,
                    layer_index=m.layer_index,
                    num_experts=m.num_experts,
                    top_k=m.top_k,
                    counts=self.counts[i].cpu().numpy().astype(np.int64),
                    gate_mass=self.mass[i].cpu().numpy(),
                    token_entropy_sum=self.entropy[i].cpu().numpy(),
                    cosel=self.cosel[i].cpu().numpy().reshape(-1, m.num_experts, m.num_experts),
                    coact=coact,
                )
            )
        return out


@contextmanager
def _tapped(layers: list[MoELayer], observe):
    """Call observe(i, logits, weights, ids) with every router's own output while the block runs."""

    def make_hook(i: int):
        def hook(module: nn.Module, args, output) -> None:
            observe(i, *Adapter.unpack_router_output(output))

        return hook

    handles = [m.router.register_forward_hook(make_hook(i)) for i, m in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(
    model: nn.Module,
    domains: Sequence[Domain],
    seq_len: int,
    batch_size: int,
    progress: bool,
    observe,
    start_domain=None,
    start_batch=None,
) -> list[MoELayer]:
    """Forward every domain's tokens through the decoder with the router taps on."""
    _check_int("seq_len", seq_len)
    _check_int("batch_size", batch_size)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ExqError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_pos})")
    layers = moe_layers(model)
    device = next(model.parameters()).device
    decoder = getattr(model, "model", model)  # the decoder stack: routing never needs the LM head
    vocab = model.config.vocab_size
    total = sum(d.tokens.numel() for d in domains)
    with (
        _tapped(layers, observe),
        torch.inference_mode(),
        tqdm(total=total, unit="tok", desc="profile", disable=not progress, dynamic_ncols=True) as bar,
    ):
        for di, dom in enumerate(domains):
            if dom.tokens.numel() and (int(dom.tokens.max()) >= vocab or int(dom.tokens.min()) < 0):
                raise ExqError(
                    f"domain {dom.name} has token ids outside the model's vocabulary (0..{vocab - 1})",
                    "use the model's own tokenizer",
                )
            if start_domain:
                start_domain(di)
            for batch in split_tokens(dom.tokens, seq_len, batch_size):
                if start_batch:
                    start_batch()
                decoder(input_ids=batch.to(device), use_cache=False)
                bar.update(batch.numel())
    return layers


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExqError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def profile_domains(
    model: nn.Module,
    domains: Sequence[Domain],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    progress: bool = True,
) -> RoutingProfile:
    """Profile already-tokenized domains on a loaded model."""
    layers = moe_layers(model)
    tap = _RouterTap(layers, len(domains), next(model.parameters()).device)
    _run(
        model,
        domains,
        seq_len,
        batch_size,
        progress,
        tap.observe,
        start_domain=tap.set_domain,
        start_batch=tap.start_batch,
    )
    return RoutingProfile(
        model=fingerprint(model, layers),
        domains=[
            DomainInfo(
                name=d.name,
                file=str(d.path) if d.path is not None else "",
                sha256=sha256_file(d.path) if d.path is not None and d.path.is_file() else "",
                tokens=int(d.tokens.numel()),
            )
            for d in domains
        ],
        layers=tap.layer_profiles(),
        seq_len=seq_len,
        batch_size=batch_size,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


def trace_routing(
    model: nn.Module, domains: Sequence[Domain], *, seq_len: int = 512, batch_size: int = 8, progress: bool = False
) -> list[np.ndarray]:
    """Every token's chosen experts: one [T, k] array per MoE layer (tokens of all domains, in order).

    For evaluating routing predictions (prefetch) on held-out text; a profile keeps only counts.
    """
    chunks: dict[int, list[torch.Tensor]] = {}

    def observe(i: int, logits, weights, ids) -> None:
        chunks.setdefault(i, []).append(ids.reshape(-1, ids.shape[-1]))

    layers = _run(model, domains, seq_len, batch_size, progress, observe)
    return [torch.cat(chunks[i]).cpu().numpy().astype(np.int64) for i in range(len(layers))]


def profile(
    model: str | Path | nn.Module,
    corpus: str | Path | Sequence[str | Path] | Mapping[str, torch.Tensor],
    tokens: int | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int = 8,
    tokenizer=None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    progress: bool = True,
) -> RoutingProfile:
    """Profile a model's routing on calibration text.

    model: a checkpoint folder (or hub id), or a loaded transformers MoE model.
    corpus: text file(s) (plain or .gz), one domain each, or a mapping of domain name -> token ids.
    tokens: total tokens to run for text files, split evenly over them (required for files).
    seq_len: tokens per sequence; default 512, or the model's context if shorter.
    """
    if isinstance(model, (str, Path)):
        model_path = model
        model = load_model(model_path, dtype=dtype, device=device)
        tokenizer = tokenizer or (None if isinstance(corpus, Mapping) else load_tokenizer(model_path))
    if isinstance(corpus, Mapping):
        domains = [
            Domain(name=str(k), path=None, tokens=torch.as_tensor(v, dtype=torch.long).reshape(-1))
            for k, v in corpus.items()
        ]
        if not domains or any(d.tokens.numel() == 0 for d in domains):
            raise ExqError("every domain needs at least one token")
    else:
        if tokens is None:
            raise ExqError("tokens is required when profiling text files", "e.g. tokens=20000")
        if tokenizer is None:
            raise ExqError("a tokenizer is needed to profile text files with an already-loaded model")
        paths = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
        domains = load_domains(paths, tokenizer, tokens)
    log.info("profiling %d tokens over %d domain(s)", sum(d.tokens.numel() for d in domains), len(domains))
    seq_len = context_len(model, seq_len, 512)
    return profile_domains(model, domains, seq_len=seq_len, batch_size=batch_size, progress=progress)
