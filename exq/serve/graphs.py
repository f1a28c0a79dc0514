"""CUDA graphs for the decode step: one per batch-size bucket, replayed instead of re-launching every kernel.

A small MoE model's decode step is hundreds of short kernels; launched one by one from Python they cost ~10 ms per
step on an H100 whatever the batch (measured: ~60-80 tok/s at one sequence). Replaying a captured graph removes that.
The graph reads its inputs from fixed buffers (token ids, positions, write positions, mask) and attends over the
whole cache length, with rows past the running batch padded; the slot cache is already static, and exq's fused MoE op
never syncs with the host, so the whole forward + lm_head captures. A model whose step cannot be captured (a torch-path
layer that syncs, say) simply keeps the eager step.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class DecodeGraphs:
    """capture=False keeps the buckets, buffers and padding but runs each step eagerly (the same inputs a graph
    replays: this is how the CPU tests check the padded, full-length step against plain decoding)."""

    def __init__(self, engine, capture: bool = True) -> None:
        self.engine, self.use_graphs = engine, capture
        e = engine
        self.length = e.max_model_len
        self.buckets = sorted(
            {1 << i for i in range(e.max_batch.bit_length()) if 1 << i <= e.max_batch} | {e.max_batch}
        )
        top, dev = self.buckets[-1], e.device
        self.ids = torch.zeros(top, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(top, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(top, 1, 1, self.length, dtype=torch.bool, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.pool = None

    def _step(self, bs: int) -> torch.Tensor:
        e = self.engine
        e.cache.prepare(0, self.length, self.pos[:bs, 0])
        hidden = e._forward(self.ids[:bs], self.pos[:bs], self.mask[:bs])
        return e.lm_head(hidden[:, -1])

    def capture(self) -> bool:
        """Capture every bucket; False (and no graphs) if the model's step cannot be captured."""
        self.mask[:, :, :, 0] = True
        if not self.use_graphs:
            self.graphs = {bs: (None, None) for bs in self.buckets}
            return True
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for bs in self.buckets:  # eager once first: lazy allocations and kernel compilation
                        self._step(bs)
                torch.cuda.current_stream().wait_stream(side)
                for bs in reversed(self.buckets):  # largest first, so the smaller ones reuse its pool memory
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool):
                        out = self._step(bs)
                    self.pool = g.pool()
                    self.graphs[bs] = (g, out)
            torch.cuda.synchronize()
        except Exception as exc:  # any capture failure means: run eagerly
            log.warning("decode steps run without CUDA graphs: %s", exc)
            self.graphs.clear()
            return False
        return True

    def run(self, ids: list[int], lens: list[int]) -> torch.Tensor | None:
        """Logits [n, V] of one decode step for n running rows, or None when n exceeds the largest bucket."""
        n = len(ids)
        bs = next((b for b in self.buckets if b >= n), None)
        if bs is None or bs not in self.graphs:
            return None
        dev = self.ids.device
        self.ids[:bs].zero_()
        self.pos[:bs].zero_()
        self.ids[:n, 0] = torch.tensor(ids, device=dev)
        lens_t = torch.tensor(lens, device=dev)
        self.pos[:n, 0] = lens_t
        self.mask[:bs] = False
        self.mask[:bs, 0, 0, 0] = True  # padded rows attend to one position: finite, and never read
        self.mask[:n, 0, 0] = torch.arange(self.length, device=dev)[None, :] <= lens_t[:, None]
        g, out = self.graphs[bs]
        if g is None:
            with torch.inference_mode():
                return self._step(bs)[:n]
        g.replay()
        return out[:n]
