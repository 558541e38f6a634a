"""One request never hurts another: clients that leave, slow remote hosts and server faults."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.test_serve_api import (
    KEY,
    MODEL,
    HeldPipeline,
    assert_openai_error,
    counted,
    image_part,
    metric_samples,
    raw_post,
    running_server,
    user,
    video_part,
    wait_for,
)
from tests.test_serve_media import trickling_server
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import Prepared
from videollava.serve.api import ServeSettings, create_app
from videollava.serve.media import MediaPolicy


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


def health(base: str) -> dict:
    return httpx.get(f"{base}/health", timeout=5).json()


def post_and_leave(base: str, body: dict, after: float) -> None:
    """Send a request and hang up after `after` seconds without an answer."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=after))


@pytest.mark.parametrize("stream", [False, True])
def test_clients_leaving_during_preparation_give_their_places_back(pipeline: Pipeline, stream: bool) -> None:
    """Six requests fill every place (batch 2 + queue 4): two preparing, four waiting for a prepare
    worker; all their clients leave. The two preparations stop, the four waiting never start, nothing
    is generated, and at once six new requests are all answered."""
    held = HeldPipeline(pipeline)
    engine = Engine.for_pipeline(pipeline, max_batch_size=2, max_queue=4)
    settings = ServeSettings(model_name=MODEL, default_max_tokens=3, prepare_workers=2)
    app = create_app(held, settings, engine)
    body = {"messages": [user("HOLD: what is this?")], "stream": stream}
    with running_server(app) as base:
        with ThreadPoolExecutor(max_workers=6) as pool:
            preparing = [pool.submit(post_and_leave, base, body, 1.5) for _ in range(2)]
            wait_for(lambda: held.entered == 2, what="two requests preparing")
            waiting = [pool.submit(post_and_leave, base, body, 0.5) for _ in range(4)]
            wait_for(lambda: health(base)["pools"]["admission"]["busy"] == 6, timeout=2, what="all admitted")
            assert health(base)["pools"]["prepare"] == {"busy": 2, "waiting": 4, "workers": 2}
            for future in waiting + preparing:
                future.result()
        left = time.monotonic()
        wait_for(lambda: health(base)["pools"]["admission"]["busy"] == 0, timeout=2, what="places freed")
        assert time.monotonic() - left < 1.0
        assert held.cancelled == 2 and held.entered == 2
        assert counted(app, "videollava_requests_cancelled_total", stage="prepare") == 6

        def ask(i: int) -> int:
            response = raw_post(base, {"messages": [user(f"Question {i}?")], "max_tokens": 3}, key=None)
            return response.status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            assert list(pool.map(ask, range(6))) == [200] * 6
        assert engine.stats.requests_total == 6  # the departed requests were never generated
        assert health(base)["status"] == "ok"


def test_leaving_during_generation_stops_it(pipeline: Pipeline) -> None:
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=2)
    app = create_app(pipeline, ServeSettings(model_name=MODEL), engine)
    body = {"messages": [user("Write a very long story.")], "max_tokens": 450}
    with running_server(app) as base:
        post_and_leave(base, body, 0.1)  # well before the 450 tokens (about 0.3 s here) are done
        wait_for(
            lambda: counted(app, "videollava_completions_total", finish_reason="cancelled") == 1,
            timeout=5,
            what="the cancel",
        )
        assert counted(app, "videollava_requests_cancelled_total", stage="generate") == 1
        assert counted(app, "videollava_completion_tokens_total") < 450
        wait_for(lambda: engine.running == 0, timeout=2, what="the batch to empty")
        assert health(base)["pools"]["admission"]["busy"] == 0


def test_slow_remote_hosts_hold_up_nothing_else(pipeline: Pipeline, tmp_path) -> None:
    """Two requests fetching from a host that trickles its headers fill the fetch slots: a third remote
    request is refused at once, text-only and local-file requests are answered meanwhile, /health says
    which pool is saturated, and the slow fetches fail at their deadline."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 90)).save(tmp_path / "red.png")
    settings = ServeSettings(
        model_name=MODEL,
        default_max_tokens=3,
        max_remote_fetches=2,
        media=MediaPolicy(allowed_dir=tmp_path, allowed_domains=["127.0.0.1"], fetch_timeout=3),
    )
    app = create_app(pipeline, settings, Engine.for_pipeline(pipeline, max_batch_size=4, max_queue=4))
    with running_server(app) as base, trickling_server(interval=0.05) as slow:
        remote = {"messages": [user("What?", video_part(f"{slow.url}/clip.mp4"))]}
        with ThreadPoolExecutor(max_workers=2) as pool:
            started = time.monotonic()
            stuck = [pool.submit(raw_post, base, remote, None) for _ in range(2)]
            wait_for(lambda: slow.accepted == 2, timeout=2, what="both fetches to connect")
            state = health(base)
            assert state["status"] == "degraded" and state["saturated"] == ["remote_fetch"]
            assert state["pools"]["remote_fetch"] == {"busy": 2, "limit": 2}
            error = assert_openai_error(raw_post(base, remote, key=None), 429, "remote media fetches")
            assert error["code"] == "remote_fetch_busy"
            for body in (
                {"messages": [user("hi")]},
                {"messages": [user("What colour?", image_part("red.png"))]},
            ):
                asked = time.monotonic()
                assert raw_post(base, body, key=None).status_code == 200
                assert time.monotonic() - asked < 2.0
            for future in stuck:
                assert_openai_error(future.result(), 400, "could not be fetched in 3 s")
            assert time.monotonic() - started < 4.5
        assert health(base)["status"] == "ok"


def test_leaving_during_a_remote_fetch_closes_it(pipeline: Pipeline) -> None:
    settings = ServeSettings(
        model_name=MODEL, media=MediaPolicy(allowed_domains=["127.0.0.1"], fetch_timeout=30)
    )
    app = create_app(pipeline, settings, Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=1))
    with running_server(app) as base, trickling_server(interval=0.05) as slow:
        post_and_leave(base, {"messages": [user("What?", video_part(f"{slow.url}/a.mp4"))]}, 0.5)
        left = time.monotonic()
        wait_for(lambda: bool(slow.closed_by_client), timeout=2, what="the fetch to hang up")
        assert slow.closed_by_client[0] - left < 1.0
        wait_for(lambda: health(base)["pools"]["remote_fetch"]["busy"] == 0, timeout=1, what="the slot")
        assert counted(app, "videollava_requests_cancelled_total", stage="fetch") == 1


class FaultyPipeline(HeldPipeline):
    """Prompts with CRASH raise an unexpected exception; prompts with BADIDS reach the engine with a
    token id the model has no embedding for, so generation itself fails."""

    def prepare(self, prompt, media, num_frames=None, add_bos=True, *, cancelled=None, **options):
        if "CRASH" in prompt:
            raise RuntimeError("secret-internal-detail")
        if "BADIDS" in prompt:
            ids = [1, 10**6]
            return Prepared(ids, [], list(ids), 0)
        return super().prepare(prompt, media, num_frames, add_bos, cancelled=cancelled, **options)


def test_server_faults_are_500s_with_a_request_id_and_no_internals(pipeline: Pipeline, caplog) -> None:
    app = create_app(
        FaultyPipeline(pipeline), ServeSettings(model_name=MODEL, api_key=KEY), Engine.for_pipeline(pipeline)
    )
    endpoint = (("endpoint", "/v1/chat/completions"), ("status", "500"))
    caplog.set_level(logging.ERROR, logger="videollava.serve")
    with running_server(app) as base:
        before = metric_samples(base).get(("videollava_http_requests_total", endpoint), 0)
        response = raw_post(base, {"messages": [user("CRASH now")]})
        error = assert_openai_error(response, 500, "internal server error")
        request_id = response.headers["x-request-id"]
        assert request_id in error["message"] and "secret" not in response.text
        crash = [r for r in caplog.records if request_id in r.getMessage()]
        assert crash and crash[0].exc_info and "secret-internal-detail" in str(crash[0].exc_info[1])

        response = raw_post(base, {"messages": [user("BADIDS")]})
        error = assert_openai_error(response, 500, "generation failed")
        request_id = response.headers["x-request-id"]
        assert request_id in error["message"] and "Error" not in error["message"]
        assert any(request_id in r.getMessage() for r in caplog.records)

        with httpx.stream(
            "POST",
            f"{base}/v1/chat/completions",
            json={"messages": [user("BADIDS")], "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ) as streamed:
            events = [line for line in streamed.iter_lines() if line]
        assert "generation failed" in events[-2] and streamed.headers["x-request-id"] in events[-2]
        assert "Error" not in "".join(events) and events[-1] == "data: [DONE]"

        assert metric_samples(base)[("videollava_http_requests_total", endpoint)] == before + 2
        # the server is still healthy and answers others
        assert raw_post(base, {"messages": [user("hi")], "max_tokens": 2}).status_code == 200


def test_abandoned_work_never_runs_twice_over_its_slot(pipeline: Pipeline) -> None:
    """A request whose client left while it waited for a prepare worker never enters preparation."""
    held = HeldPipeline(pipeline)
    app = create_app(held, ServeSettings(model_name=MODEL, prepare_workers=1), Engine.for_pipeline(pipeline))
    with running_server(app) as base:
        first = threading.Thread(
            target=post_and_leave, args=(base, {"messages": [user("HOLD first")]}, 1.5), daemon=True
        )
        first.start()
        wait_for(lambda: held.entered == 1, what="the first to prepare")
        post_and_leave(base, {"messages": [user("HOLD second")]}, 0.3)  # waits for the one worker
        first.join()
        wait_for(lambda: held.cancelled == 1, timeout=2, what="the first to stop")
        time.sleep(0.2)
        assert held.entered == 1
