"""Prometheus metrics of the server, on a registry of its own (tests start several servers).

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` histograms); the alert
rules in ``deploy/prometheus/`` refer to them, so keep them stable.

Several front ends on one port (``serve/frontends.py``) use prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR`` set): every process writes its values to files there and
any one renders them all, counters and histograms summed, gauges summed over the live
processes (the loop lag: their maximum). A model version that is no longer served shows 0
there instead of disappearing.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# request latency buckets in seconds: dense around the 20 ms (premium) and 50 ms (p99) objectives
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)


class ServerMetrics:
    """Every metric the server exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry
        self.requests = Counter("nimbleml_requests_total", "Requests by route, tier and status code",
                                ["route", "tier", "status"], registry=r)
        self.latency = Histogram("nimbleml_request_latency_seconds", "Request latency by route and tier",
                                 ["route", "tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("nimbleml_batch_size", "Requests per batch sent to a worker", ["graph"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("nimbleml_queue_depth", "Requests waiting in the batch queues", registry=r,
                                 multiprocess_mode="livesum")
        self.loop_lag = Gauge("nimbleml_event_loop_lag_ms", "Front end event-loop lag (average), milliseconds",
                              registry=r, multiprocess_mode="livemax")
        self.inflight_batches = Gauge("nimbleml_inflight_batches", "Batches running in workers", registry=r,
                                      multiprocess_mode="livesum")
        self.workers_ready = Gauge("nimbleml_workers_ready", "Worker processes ready for traffic (or front ends "
                                   "running their model in process)", registry=r, multiprocess_mode="livesum")
        self.worker_restarts = Counter("nimbleml_worker_restarts_total", "Worker processes restarted after a crash",
                                       registry=r)
        self.shed = Counter("nimbleml_shed_total", "Requests refused by the limiter", ["tier", "reason"], registry=r)
        self.model_version = Gauge("nimbleml_model_version_info", "Loaded model versions (1) and their role",
                                   ["version", "role"], registry=r, multiprocess_mode="livemax")
        self._version_labels: list[tuple[str, str]] = []
        self.recommend_path = Counter("nimbleml_recommend_path_total",
                                      "Recommend answers by path: cached user state or full forward", ["path"],
                                      registry=r)
        self.state_updates = Counter("nimbleml_state_updates_total", "User states recomputed after an Ingest",
                                     ["status"], registry=r)
        self.risk_breach = Counter("nimbleml_risk_breach_total",
                                   "Served volatility forecasts above the asset's configured limit", ["asset"],
                                   registry=r)
        self.store_errors = Counter("nimbleml_history_store_errors_total", "History store calls that failed",
                                    registry=r)
        self.history_evictions = Counter("nimbleml_history_evictions_total",
                                         "Users dropped from the full in-process history store (least recently used)",
                                         registry=r)

    def set_versions(self, stable: str, candidate: str | None) -> None:
        if self.multiprocess:  # the files keep every series: zero the old ones
            for labels in self._version_labels:
                self.model_version.labels(*labels).set(0)
        else:
            self.model_version.clear()
        self._version_labels = [(stable, "stable")] + ([(candidate, "candidate")] if candidate else [])
        for labels in self._version_labels:
            self.model_version.labels(*labels).set(1)

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
