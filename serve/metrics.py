"""The server's Prometheus metrics; the scheduler's come from the backend's health()."""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom

from engine import Health

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app). health: the
    backend's (serve.backend); inflight: a callable giving the prompts in the server (waiting or
    generating)."""

    def __init__(self, health: Callable[[], Health], inflight: Callable[[], int]):
        self.health = health
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "stairs_requests", "completion requests by outcome (HTTP status; 499: client left)",
            ["status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = prom.Counter(
            "stairs_prompt_tokens", "prompt tokens of served requests", registry=r
        )
        self.completion_tokens = prom.Counter(
            "stairs_completion_tokens", "tokens generated for served requests", registry=r
        )
        self.drafted = prom.Counter("stairs_draft_tokens", "draft tokens proposed", registry=r)
        self.accepted = prom.Counter("stairs_accepted_tokens", "draft tokens accepted", registry=r)
        self.acceptance = prom.Histogram(
            "stairs_acceptance_rate", "acceptance rate per prompt (drafting strategies)",
            buckets=[i / 10 for i in range(11)], registry=r,
        )  # fmt: skip
        self.main_calls = prom.Counter("stairs_main_calls", "main decoder calls", registry=r)
        self.rows = prom.Histogram(
            "stairs_rows_per_main_call", "requests sharing one main decoder call",
            buckets=ROW_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = prom.Histogram(
            "stairs_time_to_first_token_seconds", "from request received to first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = prom.Histogram(
            "stairs_time_per_output_token_seconds", "mean time between tokens, per prompt",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = prom.Histogram(
            "stairs_request_duration_seconds", "whole request", buckets=LATENCY_BUCKETS, registry=r
        )
        queue = prom.Gauge(
            "stairs_queue_depth", "prompts in the server (waiting or generating)", registry=r
        )
        queue.set_function(inflight)
        self.active = prom.Gauge(
            "stairs_scheduler_active", "requests in the main batch", registry=r
        )
        self.waiting = prom.Gauge(
            "stairs_scheduler_waiting", "requests not yet admitted", registry=r
        )
        self.closed = prom.Counter(
            "stairs_connections_closed", "connections closed before a request (idle_timeout:"
            " no byte; header_timeout: headers too slow; evicted: the oldest idle past the limit)",
            ["reason"], registry=r,
        )  # fmt: skip
        self._seen = 0

    def count_closed(self, reason: str) -> None:
        """One connection closed by serve.connections for reason."""
        self.closed.labels(reason).inc()

    def scrape(self) -> bytes:
        """Prometheus text; first the scheduler's state is read (health()) and the main calls
        made since the last scrape are observed (those still among its recent calls)."""
        h = self.health()
        self.active.set(h.active)
        self.waiting.set(h.waiting)
        recent = h.recent_calls
        new = max(h.main_calls - self._seen, 0)
        self._seen = h.main_calls
        for rows, _tokens in recent[len(recent) - min(new, len(recent)) :] if new else ():
            self.rows.observe(rows)
        self.main_calls.inc(new)
        return prom.generate_latest(self.registry)
