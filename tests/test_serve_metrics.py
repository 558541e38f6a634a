"""/metrics after a known mix of requests: every family's name, type, label names and values."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.test_serve_api import KEY, MODEL, image_part, raw_post, running_server, user, wait_for
from tests.test_serve_isolation import FaultyPipeline
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.serve.api import ServeSettings, create_app

LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf")]
CHAT = "/v1/chat/completions"
FAMILIES = {
    # family: (type, label names of its samples)
    "videollava_http_requests": ("counter", {"endpoint", "status"}),
    "videollava_completions": ("counter", {"finish_reason"}),
    "videollava_requests_cancelled": ("counter", {"stage"}),
    "videollava_request_latency_seconds": ("histogram", {"le"}),
    "videollava_time_to_first_token_seconds": ("histogram", {"le"}),
    "videollava_completion_tokens": ("counter", set()),
    "videollava_prompt_tokens": ("counter", set()),
    "videollava_visual_tokens": ("counter", set()),
    "videollava_request_prefix_cache_hits": ("counter", set()),
    "videollava_request_reused_prefix_tokens": ("counter", set()),
    "videollava_tokens_per_second": ("gauge", set()),
    "videollava_queue_depth": ("gauge", set()),
    "videollava_running_requests": ("gauge", set()),
    "videollava_engine_busy_tokens_per_second": ("gauge", set()),
    "videollava_engine_requests": ("counter", set()),
    "videollava_engine_requests_failed": ("counter", set()),
    "videollava_engine_tokens_generated": ("counter", set()),
    "videollava_engine_busy_seconds": ("counter", set()),
    "videollava_prefix_cache_hits": ("counter", set()),
    "videollava_prefix_cache_reused_tokens": ("counter", set()),
    "videollava_feature_cache_hits": ("counter", set()),
    "videollava_feature_cache_misses": ("counter", set()),
}


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


class Exposition:
    """One scrape of /metrics, parsed as Prometheus reads it."""

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families

        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        self.samples: dict[tuple[str, tuple], float] = {}
        for family in text_string_to_metric_families(text):
            assert family.name not in self.types, f"{family.name} is exposed twice"
            self.types[family.name] = family.type
            self.labels[family.name] = set()
            for sample in family.samples:
                labels = dict(sample.labels)
                if "le" in labels:  # a bucket bound is a number, however it is written ("1" or "1.0")
                    labels["le"] = float(labels["le"])
                self.labels[family.name] |= set(labels)
                self.samples[(sample.name, tuple(sorted(labels.items())))] = sample.value

    def __call__(self, name: str, **labels) -> float:
        """A sample's value; 0 for a labelled sample not seen yet."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by(self, name: str, label: str) -> dict[str, float]:
        """The samples of `name` by the value of their one label."""
        return {dict(labels)[label]: v for (sample, labels), v in self.samples.items() if sample == name}


class Scraper:
    """Reads /metrics, counting its own scrapes (each one is a request that /metrics counts)."""

    def __init__(self, base: str):
        self.base = base
        self.scrapes = 0

    def scrape(self) -> Exposition:
        response = httpx.get(f"{self.base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        self.scrapes += 1
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        return Exposition(response.text)


def post_and_leave(base: str, body: dict, after: float) -> None:
    """Send a request with the key and hang up after `after` seconds without an answer."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{base}{CHAT}",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(5, read=after),
        )


def test_metrics_exposition_after_a_known_mix_of_requests(pipeline: Pipeline) -> None:
    """Requests answered 200, 400, 401, 404 and 500, clients leaving while preparing and mid-stream:
    each counted under its endpoint, status, finish reason and stage; engine and caches read at scrape."""
    faulty = FaultyPipeline(pipeline)
    engine = Engine.for_pipeline(pipeline, max_batch_size=2, max_queue=4)
    app = create_app(faulty, ServeSettings(model_name=MODEL, api_key=KEY, default_max_tokens=3), engine)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 90)).save(buffer, format="PNG")
    png = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    feature_hits, feature_misses = pipeline.feature_cache.hits, pipeline.feature_cache.misses
    with running_server(app) as base:
        scraper = Scraper(base)
        answered = [raw_post(base, {"messages": [user("Count me.", image_part(png))]}) for _ in range(2)]
        assert [r.status_code for r in answered] == [200, 200]
        usages = [r.json()["usage"] for r in answered]
        reasons = [r.json()["choices"][0]["finish_reason"] for r in answered]
        assert raw_post(base, {"messages": []}).status_code == 400
        assert httpx.get(f"{base}/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{base}/v1/models/nope", headers=auth).status_code == 404
        assert httpx.get(f"{base}/nothing-here").status_code == 404
        assert httpx.get(f"{base}/health").status_code == 200
        assert raw_post(base, {"messages": [user("CRASH now")]}).status_code == 500
        assert raw_post(base, {"messages": [user("BADIDS")]}).status_code == 500
        post_and_leave(base, {"messages": [user("HOLD: what is this?")]}, 0.5)  # leaves while preparing
        long = {"messages": [user("Write a very long story.")], "max_tokens": 450, "stream": True}
        with httpx.stream("POST", f"{base}{CHAT}", json=long, headers=auth, timeout=30) as streamed:
            for line in streamed.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # leaves while generating, after the first token

        def settled() -> bool:
            seen = scraper.scrape()
            return (
                seen("videollava_completions_total", finish_reason="cancelled") == 1
                and seen("videollava_http_requests_total", endpoint=CHAT, status="499") == 1
            )

        wait_for(settled, timeout=10, what="the departed requests to be counted")
        wait_for(lambda: engine.running == 0 and engine.queue_depth == 0, timeout=5, what="the engine")
        earlier_scrapes = scraper.scrapes
        seen = scraper.scrape()

    assert {name: (seen.types[name], seen.labels[name]) for name in seen.types} == FAMILIES
    requests = {
        f"{dict(labels)['endpoint']} {dict(labels)['status']}": n
        for (name, labels), n in seen.samples.items()
        if name == "videollava_http_requests_total"
    }
    assert requests == {
        f"{CHAT} 200": 3,  # the stream left after its first token had begun as a 200
        f"{CHAT} 400": 1,
        f"{CHAT} 500": 2,
        f"{CHAT} 499": 1,
        "/v1/models 401": 1,
        "/v1/models 404": 1,
        "other 404": 1,
        "/health 200": 1,
        "/metrics 200": earlier_scrapes,  # the scrape being answered is counted once it is
    }
    finished = {"error": 1, "cancelled": 1}
    for reason in reasons:
        finished[reason] = finished.get(reason, 0) + 1
    assert seen.by("videollava_completions_total", "finish_reason") == finished
    assert seen.by("videollava_requests_cancelled_total", "stage") == {"prepare": 1, "generate": 1}

    for histogram in ("videollava_request_latency_seconds", "videollava_time_to_first_token_seconds"):
        buckets = [seen(f"{histogram}_bucket", le=bound) for bound in LATENCY_BOUNDS]
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] == seen(f"{histogram}_count") and seen(f"{histogram}_sum") > 0
    assert seen("videollava_request_latency_seconds_count") == 4  # the answered two, the error, the story
    assert seen("videollava_time_to_first_token_seconds_count") == 3  # the answered two and the story

    answered_tokens = sum(u["completion_tokens"] for u in usages)
    assert answered_tokens <= seen("videollava_completion_tokens_total") < answered_tokens + 450
    assert seen("videollava_prompt_tokens_total") > sum(u["prompt_tokens"] for u in usages)
    assert seen("videollava_visual_tokens_total") == sum(u["visual_tokens"] for u in usages) > 0
    assert seen("videollava_request_prefix_cache_hits_total") >= 1  # the second reused the first's prompt
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert seen("videollava_request_reused_prefix_tokens_total") >= cached > 0
    assert seen("videollava_tokens_per_second") > 0

    stats = engine.stats
    assert seen("videollava_queue_depth") == 0 and seen("videollava_running_requests") == 0
    busy_rate = stats.tokens_generated / stats.busy_seconds
    assert seen("videollava_engine_busy_tokens_per_second") == pytest.approx(busy_rate)
    assert seen("videollava_engine_requests_total") == stats.requests_total == 4
    assert seen("videollava_engine_requests_failed_total") == stats.requests_failed == 1
    assert seen("videollava_engine_tokens_generated_total") == stats.tokens_generated
    assert seen("videollava_engine_busy_seconds_total") == pytest.approx(stats.busy_seconds)
    assert seen("videollava_prefix_cache_hits_total") == engine.prefix_cache.hits
    assert seen("videollava_prefix_cache_reused_tokens_total") == engine.prefix_cache.reused_tokens
    assert seen("videollava_feature_cache_hits_total") == pipeline.feature_cache.hits == feature_hits + 1
    assert (
        seen("videollava_feature_cache_misses_total") == pipeline.feature_cache.misses == feature_misses + 1
    )


def test_each_app_counts_in_its_own_registry(pipeline: Pipeline) -> None:
    """Two apps in one process: no clash of names, no count of one seen by the other, nothing in the
    client's global registry, and no `_created` series beside the counters."""
    from prometheus_client import REGISTRY

    first = create_app(pipeline, ServeSettings(model_name=MODEL), Engine.for_pipeline(pipeline)).state.metrics
    second = create_app(
        pipeline, ServeSettings(model_name=MODEL), Engine.for_pipeline(pipeline)
    ).state.metrics
    first.observe_request("/health", 200)
    first.observe_cancelled("fetch")
    assert (
        Exposition(first.exposition().decode())(
            "videollava_http_requests_total", endpoint="/health", status="200"
        )
        == 1
    )
    other = Exposition(second.exposition().decode())
    assert set(other.types) == set(FAMILIES)
    assert other("videollava_http_requests_total", endpoint="/health", status="200") == 0
    assert other.by("videollava_requests_cancelled_total", "stage") == {}
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("videollava")]
    assert "_created" not in first.exposition().decode()
