"""Prometheus text exposition of the server's counters, written by hand to need no client library.

Request counts and latencies are recorded by the server as responses finish; queue, batch and cache
figures are read from the engine and the pipeline when scraped, so they are never stale.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from videollava.infer.engine import Engine
    from videollava.infer.request import Completion

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW_SECONDS = 60.0


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects them."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {_number(self.total)}")
        out.append(f"{name}_count {self.count}")
        return out


class ServerMetrics:
    """Thread-safe counters fed by request handlers and by the threads that wait on the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.finish_reasons: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()  # by the stage the client left in
        self.latency = Histogram()
        self.first_token = Histogram()
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.visual_tokens = 0
        self.prefix_hits = 0
        self.reused_prefix_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()
        self.started = time.time()

    def observe_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def observe_cancelled(self, stage: str) -> None:
        """A request whose client went away before its answer was complete; its work was stopped."""
        with self._lock:
            self.cancelled[stage] += 1

    def observe_completion(self, completion: Completion) -> None:
        now = time.monotonic()
        with self._lock:
            self.finish_reasons[completion.finish_reason] += 1
            self.latency.observe(completion.seconds)
            if completion.first_token_seconds is not None:
                self.first_token.observe(completion.first_token_seconds)
            self.completion_tokens += len(completion.token_ids)
            self.prompt_tokens += completion.prompt_tokens
            self.visual_tokens += completion.visual_tokens
            if completion.reused_prefix_tokens > 0:
                self.prefix_hits += 1
                self.reused_prefix_tokens += completion.reused_prefix_tokens
            self._recent.append((now, len(completion.token_ids)))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_SECONDS:
            self._recent.popleft()

    def recent_tokens_per_second(self) -> float:
        """Completion tokens of requests finished in the last minute, per second of that minute."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            tokens = sum(n for _, n in self._recent)
        window = min(RATE_WINDOW_SECONDS, max(1e-9, time.time() - self.started))
        return tokens / window

    def render(self, engine: Engine | None = None, feature_cache=None) -> str:
        """The whole exposition, one HELP and TYPE line per family."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        with self._lock:
            requests = sorted(self.requests.items())
            reasons = sorted(self.finish_reasons.items())
            cancelled = sorted(self.cancelled.items())
            latency = self.latency.lines("videollava_request_latency_seconds")
            first = self.first_token.lines("videollava_time_to_first_token_seconds")
            scalars = (
                self.completion_tokens,
                self.prompt_tokens,
                self.visual_tokens,
                self.prefix_hits,
                self.reused_prefix_tokens,
            )
        completion_tokens, prompt_tokens, visual_tokens, prefix_hits, reused = scalars
        family(
            "videollava_http_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status code (499: the client left first).",
            [
                f'videollava_http_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                for (e, s), n in requests
            ],
        )
        family(
            "videollava_completions_total",
            "counter",
            "Generations finished, by finish reason.",
            [f'videollava_completions_total{{finish_reason="{_label(r)}"}} {n}' for r, n in reasons],
        )
        family(
            "videollava_requests_cancelled_total",
            "counter",
            "Requests stopped because their client went away, by the stage they were in "
            "(fetch, read, prepare, generate).",
            [f'videollava_requests_cancelled_total{{stage="{_label(s)}"}} {n}' for s, n in cancelled],
        )
        family(
            "videollava_request_latency_seconds",
            "histogram",
            "Seconds from engine submission to the last token.",
            latency,
        )
        family(
            "videollava_time_to_first_token_seconds",
            "histogram",
            "Seconds from engine submission to the first token.",
            first,
        )
        family(
            "videollava_completion_tokens_total",
            "counter",
            "Tokens generated for HTTP requests.",
            [f"videollava_completion_tokens_total {completion_tokens}"],
        )
        family(
            "videollava_prompt_tokens_total",
            "counter",
            "Prompt tokens (visual ones included) of HTTP requests.",
            [f"videollava_prompt_tokens_total {prompt_tokens}"],
        )
        family(
            "videollava_visual_tokens_total",
            "counter",
            "Visual tokens of HTTP requests.",
            [f"videollava_visual_tokens_total {visual_tokens}"],
        )
        family(
            "videollava_request_prefix_cache_hits_total",
            "counter",
            "HTTP requests whose prompt reused cached keys/values.",
            [f"videollava_request_prefix_cache_hits_total {prefix_hits}"],
        )
        family(
            "videollava_request_reused_prefix_tokens_total",
            "counter",
            "Prompt positions of HTTP requests not recomputed thanks to the prefix cache.",
            [f"videollava_request_reused_prefix_tokens_total {reused}"],
        )
        family(
            "videollava_tokens_per_second",
            "gauge",
            f"Completion tokens per second over the last {RATE_WINDOW_SECONDS:g} s.",
            [f"videollava_tokens_per_second {_number(self.recent_tokens_per_second())}"],
        )
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
            for name, (help_text, value) in gauges.items():
                family(name, "gauge", help_text, [f"{name} {_number(value)}"])
            counters = {
                "videollava_engine_requests_total": ("Requests the engine finished.", stats.requests_total),
                "videollava_engine_requests_failed_total": (
                    "Requests the engine failed.",
                    stats.requests_failed,
                ),
                "videollava_engine_tokens_generated_total": (
                    "Tokens the engine generated (stop tokens excluded).",
                    stats.tokens_generated,
                ),
                "videollava_engine_busy_seconds_total": (
                    "Seconds the engine spent working.",
                    stats.busy_seconds,
                ),
                "videollava_prefix_cache_hits_total": (
                    "Prefills that reused a cached prompt prefix.",
                    engine.prefix_cache.hits,
                ),
                "videollava_prefix_cache_reused_tokens_total": (
                    "Prompt positions taken from the prefix cache.",
                    engine.prefix_cache.reused_tokens,
                ),
            }
            for name, (help_text, value) in counters.items():
                family(name, "counter", help_text, [f"{name} {_number(value)}"])
        if feature_cache is not None:
            family(
                "videollava_feature_cache_hits_total",
                "counter",
                "Images and videos whose visual features were found in the cache.",
                [f"videollava_feature_cache_hits_total {feature_cache.hits}"],
            )
            family(
                "videollava_feature_cache_misses_total",
                "counter",
                "Images and videos encoded by the vision tower.",
                [f"videollava_feature_cache_misses_total {feature_cache.misses}"],
            )
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
