"""The HTTP judge against a real OpenAI-style chat server started here: retries, malformed replies,
back-off, the cache on disk, and how the command line's options become a judge."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from videollava.errors import VideoLlavaError
from videollava.eval.judge import VIDEO_QA, VIDEOCHATGPT_AXES, HTTPJudge, JudgeCache, JudgeError, make_judge


class JudgeServer:
    """A chat-completions endpoint on 127.0.0.1 whose replies a function decides; keeps every request.

    `reply(body, attempt)` gets the request body and how often this exact body was sent before, and
    returns (status, content): a 200's content becomes choices[0].message.content.
    """

    def __init__(self, reply: Callable[[dict, int], tuple[int, str]]):
        self.reply = reply
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body, sort_keys=True)
                with server._lock:
                    attempt = server._seen.get(key, 0)
                    server._seen[key] = attempt + 1
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                status, content = server.reply(body, attempt)
                if status == 200:
                    payload = {
                        "id": "x",
                        "object": "chat.completion",
                        "model": body.get("model"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                else:
                    payload = {"error": {"message": content}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def calls(self) -> int:
        return len(self.requests)


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


def fields_of(body: dict) -> dict[str, str]:
    """The question, correct answer and prediction a judge prompt carries, read back from its text."""
    out = {}
    for line in user_text(body).splitlines():
        for key, label in (
            ("question", "Question: "),
            ("answer", "Correct Answer: "),
            ("prediction", "Predicted Answer: "),
        ):
            if line.startswith(label):
                out[key] = line[len(label) :]
    return out


FIELDS = {"question": "What moves?", "answer": "the red circle", "prediction": "a red ball"}


def _judge(server: JudgeServer, tmp_path, **options) -> tuple[HTTPJudge, list[float]]:
    sleeps: list[float] = []
    options = {"backoff": 0.5, "sleep": sleeps.append} | options
    return HTTPJudge(server.url, "judge-1", cache=JudgeCache(tmp_path / "cache.jsonl"), **options), sleeps


def test_verdicts_and_what_is_sent(tmp_path):
    with JudgeServer(lambda body, attempt: (200, "{'pred': 'yes', 'score': 4}")) as server:
        judge, sleeps = _judge(server, tmp_path)
        verdict = judge.verdict(VIDEO_QA, FIELDS)
    assert (verdict["pred"], verdict["score"], verdict["malformed"], verdict["cached"]) == (
        "yes",
        4.0,
        False,
        False,
    )
    assert verdict["raw"] == "{'pred': 'yes', 'score': 4}"
    body = server.requests[0]
    assert body["model"] == "judge-1" and body["temperature"] == 0.0
    assert (
        body["messages"][0]["role"] == "system" and "question-answer pairs" in body["messages"][0]["content"]
    )
    assert fields_of(body) == FIELDS
    assert sleeps == [] and judge.calls == 1


def test_a_malformed_reply_is_retried_with_back_off_then_cached(tmp_path):
    def reply(body, attempt):
        return 200, ("I would say yes" if attempt < 2 else "{'pred': 'no', 'score': 1.5}")

    with JudgeServer(reply) as server:
        judge, sleeps = _judge(server, tmp_path)
        verdict = judge.verdict(VIDEO_QA, FIELDS)
        assert (verdict["pred"], verdict["score"], verdict["attempts"]) == ("no", 1.5, 3)
        assert sleeps == [0.5, 1.0]  # exponential back-off between attempts
        again = judge.verdict(VIDEO_QA, FIELDS)
        assert again["cached"] and again["pred"] == "no" and server.calls == 3
        # A new judge on the same cache file (another run) makes no call either.
        fresh, _ = _judge(server, tmp_path)
        assert fresh.verdict(VIDEO_QA, FIELDS)["cached"] and server.calls == 3
        # ... unless the model, the prompt or the texts differ.
        other = HTTPJudge(
            server.url, "judge-2", cache=JudgeCache(tmp_path / "cache.jsonl"), sleep=lambda s: None
        )
        assert not other.verdict(VIDEO_QA, FIELDS)["cached"]
        assert server.calls == 6  # this server answers a new body badly twice, then well


def test_a_reply_that_stays_malformed_is_reported_not_counted_as_no(tmp_path):
    with JudgeServer(lambda body, attempt: (200, f"no idea ({attempt})")) as server:
        judge, sleeps = _judge(server, tmp_path, reply_attempts=3)
        verdict = judge.verdict(VIDEO_QA, FIELDS)
        assert verdict["malformed"] and verdict["pred"] is None and verdict["score"] is None
        assert verdict["raw_attempts"] == ["no idea (0)", "no idea (1)", "no idea (2)"]
        assert server.calls == 3 and len(sleeps) == 2
        # Not cached: a later run asks again.
        judge.verdict(VIDEO_QA, FIELDS)
        assert server.calls == 6


def test_transport_errors_are_retried_and_refusals_are_not(tmp_path):
    with JudgeServer(lambda body, attempt: (503, "busy") if attempt < 2 else (200, "{'score': 3}")) as server:
        judge, sleeps = _judge(server, tmp_path)
        assert judge.verdict(VIDEOCHATGPT_AXES["detail"], FIELDS)["score"] == 3.0
        assert server.calls == 3 and sleeps == [0.5, 1.0]
    with JudgeServer(lambda body, attempt: (401, "bad key")) as server:
        judge, _ = _judge(server, tmp_path)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.verdict(VIDEO_QA, FIELDS | {"prediction": "x"})
        assert server.calls == 1
    with JudgeServer(lambda body, attempt: (500, "down")) as server:
        judge, _ = _judge(server, tmp_path, http_attempts=3)
        with pytest.raises(JudgeError, match="failed 3 times"):
            judge.verdict(VIDEO_QA, FIELDS | {"prediction": "y"})
        assert server.calls == 3


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    with JudgeServer(lambda body, attempt: (200, "{'pred': 'yes', 'score': 5}")) as server:
        judge, _ = _judge(server, tmp_path)
        judge.verdict(VIDEO_QA, FIELDS)
        with path.open("a") as handle:
            handle.write('{"key": "abc", "verdict": {"pr')  # a writer killed mid-line
        fresh, _ = _judge(server, tmp_path)
        assert fresh.verdict(VIDEO_QA, FIELDS)["cached"]
        assert server.calls == 1


def test_options_to_judge(tmp_path, monkeypatch):
    assert make_judge(None, None, None, None, None) is None
    assert make_judge("exact", None, None, None, None).model == "exact"
    with pytest.raises(VideoLlavaError, match="--judge-model"):
        make_judge(None, "http://127.0.0.1:1/v1", None, None, None)
    with pytest.raises(VideoLlavaError, match="needs --judge-url"):
        make_judge(None, None, "gpt", None, None)
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(VideoLlavaError, match="MY_JUDGE_KEY"):
        make_judge(None, "http://127.0.0.1:1/v1", "gpt", "MY_JUDGE_KEY", None)
    monkeypatch.setenv("MY_JUDGE_KEY", "sekrit")
    with JudgeServer(lambda body, attempt: (200, "{'pred': 'yes', 'score': 5}")) as server:
        judge = make_judge("http", server.url, "gpt", "MY_JUDGE_KEY", tmp_path / "c.jsonl")
        judge.verdict(VIDEO_QA, FIELDS)
        judge.close()
    assert server.headers[0]["Authorization"] == "Bearer sekrit"


def test_prompt_texts_from_a_file_replace_the_built_in_ones(tmp_path):
    from videollava.eval.judge import MM_VET, load_prompts

    path = tmp_path / "prompts.json"
    path.write_text(
        json.dumps({"mm-vet": {"user": "Grade {prediction} against {answer} for {question}; {{0-1}}"}})
    )
    prompts = load_prompts(path)
    assert prompts["mm-vet"].reply == MM_VET.reply and prompts["mm-vet"].hash != MM_VET.hash
    with JudgeServer(lambda body, attempt: (200, "0.5")) as server:
        judge, _ = _judge(server, tmp_path)
        judge.overrides = prompts
        assert judge.verdict(MM_VET, FIELDS)["score"] == 0.5
    assert user_text(server.requests[0]) == "Grade a red ball against the red circle for What moves?; {0-1}"
    for bad, message in [
        ({"nope": {"user": "x"}}, "unknown prompt 'nope'"),
        ({"mm-vet": {"user": "{context}"}}, r"uses \['context'\]"),
        ({"mm-vet": {"system": "only"}}, 'needs a "user" text'),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(VideoLlavaError, match=message):
            load_prompts(path)
