"""A slot KV cache: one preallocated row per running sequence, so a decode step batches sequences of any lengths.

transformers' own caches hold one length for the whole batch. Here every layer keeps keys/values as
[slots, heads, max_len, dim]; sequence i lives in row i at positions [0, length_i). The engine keeps the running
sequences in rows 0..n-1 (a finished one is replaced by the last, one copy), so a step's attention reads the view
[:n, :, :max_length] without gathering, and the per-row padding is masked out by the engine's 4-D mask.

Works with any model whose attention calls `past_key_values.update(k, v, layer_idx)` with [batch, heads, q, dim]
tensors (all transformers MoE LMs exq supports, MLA included: keys and values may have different widths).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from exq.errors import ExqError


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot; allocated at the first write (shapes come from the model)."""

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, length = self.owner.slots, self.owner.max_len
        try:
            self.keys = key_states.new_zeros(slots, key_states.shape[1], length, key_states.shape[3])
            self.values = value_states.new_zeros(slots, value_states.shape[1], length, value_states.shape[3])
        except torch.OutOfMemoryError as e:
            per_layer = slots * length * (key_states[0, :, 0].numel() + value_states[0, :, 0].numel())
            raise ExqError(
                f"the KV cache ({slots} slots x {length} tokens, {per_layer * key_states.element_size() / 2**20:.0f}"
                f" MiB per layer) does not fit on {key_states.device}",
                "lower --max-batch or --max-model-len",
            ) from e
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        rows = slice(o.row0, o.row0 + key_states.shape[0])
        if o.write_pos is not None:  # decode: row b writes its one new token at its own position
            idx = torch.arange(rows.start, rows.stop, device=key_states.device)
            self.keys[idx, :, o.write_pos] = key_states[:, :, 0]
            self.values[idx, :, o.write_pos] = value_states[:, :, 0]
        else:  # prefill: every row writes from position 0 (padding past a row's length is masked, then overwritten)
            q = key_states.shape[2]
            self.keys[rows, :, :q] = key_states
            self.values[rows, :, :q] = value_states
        return self.keys[rows, :, : o.view_len], self.values[rows, :, : o.view_len]

    def move_row(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.view_len, 0

    def get_seq_length(self) -> int:
        return self.owner.view_len

    def get_max_length(self) -> int:
        return self.owner.max_len

    def nbytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.nbytes + self.values.nbytes


class SlotCache(Cache):
    """The cache of a whole model; the engine sets which rows a forward covers and where it writes before each call."""

    def __init__(self, num_layers: int, slots: int, max_len: int) -> None:
        if slots < 1 or max_len < 2:
            raise ExqError(f"a KV cache of {slots} slots x {max_len} tokens", "use at least 1 slot and 2 tokens")
        self.slots, self.max_len = slots, max_len
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.row0 = 0
        self.view_len = 0
        self.write_pos: torch.Tensor | None = None

    def prepare(self, row0: int, view_len: int, write_pos: torch.Tensor | None) -> None:
        """Next forward covers rows [row0, row0 + batch), reads positions [0, view_len); decode writes at write_pos."""
        if view_len > self.max_len:
            raise ExqError(f"a sequence of {view_len} tokens does not fit the KV cache ({self.max_len})")
        self.row0, self.view_len, self.write_pos = row0, view_len, write_pos

    def move_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.layers:
            layer.move_row(src, dst, length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
