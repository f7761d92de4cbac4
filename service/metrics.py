"""Prometheus metrics, one registry per app so tests can build many apps in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.edits = Counter("horen_edits_total", "Edits committed by this process", registry=r)
        self.rollbacks = Counter("horen_rollbacks_total", "Rollbacks committed by this process", registry=r)
        self.generates = Counter("horen_generate_requests_total", "Generate requests answered", registry=r)
        self.streams_stopped = Counter(
            "horen_generate_streams_stopped_total", "Answers stopped early because their client left", registry=r
        )
        self.rejected = Counter("horen_rejected_total", "Requests refused because the queue was full", registry=r)
        self.generate_latency = Histogram(
            "horen_generate_latency_seconds", "Queue + batch time of /generate", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.edit_latency = Histogram(
            "horen_edit_latency_seconds", "Train + commit time of one edit", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.generate_batch = Histogram(
            "horen_generate_batch_size", "Rows per generate batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.codebook_size = Gauge("horen_codebook_entries", "Entries in the in-memory codebook", registry=r)
        self.queue_depth = Gauge("horen_queue_depth", "Jobs waiting for the engine", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
