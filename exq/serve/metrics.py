"""Prometheus metrics of one server (its own registry, so several servers in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "exq_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("exq_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("exq_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("exq_finished_requests", "generations finished, by reason", ["reason"], registry=r)
        queue = Gauge("exq_queue_depth", "requests waiting for a slot", registry=r)
        queue.set_function(engine.queue_depth)
        running = Gauge("exq_running_requests", "requests in the running batch", registry=r)
        running.set_function(engine.running_count)
        self.ttft = Histogram(
            "exq_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "exq_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "exq_time_per_output_token_seconds",
            "mean time between output tokens of a request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        engine.stats.on_first_token = self.ttft.observe
        engine.stats.on_finish = self._on_finish

    def _on_finish(self, req, reason: str) -> None:
        import time

        now = time.perf_counter()
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(len(req.prompt_ids) if req.first_token_at is not None else 0)
        self.generation_tokens.inc(len(req.output_ids))
        self.latency.observe(now - req.arrived)
        if req.first_token_at is not None and len(req.output_ids) > 1:
            self.tpot.observe((now - req.first_token_at) / (len(req.output_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
