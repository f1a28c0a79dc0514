"""The generation engine: continuous batching over a slot KV cache, on one background thread.

Each step (1) admits waiting requests into free slots and prefills them together (right-padded, one forward), then
(2) runs one decode forward for every running sequence, whatever its length. A request joins the batch at the next
step and leaves it the step it finishes, so throughput grows with concurrency while each sequence computes exactly
what it would alone (its own positions, its own mask). HTTP handlers talk to the engine through `submit` / `cancel`
and receive `Event`s through a callback (they hop back to the event loop themselves).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from exq.errors import ExqError
from exq.serve.detok import TextStream
from exq.serve.kv_cache import SlotCache
from exq.serve.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


class QueueFull(ExqError):
    pass


class ShuttingDown(ExqError):
    pass


@dataclass
class Event:
    """Text released since the last event; a final event carries finish_reason (or error) and the token counts."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the KV cache
    cancelled: bool = False
    first_token_at: float | None = None
    stream: TextStream | None = None
    generator: torch.Generator | None = None


@dataclass
class EngineStats:
    """Counters the metrics endpoint reads; `on_*` hooks are set by the server."""

    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    on_first_token: Callable[[float], None] | None = None
    on_finish: Callable[[Request, str], None] | None = None


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 32,
        max_model_len: int = 2048,
        max_queue: int = 256,
        max_prefill_tokens: int = 8192,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        if self.decoder is None or self.lm_head is None:
            raise ExqError(f"{type(model).__name__} has no decoder / output embeddings: not a causal LM")
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            model.set_attn_implementation("sdpa")
            impl = "sdpa"
        self.additive_mask = impl == "eager"
        self.device = next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.max_queue, self.max_prefill_tokens = max_queue, max(max_prefill_tokens, max_model_len)
        self.cache = SlotCache(model.config.num_hidden_layers, max_batch, max_model_len)
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = self.eos[0] if self.eos else 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # running[i] owns cache row i
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self.graphs = None  # DecodeGraphs once warmup() captured them
        self._stop = False
        self._open = False
        self._thread: threading.Thread | None = None

    # ---- called from other threads -------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop on a background thread (tests, notebooks). `exq serve` runs it on the main thread instead:
        OpenMP runs torch's small CPU ops ~3x slower from a second thread (measured on 2 cores)."""
        self.open()
        self._thread = threading.Thread(target=self.run, name="exq-engine", daemon=True)
        self._thread.start()

    def open(self) -> None:
        """Accept requests from now on (they wait in the queue until the loop runs)."""
        self._open = True

    def run(self) -> None:
        """The engine loop, in the calling thread, until `stop`."""
        self.open()
        with torch.inference_mode():
            self._loop()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._open and not self._stop

    def submit(self, req: Request) -> None:
        with self._cv:
            if self._stop:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting", "retry later")
            if req.params.seed is not None:
                req.generator = torch.Generator().manual_seed(req.params.seed)
            req.stream = TextStream(self.tokenizer, req.params.stop)
            self.waiting.append(req)
            self._cv.notify_all()

    def cancel(self, req: Request) -> None:
        """Frees the request's slot at the next step (a client that went away)."""
        req.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def running_count(self) -> int:
        return len(self.running)

    def warmup(self, graphs: bool = True) -> int:
        """Before serving, on a GPU: run every token count the kernels are planned for (powers of two, prefill-shaped
        up to the prefill budget, decode-shaped up to max_batch) so Triton compiles now rather than inside a
        request's latency, then capture the decode step in CUDA graphs (`graphs`). Returns the shapes run."""
        if self.device.type != "cuda":
            return 0
        dev, length = self.device, self.max_model_len
        top = min(self.max_prefill_tokens, self.max_batch * length)
        shapes = 0
        with torch.inference_mode():
            for t in (1 << i for i in range(1, top.bit_length()) if 1 << i <= top):
                p = min(t, length)
                rows = t // p
                pos = torch.arange(p, device=dev)
                mask = (pos[:, None] >= pos[None, :])[None, None].expand(rows, 1, p, p)
                self.cache.prepare(0, p, None)
                self._forward(torch.zeros(rows, p, dtype=torch.long, device=dev), pos.expand(rows, p), mask)
                shapes += 1
            for n in (1 << i for i in range(self.max_batch.bit_length())):
                self.cache.prepare(0, 2, torch.ones(n, dtype=torch.long, device=dev))
                ones = torch.ones(n, 1, dtype=torch.long, device=dev)
                self._forward(ones - 1, ones, torch.ones(n, 1, 1, 2, dtype=torch.bool, device=dev))
                shapes += 1
            torch.cuda.synchronize(dev)
        if graphs:
            from exq.serve.graphs import DecodeGraphs

            g = DecodeGraphs(self)
            if g.capture():
                self.graphs = g
                shapes += len(g.buckets)
        return shapes

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running:
                    self._cv.wait()
                if self._stop:
                    break
                admitted = self._admit()
            try:
                if admitted:
                    self._prefill(admitted)
                if self.running:
                    self._decode()
                self.stats.steps += 1
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for r in admitted + self.running:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self.running = []
        for r in list(self.waiting) + self.running:
            self._finish(r, "error", error="the server shut down before this request finished")

    def _admit(self) -> list[Request]:
        """Waiting requests that fit the free slots and the prefill token budget (at least one, when a slot is free)."""
        out: list[Request] = []
        while self.waiting and len(self.running) + len(out) < self.max_batch:
            r = self.waiting[0]
            if r.cancelled:
                self.waiting.popleft()
                continue
            longest = max([len(x.prompt_ids) for x in out] + [len(r.prompt_ids)])
            if out and longest * (len(out) + 1) > self.max_prefill_tokens:
                break
            out.append(self.waiting.popleft())
        return out

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [B, 1, q, kv] (True = attend) in the form the model's attention takes."""
        if not self.additive_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min
        )

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(
            input_ids=ids,
            attention_mask=self._mask(mask),
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _prefill(self, batch: list[Request]) -> None:
        row0, lengths = len(self.running), [len(r.prompt_ids) for r in batch]
        p = max(lengths)
        ids = torch.full((len(batch), p), self.pad_id, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, : lengths[b]] = torch.tensor(r.prompt_ids)
        dev = self.device
        pos = torch.arange(p, device=dev)
        lens = torch.tensor(lengths, device=dev)
        allowed = (pos[None, :, None] >= pos[None, None, :]) & (pos[None, None, :] < lens[:, None, None])
        self.cache.prepare(row0, p, None)
        hidden = self._forward(ids.to(dev), pos.expand(len(batch), p), allowed[:, None])
        last = hidden[torch.arange(len(batch), device=dev), lens - 1]
        tokens = sample(self.lm_head(last), [r.params for r in batch], [r.generator for r in batch])
        self.running.extend(batch)
        for r, n in zip(batch, lengths, strict=True):
            r.length = n
            self.stats.prompt_tokens += n
        self._accept(list(zip(batch, tokens, strict=True)))

    def _decode(self) -> None:
        running = list(self.running)
        lengths = [r.length for r in running]
        last = [r.output_ids[-1] for r in running]
        logits = self.graphs.run(last, lengths) if self.graphs else None
        if logits is None:
            logits = self.eager_step(last, lengths)
        tokens = sample(logits, [r.params for r in running], [r.generator for r in running])
        for r in running:
            r.length += 1
        self._accept(list(zip(running, tokens, strict=True)))

    def eager_step(self, last: list[int], lengths: list[int]) -> torch.Tensor:
        """Logits [n, V] of one decode step for rows 0..n-1, attending over exactly the longest row's length."""
        dev = self.device
        lens = torch.tensor(lengths, device=dev)
        view = max(lengths) + 1
        allowed = torch.arange(view, device=dev)[None, :] <= lens[:, None]
        self.cache.prepare(0, view, lens)
        ids = torch.tensor(last, device=dev)[:, None]
        return self.lm_head(self._forward(ids, lens[:, None], allowed[:, None, None, :])[:, -1])

    def _accept(self, pairs: list[tuple[Request, int]]) -> None:
        """Hand each request its new token; finished and cancelled ones leave the batch."""
        now = time.perf_counter()
        done: list[Request] = []
        for r, tok in pairs:
            if r.cancelled:
                done.append(r)
                self._finish(r, "cancelled")
                continue
            if r.first_token_at is None:
                r.first_token_at = now
                if self.stats.on_first_token:
                    self.stats.on_first_token(now - r.arrived)
            reason = None
            if tok in self.eos and not r.params.ignore_eos:
                reason = "stop"
            else:
                r.output_ids.append(tok)
                self.stats.generated_tokens += 1
                text = r.stream.add(tok)
                if r.stream.stopped:
                    reason = "stop"
                elif len(r.output_ids) >= r.params.max_tokens or r.length + 1 >= self.max_model_len:
                    reason = "length"
                r.sink(Event(text=text, token_ids=[tok]))
            if reason is not None:
                done.append(r)
                self._finish(r, reason)
        for r in done:
            self._release(r)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.cancelled and error is None:
            reason = "cancelled"
        tail = r.stream.flush() if (r.stream is not None and error is None and not r.cancelled) else ""
        r.sink(
            Event(
                text=tail,
                finish_reason=reason,
                error=error,
                prompt_tokens=len(r.prompt_ids),
                completion_tokens=len(r.output_ids),
            )
        )
        if self.stats.on_finish:
            self.stats.on_finish(r, reason)

    def _release(self, r: Request) -> None:
        """Free r's cache row: the last running sequence moves into it, keeping rows 0..n-1 dense."""
        i = next((i for i, x in enumerate(self.running) if x is r), None)
        if i is None:
            return
        last = self.running[-1]
        if last is not r:
            self.cache.move_row(len(self.running) - 1, i, last.length)
            self.running[i] = last
        self.running.pop()


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """End-of-sequence ids from the generation config (may be a list) and the tokenizer."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for x in v if isinstance(v, list | tuple) else [v]:
            if x is not None and int(x) not in ids:
                ids.append(int(x))
    return ids
