"""`vllm serve` on a checkpoint videollava saved answers the official OpenAI client like `videollava ask`."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.vllm.conftest import MAX_TOKENS, ask_batch

STARTUP_SECONDS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(temporal_checkpoint, media, tmp_path_factory):
    """(base URL, model name) of a running server; its log is printed if it does not come up."""
    from videollava.vllm import serve_command

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = serve_command(
        str(temporal_checkpoint),
        *("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "8"),
        *(
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--allowed-local-media-path",
            str(media["clip"].parent),
        ),
    )
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
        yield f"{base}/v1", str(temporal_checkpoint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def asked(temporal_checkpoint, media, tmp_path_factory):
    requests = [
        {"id": "image", "prompt": "Describe the image briefly.", "image": str(media["wide"])},
        {"id": "video", "prompt": "What happens in the video?", "video": str(media["clip"])},
    ]
    return {a["id"]: a for a in ask_batch(temporal_checkpoint, requests, tmp_path_factory.mktemp("ask"))}


def _messages(kind: str, media) -> list[dict]:
    if kind == "image":
        data = base64.b64encode(media["wide"].read_bytes()).decode()
        part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
        question = "Describe the image briefly."
    else:
        part = {"type": "video_url", "video_url": {"url": media["clip"].as_uri()}}
        question = "What happens in the video?"
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key="unused", timeout=120)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_answers_match_ask(server, asked, media, kind):
    reply = _client(server).chat.completions.create(
        model=server[1],
        messages=_messages(kind, media),
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert reply.choices[0].model_extra["token_ids"] == asked[kind]["token_ids"]
    assert reply.usage.prompt_tokens == asked[kind]["prompt_tokens"]
    assert reply.choices[0].message.content.strip() == asked[kind]["answer"]


def test_streamed_video_answer_matches_ask(server, asked, media):
    stream = _client(server).chat.completions.create(
        model=server[1], messages=_messages("video", media), max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces).strip() == asked["video"]["answer"]


def test_eight_concurrent_clients_all_get_answers(server, media):
    def ask(number: int):
        return _client(server).chat.completions.create(
            model=server[1],
            messages=_messages("video" if number % 2 else "image", media),
            max_tokens=MAX_TOKENS,
            temperature=0,
        )

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert all(r.choices[0].finish_reason == "length" for r in replies)
    assert all(r.usage.completion_tokens == MAX_TOKENS for r in replies)
