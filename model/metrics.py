"""The worker's Prometheus metrics, in a registry of the app's own (two apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from model.generation import Completion

__all__ = ["CONTENT_TYPE_LATEST", "WorkerMetrics"]

# Seconds: a short answer on a GPU takes well under a second, a long one on a CPU most of a minute.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class WorkerMetrics:
    """Requests, latency, tokens, batch sizes, queue depth and the adapter served."""

    def __init__(self, *, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "smolcord_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "smolcord_request_latency_seconds",
            "Chat completion latency, arrival to last byte",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "smolcord_prompt_tokens", "Prompt tokens of the requests generated for", registry=self.registry
        )
        self.completion_tokens = Counter(
            "smolcord_completion_tokens",
            "Tokens generated, for cancelled requests too",
            registry=self.registry,
        )
        self.finished = Counter(
            "smolcord_completions_finished",
            "Completions by finish reason (stop, length, cancelled, timeout)",
            ["reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "smolcord_batch_size",
            "Requests per batch: a generate call (static scheduler) or a decode loop's busy period (continuous)",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "smolcord_batch_seconds",
            "Duration of those batches",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "smolcord_queue_depth", "Requests waiting for a batch", registry=self.registry
        )
        self.queue_depth.set_function(queue_depth)
        self.in_flight = Gauge("smolcord_in_flight", "Requests being generated", registry=self.registry)
        self.in_flight.set_function(in_flight)
        self.adapter = Info(
            "smolcord_adapter", "The adapter served (version 'base' for none)", registry=self.registry
        )
        self.adapter.info({"version": "base"})

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_completion(self, completion: Completion) -> None:
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.completion_tokens.inc(completion.completion_tokens)
        self.finished.labels(reason=completion.finish_reason).inc()

    def set_adapter(self, version: str | None) -> None:
        self.adapter.info({"version": version or "base"})

    def render(self) -> bytes:
        return generate_latest(self.registry)
