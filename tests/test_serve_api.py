"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from tests.test_chat import PromptRecorder, picture
from tests.test_serve_media import animated_gif, media_http_server
from videollava.errors import PromptError, RequestCancelled
from videollava.infer.ask import Question, prepare_question
from videollava.infer.engine import Engine, QueueFullError
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import MediaItem
from videollava.infer.sampling import SamplingParams
from videollava.serve.api import ServeSettings, api_error_from, create_app, prepare_chat
from videollava.serve.media import MediaPolicy
from videollava.serve.protocol import parse_chat_request
from videollava.testing import serve_subprocess

MODEL = "tiny-videollava"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def pipeline(hf_checkpoint) -> Pipeline:
    return Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32")


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, sample_videos: Path) -> Path:
    """An allowed folder with two clips, an image and a broken video; a secret file beside it."""
    from PIL import Image

    base = tmp_path_factory.mktemp("serve-media")
    root = base / "allowed"
    root.mkdir()
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        (root / name).write_bytes((sample_videos / name).read_bytes())
    image = Image.new("RGB", (80, 60))
    image.putdata([((x * 3) % 256, (y * 4) % 256, (x * y) % 256) for y in range(60) for x in range(80)])
    image.save(root / "pattern.png")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    (base / "secret.mp4").write_bytes((sample_videos / "bikes.mp4").read_bytes())
    (root / "escape.mp4").symlink_to(base / "secret.mp4")
    (root / "loop-a.mp4").symlink_to(root / "loop-b.mp4")
    (root / "loop-b.mp4").symlink_to(root / "loop-a.mp4")
    return root


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a background thread; yield the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(pipeline: Pipeline, media_root: Path):
    """(base URL, app): key required, local media from media_root, remote media from 127.0.0.1 only."""
    settings = ServeSettings(
        model_name=MODEL,
        api_key=KEY,
        media=MediaPolicy(allowed_dir=media_root, allowed_domains=["127.0.0.1"], fetch_timeout=10),
        default_max_tokens=16,
    )
    app = create_app(pipeline, settings, Engine.for_pipeline(pipeline, max_batch_size=8, max_queue=64))
    with running_server(app) as base:
        yield base, app


def client_for(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def ask_cli(capsys, folder: Path, question: str, videos=(), images=(), max_new_tokens: int = 16) -> dict:
    """The `videollava ask --json` answer for a greedy request."""
    from videollava.cli import main

    argv = ["ask", question, "--model", str(folder), "--dtype", "float32", "--json"]
    argv += ["--max-new-tokens", str(max_new_tokens)]
    for video in videos:
        argv += ["--video", str(video)]
    for image in images:
        argv += ["--image", str(image)]
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def raw_post(base: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if not isinstance(body, (dict, list)):
        return httpx.post(f"{base}/v1/chat/completions", content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in error["message"]
    return error


def counted(app, sample: str, **labels: str) -> float:
    """A sample of the app's own metrics registry; 0 before the first count."""
    return app.state.metrics.registry.get_sample_value(sample, labels) or 0.0


def metric_samples(base: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# --------------------------------------------------------------------------------------------


def test_models_health_and_api_key(server) -> None:
    base, _ = server
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = client_for(base).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client_for(base).models.retrieve(MODEL).id == MODEL

    with pytest.raises(openai.AuthenticationError):
        client_for(base, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client_for(base, key="wrong").chat.completions.create(model=MODEL, messages=[user("hi")])
    assert_openai_error(raw_post(base, {"messages": [user("hi")]}, key=None), 401, "missing API key")
    assert_openai_error(httpx.get(f"{base}/v1/models"), 401)
    assert_openai_error(httpx.get(f"{base}/metrics"), 401)


def test_answers_equal_ask_streaming_or_not(server, hf_checkpoint, media_root, capsys) -> None:
    base, _ = server
    client = client_for(base)
    question = "What is happening in this video?"
    expected = ask_cli(
        capsys, hf_checkpoint[0], question, videos=[media_root / "bikes.mp4"], max_new_tokens=12
    )

    messages = [user(question, video_part(str(media_root / "bikes.mp4")))]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected["answer"]
    assert reply.choices[0].finish_reason == expected["finish_reason"]
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]
    assert reply.usage.completion_tokens == len(expected["token_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.model_extra["visual_tokens"] == expected["visual_tokens"] > 0

    # the same request streamed, with the clip as a file:// URL and then inline as a data URL
    for url in (
        (media_root / "bikes.mp4").as_uri(),
        "data:video/mp4;base64," + base64.b64encode((media_root / "bikes.mp4").read_bytes()).decode(),
    ):
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[user(question, video_part(url))],
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected["answer"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish_reason"]
        assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])

    # an image, sent inline
    expected = ask_cli(capsys, hf_checkpoint[0], "Describe it.", images=[media_root / "pattern.png"])
    data = base64.b64encode((media_root / "pattern.png").read_bytes()).decode()
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[user("Describe it.", image_part(f"data:image/png;base64,{data}"))],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content == expected["answer"]


def test_stream_ends_with_done_event(server, media_root) -> None:
    base, _ = server
    body = {
        "model": MODEL,
        "messages": [user("What moves?", video_part("bikes.mp4"))],
        "max_tokens": 6,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_multi_turn_reuses_the_conversation(server, pipeline: Pipeline, media_root: Path) -> None:
    base, _ = server
    client = client_for(base)
    clip = str(media_root / "carphone_pristine.mp4")
    first_question, second_question = "Who is in the car?", "And what is outside the window?"
    first = client.chat.completions.create(
        model=MODEL, messages=[user(first_question, video_part(clip))], max_tokens=10, temperature=0
    )
    answer = first.choices[0].message.content
    messages = [
        user(first_question, video_part(clip)),
        {"role": "assistant", "content": answer},
        {"role": "user", "content": second_question},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)

    history = [("user", "<video>\n" + first_question), ("assistant", answer.strip())]
    prompt = pipeline.build_prompt(second_question, 0, 0, history=history)
    prepared = pipeline.prepare(prompt, [MediaItem("video", clip)])
    expected = Engine.for_pipeline(pipeline).generate([prepared], SamplingParams(max_new_tokens=10))[0]
    assert second.choices[0].message.content == expected.text
    assert second.usage.prompt_tokens == expected.prompt_tokens > first.usage.prompt_tokens
    # the earlier turn (system prompt, video rows, question) came from the prefix cache
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.model_extra["visual_tokens"]

    # a system message replaces the template's system prompt
    with_system = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one word."}, *messages],
        max_tokens=4,
        temperature=0,
    )
    assert with_system.usage.prompt_tokens != second.usage.prompt_tokens


def test_request_prompts_hold_the_conversation_and_its_media(
    hf_checkpoint, media_root: Path, tmp_path
) -> None:
    """The exact prompts the server builds from messages: a user turn's media as placeholders (videos
    first) and a newline before its text, unless the text places them itself; assistant turns stripped;
    system messages joined by newlines in place of the template's system prompt."""
    pipeline = Pipeline.from_pretrained(hf_checkpoint[0], dtype="float32", template="vicuna_v1")
    clip, red = str(media_root / "bikes.mp4"), str(media_root / "pattern.png")
    blue = str(picture(tmp_path / "blue.png", (0, 0, 200)))
    conversation = [
        user("What is shown?", image_part(red), video_part(clip)),
        {"role": "assistant", "content": "  a bike \n"},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": [{"type": "text", "text": "It rides."}]},
        user("Is <image> darker?", image_part(blue)),
    ]
    history = (
        "USER: <video><image>\nWhat is shown? ASSISTANT: a bike</s>USER: And then? ASSISTANT: It rides.</s>"
        "USER: Is <image> darker? ASSISTANT:"
    )
    system = pipeline.template.system
    systems = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
    ]
    recorder = PromptRecorder(pipeline)
    for messages in (conversation, [*systems, *conversation]):
        chat = parse_chat_request({"messages": messages}, MODEL, default_max_tokens=16)
        media = [MediaItem(kind, url) for kind, url in chat.media]
        prepare_chat(recorder, chat, media, lambda: False)
    assert [prompt for prompt, _ in recorder.prepared] == [
        f"{system} {history}",
        f"Answer in one word.\nBe kind. {history}",
    ]
    shown = [("image", red), ("video", clip), ("image", blue)]
    assert [media for _, media in recorder.prepared] == [shown, shown]

    answered_with_media = [user("Hi"), {"role": "assistant", "content": "see <video>"}, user("So?")]
    chat = parse_chat_request({"messages": answered_with_media}, MODEL, default_max_tokens=16)
    with pytest.raises(PromptError, match="assistant message contains a media placeholder"):
        prepare_chat(recorder, chat, [], lambda: False)


def test_stop_strings_and_lengths(server) -> None:
    base, _ = server
    client = client_for(base)
    messages = [user("Tell me a story about shapes.")]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stop=stop
    )
    assert cut.choices[0].message.content == text[: text.find(stop)].strip()  # answers are stripped
    assert cut.choices[0].finish_reason == "stop"
    # sampling with a seed is reproducible
    sampled = [
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_32_concurrent_clients_are_all_answered(server, pipeline: Pipeline, media_root: Path) -> None:
    base, _ = server
    videos = [media_root / "bikes.mp4", media_root / "carphone_pristine.mp4"]
    requests = []
    for i in range(32):
        question = f"Question number {i}: what do you see?"
        if i % 4 == 3:
            requests.append((Question(question), [user(question)]))
        elif i % 4 == 2:
            image = media_root / "pattern.png"
            requests.append(
                (Question(question, images=[str(image)]), [user(question, image_part(str(image)))])
            )
        else:
            video = videos[i % 2]
            requests.append(
                (Question(question, videos=[str(video)]), [user(question, video_part(str(video)))])
            )
    params = SamplingParams(max_new_tokens=8)
    expected = Engine.for_pipeline(pipeline).generate(
        [prepare_question(pipeline, q) for q, _ in requests], params
    )

    def one(i: int) -> str:
        client = client_for(base)
        messages = requests[i][1]
        if i % 2:
            stream = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return (
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(one, range(32)))
    assert answers == [c.text for c in expected]


def test_media_outside_the_rules_is_refused(server, media_root: Path) -> None:
    base, _ = server
    client = client_for(base)
    outside = media_root.parent / "secret.mp4"
    for url in (
        str(outside),
        str(media_root / ".." / "secret.mp4"),
        "../secret.mp4",
        str(media_root / "escape.mp4"),  # a symlink pointing outside
        outside.as_uri(),
    ):
        with pytest.raises(openai.PermissionDeniedError, match="outside the allowed media folder"):
            client.chat.completions.create(
                model=MODEL, messages=[user("What?", video_part(url))], max_tokens=2
            )
    with pytest.raises(openai.PermissionDeniedError, match="not in --allow-remote-media"):
        client.chat.completions.create(
            model=MODEL, messages=[user("What?", video_part("https://example.org/clip.mp4"))], max_tokens=2
        )


def test_remote_media_from_an_allowed_domain(server, hf_checkpoint, media_root: Path, capsys) -> None:
    base, _ = server
    expected = ask_cli(
        capsys, hf_checkpoint[0], "Describe.", videos=[media_root / "bikes.mp4"], max_new_tokens=8
    )
    with media_http_server({"clip.mp4": (media_root / "bikes.mp4").read_bytes()}) as media_base:
        reply = client_for(base).chat.completions.create(
            model=MODEL,
            messages=[user("Describe.", video_part(f"{media_base}/file/clip.mp4"))],
            max_tokens=8,
            temperature=0,
        )
    assert reply.choices[0].message.content == expected["answer"]


def test_unreadable_media_is_a_400_naming_the_problem(server) -> None:
    base, _ = server
    client = client_for(base)
    cases = [
        (video_part("broken.mp4"), "broken.mp4"),
        (video_part("missing.mp4"), "no such file"),
        (video_part("data:video/mp4;base64," + base64.b64encode(b"not a video at all").decode()), "data URL"),
        (
            image_part("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()),
            "data URL",
        ),
        (image_part("data:image/png;base64,###"), "not valid base64"),
    ]
    for part, fragment in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=[user("What?", part)], max_tokens=2)
        assert fragment in caught.value.body["message"], caught.value.body


def test_bad_requests_are_400_in_openai_shape(server) -> None:
    base, _ = server
    hello = [user("hi")]
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client_for(base).chat.completions.create(model=MODEL, messages=hello, n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client_for(base).chat.completions.create(model="gpt-4o", messages=hello)
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"messages": []}, "messages"),
        ({"messages": hello, "max_tokens": "many"}, "max_tokens"),
        ({"messages": hello, "max_tokens": 0}, "max_tokens"),
        ({"messages": hello, "temperature": -1}, "temperature"),
        ({"messages": hello, "top_p": 0}, "top_p"),
        ({"messages": hello, "stop": ""}, "stop"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "alternate"),
        ({"messages": [*hello, {"role": "assistant", "content": "yo"}]}, "last message"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
        ({"messages": [{"role": "user", "content": 5}]}, "string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "'input_audio'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
        ({"messages": [{"role": "user", "content": "look <image> here"}]}, "<image>"),
        ({"messages": [{"role": "system", "content": [image_part("x.png")]}, *hello]}, "only user messages"),
        ({"messages": hello, "tools": [{"type": "function"}]}, "tools"),
    ]
    for body, fragment in cases:
        assert_openai_error(raw_post(base, body), 400, fragment)
    error = assert_openai_error(
        httpx.get(f"{base}/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}), 404
    )
    assert error["type"] == "not_found_error"


def test_hostile_requests_are_4xx_naming_the_problem(server) -> None:
    """What once ended in a 500: each is now a 4xx whose message names the problem."""
    base, _ = server
    hello = [user("hi")]
    media_cases = [
        (video_part("loop-a.mp4"), 400, "cannot be opened"),  # a symlink loop inside the folder
        (image_part("pattern\x00.png"), 400, "control character"),
        (image_part("http://[::1"), 400, "not a valid URL"),
        (image_part("http://127.0.0.1\t.example/x.png"), 400, "control character"),
    ]
    for part, status, fragment in media_cases:
        assert_openai_error(raw_post(base, {"messages": [user("What?", part)]}), status, fragment)
    # '~' is not expanded: an existing user and a made-up one get the same answer
    answers = {
        name: raw_post(base, {"messages": [user("What?", image_part(name))]}).json()["error"]["message"]
        for name in ("~root/x", "~nosuchuser/x.png")
    }
    assert answers == {
        "~root/x": "~root/x: no such file",
        "~nosuchuser/x.png": "~nosuchuser/x.png: no such file",
    }
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    raw_cases = [
        (deep, "nested too deeply"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "Infinity"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}",
            "not valid JSON",
        ),
    ]
    for body, fragment in raw_cases:
        assert_openai_error(raw_post(base, body), 400, fragment)
    param_cases = [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"stop": ["x" * 1000]}, "stop"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"cache_salt": 12}, "cache_salt"),
        ({"cache_salt": "s" * 1000}, "cache_salt"),
    ]
    for extra, param in param_cases:
        error = assert_openai_error(raw_post(base, {"messages": hello, **extra}), 400, param)
        assert error["param"] == param, error
    many = [user("What?", *[image_part("pattern.png")] * 17)]
    assert_openai_error(raw_post(base, {"messages": many}), 400, "more than 16 images and videos")
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_tiny_sampling_values_answer_like_greedy(server) -> None:
    """A temperature of 3e-38 counts as greedy; a top_p of 1e-300 keeps only the likeliest token."""
    base, _ = server
    client = client_for(base)
    messages = [user("Name a shape.")]
    greedy = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    for extra in ({"temperature": 3e-38}, {"temperature": 0.8, "top_p": 1e-300}):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, **extra)
        assert reply.choices[0].message.content == greedy.choices[0].message.content, extra


def test_cache_salt_separates_prefix_caches(server) -> None:
    """Requests with different salts never reuse each other's cached prompt, so cached_tokens tells a
    client nothing about what another asked; the same salt reuses as before."""
    base, _ = server
    client = client_for(base)
    messages = [user("A question nobody else asks: which shapes are to the left of the blue ones?")]

    def cached(**extra) -> int:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached() > 0  # the template's system prompt, shared with earlier unsalted requests
    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") > 0
    assert cached(cache_salt="tenant-b") == 0


def test_animated_gif_data_url_is_a_video(server, media_root: Path) -> None:
    base, _ = server
    client = client_for(base)
    gif = "data:image/gif;base64," + base64.b64encode(animated_gif(frames=6)).decode()
    as_video = client.chat.completions.create(
        model=MODEL, messages=[user("What moves?", video_part(gif))], max_tokens=2
    )
    clip = client.chat.completions.create(
        model=MODEL, messages=[user("What moves?", video_part("bikes.mp4"))], max_tokens=2
    )
    assert as_video.usage.model_extra["visual_tokens"] == clip.usage.model_extra["visual_tokens"] > 0


class HeldPipeline:
    """The real pipeline, except that preparing a prompt that contains HOLD waits until `release` is set
    or the request is cancelled: slow media, on demand. Counts what it saw."""

    def __init__(self, pipeline: Pipeline):
        self._pipeline = pipeline
        self.release = threading.Event()
        self.entered = 0
        self.cancelled = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._pipeline, name)

    def prepare(self, prompt, media, num_frames=None, add_bos=True, *, cancelled=None, **options):
        if "HOLD" in prompt:
            with self._lock:
                self.entered += 1
            while not self.release.wait(0.01):
                if cancelled is not None and cancelled():
                    with self._lock:
                        self.cancelled += 1
                    raise RequestCancelled("stopped while preparing")
        return self._pipeline.prepare(prompt, media, num_frames, add_bos, cancelled=cancelled, **options)


def wait_for(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queue_full_is_429(pipeline: Pipeline) -> None:
    """Two requests held in preparation fill max_queue 1 + batch 1; a third gets 429 until they finish."""
    held = HeldPipeline(pipeline)
    settings = ServeSettings(model_name=MODEL, default_max_tokens=4)
    app = create_app(held, settings, Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=1))
    with running_server(app) as base:
        client = client_for(base)
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [
                pool.submit(client.chat.completions.create, model=MODEL, messages=[user("HOLD on")])
                for _ in range(2)
            ]
            wait_for(lambda: held.entered == 2, what="both requests to be preparing")
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model=MODEL, messages=[user("hi")])
            assert caught.value.response.headers["retry-after"] == "1"
            health = httpx.get(f"{base}/health").json()
            assert health["status"] == "degraded" and "admission" in health["saturated"]
            held.release.set()
            assert all(p.result().choices[0].finish_reason in ("stop", "length") for p in pending)
        # capacity comes back once they are done
        assert client.chat.completions.create(model=MODEL, messages=[user("hi")]).choices
        assert httpx.get(f"{base}/health").json()["status"] == "ok"
    assert api_error_from(QueueFullError("full")).status == 429


def test_body_and_media_too_large_are_413(pipeline: Pipeline, media_root: Path) -> None:
    settings = ServeSettings(
        model_name=MODEL,
        media=MediaPolicy(allowed_dir=media_root, max_bytes=100_000),
        max_body_bytes=200_000,
    )
    app = create_app(pipeline, settings, Engine.for_pipeline(pipeline, max_batch_size=2, max_queue=4))
    with running_server(app) as base:
        client = client_for(base)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL, messages=[user("x" * 300_000)])
        assert caught.value.status_code == 413 and "request body is larger" in caught.value.body["message"]

        def chunked():
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(30):
                yield b"y" * 10_000
            yield b'"}]}'

        assert_openai_error(raw_post(base, chunked(), key=None), 413, "request body is larger")
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=MODEL, messages=[user("What?", video_part("bikes.mp4"))])
        assert caught.value.status_code == 413 and "media limit" in caught.value.body["message"]
        data = base64.b64encode(b"\x00" * 120_000).decode()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=[user("What?", video_part(f"data:video/mp4;base64,{data}"))]
            )
        assert caught.value.status_code == 413
        # no media folder for data URLs is needed, but local paths without one are refused
    bare = create_app(
        pipeline, ServeSettings(model_name=MODEL), Engine.for_pipeline(pipeline, max_batch_size=1)
    )
    with running_server(bare) as base:
        with pytest.raises(openai.PermissionDeniedError, match="--allowed-media-dir"):
            client_for(base).chat.completions.create(
                model=MODEL, messages=[user("What?", video_part(str(media_root / "bikes.mp4")))]
            )


def test_metrics_parse_and_count_requests(server) -> None:
    base, _ = server
    endpoint = "/v1/chat/completions"

    def count(status: str) -> float:
        return samples.get(
            ("videollava_http_requests_total", (("endpoint", endpoint), ("status", status))), 0.0
        )

    samples = metric_samples(base)
    ok_before, bad_before = count("200"), count("400")
    tokens_before = samples[("videollava_completion_tokens_total", ())]
    client = client_for(base)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=[user("Count me.")], max_tokens=3)
    raw_post(base, {"messages": []})
    samples = metric_samples(base)
    assert count("200") == ok_before + 2
    assert count("400") == bad_before + 1
    assert samples[("videollava_completion_tokens_total", ())] >= tokens_before + 2
    for name in (
        "videollava_queue_depth",
        "videollava_running_requests",
        "videollava_tokens_per_second",
        "videollava_engine_tokens_generated_total",
        "videollava_request_latency_seconds_count",
        "videollava_time_to_first_token_seconds_count",
        "videollava_feature_cache_hits_total",
        "videollava_prefix_cache_hits_total",
        "videollava_prefix_cache_reused_tokens_total",
    ):
        assert (name, ()) in samples, name
    assert samples[("videollava_request_latency_seconds_bucket", (("le", "+Inf"),))] >= 2
    assert (
        samples[("videollava_feature_cache_hits_total", ())] > 0
    )  # earlier tests asked about the same clips


def test_client_disconnect_cancels_the_stream(pipeline: Pipeline) -> None:
    settings = ServeSettings(model_name=MODEL)
    engine = Engine.for_pipeline(pipeline, max_batch_size=1, max_queue=2)
    app = create_app(pipeline, settings, engine)
    body = {"messages": [user("Write a very long story.")], "max_tokens": 450, "stream": True}
    with running_server(app) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # one token arrived: the request is running
        deadline = time.monotonic() + 5
        cancelled = {"finish_reason": "cancelled"}
        while counted(app, "videollava_completions_total", **cancelled) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counted(app, "videollava_completions_total", **cancelled) == 1
        assert engine.running == 0
        assert counted(app, "videollava_completion_tokens_total") < 450


def test_serve_command_end_to_end(hf_checkpoint, media_root: Path) -> None:
    arguments = ["--model", str(hf_checkpoint[0]), "--dtype", "float32"]
    arguments += ["--allowed-media-dir", str(media_root), "--served-model-name", MODEL]
    with serve_subprocess(arguments) as served:
        reply = openai.OpenAI(
            base_url=f"{served.base_url}/v1", api_key="none", max_retries=0
        ).chat.completions.create(
            model=MODEL, messages=[user("What?", video_part("bikes.mp4"))], max_tokens=4
        )
        assert reply.usage.model_extra["visual_tokens"] > 0
    assert f"{served.base_url}/v1" in served.output


def test_serve_on_a_busy_port_is_a_one_line_error(capsys) -> None:
    """The port is bound before the model loads: a busy one ends at once with exit 2 and one line, and
    nothing claims the server is up (the model path does not even exist)."""
    from videollava.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        capsys.readouterr()
        assert main(["serve", "--port", str(port), "--model", "/no/such/model"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "is another server using it? choose another --port"
    ]
