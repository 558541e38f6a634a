"""The chat API under a property-based fuzzer.

Request bodies are drawn by hypothesis: wrong types, absurd numbers, deep and odd nesting, every kind
of content part, media URLs of every scheme (data, local paths good and hostile, file, http to a
live local host, unsupported ones). Whatever arrives: never a 500, never a hung request, and a client
asking a fixed question beside the fuzzer keeps getting the same answer; afterwards the server is
healthy and counted no 500.
"""

from __future__ import annotations

import base64
import json
import os
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_serve_api import MODEL, image_part, metric_samples, running_server, user
from tests.test_serve_media import animated_gif, media_http_server
from videollava.infer.engine import Engine
from videollava.infer.pipeline import Pipeline
from videollava.serve.api import ServeSettings, create_app
from videollava.serve.media import MediaPolicy

REQUEST_TIMEOUT = 30.0  # far above any legitimate answer here: hitting it means a hung request


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


def _png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (36, 28), colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def fuzz_server(pipeline: Pipeline, tmp_path_factory):
    """(base URL, app, media server URL): local files incl. hostile ones, remote media from 127.0.0.1."""
    root = tmp_path_factory.mktemp("fuzz-media")
    (root / "red.png").write_bytes(_png((200, 20, 20)))
    (root / "spin.gif").write_bytes(animated_gif(frames=5))
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(os.urandom(3000))
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    (root / "to-outside").symlink_to("/etc/hostname")
    os.mkfifo(root / "fifo.mp4")
    (root / "folder").mkdir()
    policy = MediaPolicy(allowed_dir=root, allowed_domains=["127.0.0.1"], max_bytes=2**20, fetch_timeout=1.0)
    settings_ = ServeSettings(model_name=MODEL, media=policy, default_max_tokens=2, max_body_bytes=2**20)
    app = create_app(pipeline, settings_, Engine.for_pipeline(pipeline, max_batch_size=4, max_queue=8))
    files = {"red.png": _png((10, 200, 10)), "spin.gif": animated_gif(frames=3)}
    with running_server(app) as base, media_http_server(files) as media_base:
        yield base, app, media_base


def _data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def urls(media_base: str) -> st.SearchStrategy[str]:
    known = [
        "red.png",
        "spin.gif",
        "/red.png",
        "empty.png",
        "garbage.mp4",
        "loop-a",
        "to-outside",
        "fifo.mp4",
        "folder",
        "missing.png",
        "../etc/passwd",
        "~root/x",
        "~nosuchuser/x.png",
        "red\x00.png",
        "/dev/zero",
        "/proc/self/environ",
        "file:///etc/passwd",
        "file://localhost/red.png",
        "file://other.host/red.png",
        "http://[::1",
        "http://exa\tmple.org/x.png",
        "http://127.0.0.1:99999/x",
        "https://example.org/x.png",
        "ftp://127.0.0.1/x.png",
        "javascript:alert(1)",
        "C:\\red.png",
        "",
        " ",
        f"{media_base}/file/red.png",
        f"{media_base}/file/spin.gif",
        f"{media_base}/file/missing.png",
        f"{media_base}/redirect-out",
        f"{media_base}/big-undeclared",
        f"{media_base}/slow",
        _data_url("image/png", _png((1, 2, 3))),
        _data_url("image/gif", animated_gif(frames=2)),
        _data_url("video/mp4", b"not a video"),
        _data_url("text/plain", b"hello"),
        "data:image/png;base64,@@@",
        "data:image/png,plain",
        "data:;base64,",
    ]
    generated = st.builds(
        _data_url, st.sampled_from(["image/png", "video/mp4", "image/gif", ""]), st.binary(max_size=64)
    )
    return st.one_of(st.sampled_from(known), generated, st.text(max_size=40))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_junk = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
absurd_numbers = st.sampled_from(
    [0, -1, 1, 2, 0.5, 1.5, 3e-38, 1e-300, 1e308, -0.0, 2**63, 2**64, -(2**63) - 1, 10**30, "1", True, None]
)


def parts(media_base: str) -> st.SearchStrategy:
    url = urls(media_base)
    return st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=30)),
        st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, url),
        st.builds(lambda u: {"type": "video_url", "video_url": {"url": u}}, url),
        st.builds(lambda u: {"type": "image_url", "image_url": u}, url),
        st.builds(
            lambda k, v: {"type": k, k: v},
            st.sampled_from(["image_url", "video_url", "input_audio"]),
            json_junk,
        ),
        json_junk,
    )


def messages(media_base: str) -> st.SearchStrategy:
    content = st.one_of(st.text(max_size=40), st.lists(parts(media_base), max_size=3), json_scalars)
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "user", "assistant", "system", "developer", "tool", 5, None]),
            "content": content,
        }
    )
    return st.one_of(st.lists(message, min_size=1, max_size=3), json_junk)


def hostile_bodies(media_base: str) -> st.SearchStrategy:
    """Any field, any type, any value."""
    optional = {
        "model": st.sampled_from([MODEL, "gpt-4o", 5, None]),
        "max_tokens": absurd_numbers,
        "max_completion_tokens": absurd_numbers,
        "temperature": absurd_numbers,
        "top_p": absurd_numbers,
        "seed": st.one_of(absurd_numbers, st.integers()),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=3), max_size=20), json_junk),
        "stream": st.sampled_from([True, False, "yes", None]),
        "stream_options": st.one_of(st.just({"include_usage": True}), json_junk),
        "n": absurd_numbers,
        "num_frames": absurd_numbers,
        "cache_salt": st.one_of(st.text(max_size=10), st.just("s" * 300), json_scalars),
        "tools": json_junk,
        "logprobs": json_junk,
        "response_format": st.one_of(st.just({"type": "json_object"}), json_junk),
        "extra": json_junk,
    }
    return st.fixed_dictionaries({"messages": messages(media_base)}, optional=optional)


def plausible_bodies(media_base: str) -> st.SearchStrategy:
    """Well-formed requests whose media and sampling values range from ordinary to hostile."""
    url = urls(media_base)
    part = st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=30)),
        st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, url),
        st.builds(lambda u: {"type": "video_url", "video_url": {"url": u}}, url),
    )
    content = st.one_of(st.text(min_size=1, max_size=40), st.lists(part, min_size=1, max_size=3))
    turn = st.fixed_dictionaries({"role": st.just("user"), "content": content})
    history = st.lists(
        st.tuples(
            turn, st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(max_size=20)})
        ),
        max_size=1,
    ).map(lambda pairs: [m for pair in pairs for m in pair])
    conversation = st.tuples(history, turn).map(lambda ht: [*ht[0], ht[1]])
    usual = {
        "temperature": st.one_of(st.sampled_from([0, 0.7, 1.0]), absurd_numbers),
        "top_p": st.one_of(st.sampled_from([1.0, 0.9, 0.5]), absurd_numbers),
        "seed": st.one_of(st.integers(min_value=0, max_value=2**64 - 1), absurd_numbers),
        "max_tokens": st.one_of(st.sampled_from([1, 2, 3]), absurd_numbers),
        "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(max_size=3), max_size=3)),
        "stream": st.booleans(),
        "stream_options": st.just({"include_usage": True}),
        "num_frames": st.one_of(st.sampled_from([1, 2, 8]), absurd_numbers),
        "cache_salt": st.one_of(st.text(min_size=1, max_size=10), json_scalars),
    }
    return st.fixed_dictionaries({"model": st.just(MODEL), "messages": conversation}, optional=usual)


def bodies(media_base: str) -> st.SearchStrategy:
    plausible = plausible_bodies(media_base)
    return st.one_of(plausible, plausible, hostile_bodies(media_base), json_junk)


class SteadyClient:
    """Asks one fixed question over and over beside the fuzzer; records every answer that differs."""

    def __init__(self, base: str, body: dict, expected: str):
        self.base, self.body, self.expected = base, body, expected
        self.answers = 0
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            response = httpx.post(f"{self.base}/v1/chat/completions", json=self.body, timeout=REQUEST_TIMEOUT)
            answer = (
                response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
            )
            if answer != self.expected:
                self.wrong.append(f"{response.status_code}: {response.text[:200]}")
            self.answers += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT)


def send(base: str, body) -> httpx.Response:
    """POST the body (as JSON, NaN and Infinity included, as Python writes them) and read it all."""
    content = json.dumps(body).encode()
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", content=content, timeout=REQUEST_TIMEOUT
    ) as response:
        response.read()
    return response


def test_fuzzed_requests_never_500_or_hang_and_hurt_no_one(fuzz_server) -> None:
    base, app, media_base = fuzz_server
    steady_body = {"messages": [user("What colour is it?", image_part("red.png"))], "max_tokens": 3}
    expected = httpx.post(f"{base}/v1/chat/completions", json=steady_body, timeout=REQUEST_TIMEOUT).json()
    steady = SteadyClient(base, steady_body, expected["choices"][0]["message"]["content"])
    seen: dict[int, int] = {}

    @settings(
        max_examples=120,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies(media_base))
    def one_request(body) -> None:
        response = send(base, body)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (body, response.text)
        if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in response.text.splitlines() if line]
            assert events[-1] == "data: [DONE]" and '"error"' not in response.text, response.text
        elif response.status_code != 200:
            error = response.json()["error"]
            assert error["message"] and "Traceback" not in error["message"]

    try:
        one_request()
    finally:
        steady.stop()
    assert steady.wrong == [] and steady.answers > 0
    # answers and refusals of several kinds were drawn
    assert seen.get(200, 0) >= 10 and seen.get(400, 0) >= 20 and len(seen) >= 3, seen
    health = httpx.get(f"{base}/health", timeout=5).json()
    assert health["status"] == "ok" and health["pools"]["admission"]["busy"] == 0, health
    statuses = {
        labels: v
        for (name, labels), v in metric_samples(base).items()
        if name == "videollava_http_requests_total"
    }
    assert not any(("status", "500") in labels for labels in statuses), statuses
