"""The server's Prometheus metrics, kept by the official client in a registry of each app's own.

Request counts and latencies are recorded by the server as responses finish; queue, batch and cache
figures are read from the engine and the feature cache when scraped, so they are never stale.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from functools import partial

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from videollava.infer.engine import Engine
from videollava.infer.pipeline import FeatureCache
from videollava.infer.request import Completion

# Each counter and histogram is exposed alone, without the `_created` timestamp series that would
# double the series a scrape returns and that no dashboard of this server reads.
disable_created_metrics()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW_SECONDS = 60.0


class ServerMetrics:
    """What the server counts, in a registry of its own: several apps in one process never collide."""

    CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # of `exposition()`

    def __init__(self, engine: Engine | None = None, feature_cache: FeatureCache | None = None) -> None:
        self.registry = CollectorRegistry()
        counter = partial(Counter, registry=self.registry)
        latency = partial(Histogram, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = counter(
            "videollava_http_requests",
            "HTTP requests answered, by endpoint and status code (499: the client left first).",
            ["endpoint", "status"],
        )
        self.completions = counter(
            "videollava_completions", "Generations finished, by finish reason.", ["finish_reason"]
        )
        self.cancelled = counter(
            "videollava_requests_cancelled",
            "Requests stopped because their client went away, by the stage they were in "
            "(fetch, read, prepare, generate).",
            ["stage"],
        )
        self.latency = latency(
            "videollava_request_latency_seconds", "Seconds from engine submission to the last token."
        )
        self.first_token = latency(
            "videollava_time_to_first_token_seconds", "Seconds from engine submission to the first token."
        )
        self.completion_tokens = counter(
            "videollava_completion_tokens", "Tokens generated for HTTP requests."
        )
        self.prompt_tokens = counter(
            "videollava_prompt_tokens", "Prompt tokens (visual ones included) of HTTP requests."
        )
        self.visual_tokens = counter("videollava_visual_tokens", "Visual tokens of HTTP requests.")
        self.prefix_hits = counter(
            "videollava_request_prefix_cache_hits", "HTTP requests whose prompt reused cached keys/values."
        )
        self.reused_prefix_tokens = counter(
            "videollava_request_reused_prefix_tokens",
            "Prompt positions of HTTP requests not recomputed thanks to the prefix cache.",
        )
        Gauge(
            "videollava_tokens_per_second",
            f"Completion tokens per second over the last {RATE_WINDOW_SECONDS:g} s.",
            registry=self.registry,
        ).set_function(self.recent_tokens_per_second)
        if engine is not None or feature_cache is not None:
            self.registry.register(EngineCollector(engine, feature_cache))
        self._recent: deque[tuple[float, int]] = deque()  # (finished at, completion tokens)
        self._recent_lock = threading.Lock()
        self.started = time.time()

    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_cancelled(self, stage: str) -> None:
        """A request whose client went away before its answer was complete; its work was stopped."""
        self.cancelled.labels(stage=stage).inc()

    def observe_completion(self, completion: Completion) -> None:
        generated = len(completion.token_ids)
        self.completions.labels(finish_reason=completion.finish_reason).inc()
        self.latency.observe(completion.seconds)
        if completion.first_token_seconds is not None:
            self.first_token.observe(completion.first_token_seconds)
        self.completion_tokens.inc(generated)
        self.prompt_tokens.inc(completion.prompt_tokens)
        self.visual_tokens.inc(completion.visual_tokens)
        if completion.reused_prefix_tokens > 0:
            self.prefix_hits.inc()
            self.reused_prefix_tokens.inc(completion.reused_prefix_tokens)
        now = time.monotonic()
        with self._recent_lock:
            self._recent.append((now, generated))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_SECONDS:
            self._recent.popleft()

    def recent_tokens_per_second(self) -> float:
        """Completion tokens of requests finished in the last minute, per second of that minute."""
        now = time.monotonic()
        with self._recent_lock:
            self._trim(now)
            tokens = sum(n for _, n in self._recent)
        window = min(RATE_WINDOW_SECONDS, max(1e-9, time.time() - self.started))
        return tokens / window

    def exposition(self) -> bytes:
        """The whole registry in the Prometheus text format."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The engine's queue, batch and totals and the feature cache's hits, read at each scrape."""

    def __init__(self, engine: Engine | None, feature_cache: FeatureCache | None):
        self.engine = engine
        self.feature_cache = feature_cache

    def collect(self) -> Iterator[Metric]:
        gauges: dict[str, tuple[str, float]] = {}  # name: (help, value)
        counters: dict[str, tuple[str, float]] = {}
        engine = self.engine
        if engine is not None:
            stats = engine.stats
            busy_rate = stats.tokens_generated / stats.busy_seconds if stats.busy_seconds > 0 else 0.0
            gauges = {
                "videollava_queue_depth": (
                    "Requests waiting for a place in the running batch.",
                    engine.queue_depth,
                ),
                "videollava_running_requests": ("Requests in the running batch.", engine.running),
                "videollava_engine_busy_tokens_per_second": (
                    "Tokens generated per second of engine work.",
                    busy_rate,
                ),
            }
            counters = {
                "videollava_engine_requests": ("Requests the engine finished.", stats.requests_total),
                "videollava_engine_requests_failed": ("Requests the engine failed.", stats.requests_failed),
                "videollava_engine_tokens_generated": (
                    "Tokens the engine generated (stop tokens excluded).",
                    stats.tokens_generated,
                ),
                "videollava_engine_busy_seconds": ("Seconds the engine spent working.", stats.busy_seconds),
                "videollava_prefix_cache_hits": (
                    "Prefills that reused a cached prompt prefix.",
                    engine.prefix_cache.hits,
                ),
                "videollava_prefix_cache_reused_tokens": (
                    "Prompt positions taken from the prefix cache.",
                    engine.prefix_cache.reused_tokens,
                ),
            }
        if self.feature_cache is not None:
            counters["videollava_feature_cache_hits"] = (
                "Images and videos whose visual features were found in the cache.",
                self.feature_cache.hits,
            )
            counters["videollava_feature_cache_misses"] = (
                "Images and videos encoded by the vision tower.",
                self.feature_cache.misses,
            )
        for name, (help_text, value) in gauges.items():
            yield GaugeMetricFamily(name, help_text, value=value)
        for name, (help_text, value) in counters.items():
            yield CounterMetricFamily(name, help_text, value=value)
