"""`videollava serve`: an OpenAI-compatible chat completions server over one continuously batching engine.

Requests are parsed and checked on the event loop; remote media are fetched there too (asynchronously,
each fetch under one deadline, in a bounded number of slots), local files read and media encoded in
worker threads, then the request is submitted to the engine, whose thread-side stream is carried back
to the loop by a small pump thread per request, so the loop never blocks on the model.

One request never hurts another: fetching, reading and encoding each have their own bounded pool, so
a slow remote host holds up nothing but its own request; a client that goes away stops its fetch, its
preparation and its generation, and gives back its place at once. Every refusal is an OpenAI-style
JSON error with a meaningful status; a genuine server error is logged with its traceback under a
request id, and the client gets that id, never the internals.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from videollava.data.conversation import ASSISTANT, USER, build_prompt
from videollava.data.tokenize import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    check_placeholders,
    count_placeholders,
)
from videollava.errors import PromptError, RequestCancelled, VideoLlavaError
from videollava.infer.engine import Engine, Handle, QueueFullError
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import Completion, MediaItem, Prepared, StreamDelta
from videollava.infer.sampling import SamplingParams
from videollava.serve.media import (
    MediaForbiddenError,
    MediaPolicy,
    MediaTooLargeError,
    fetch_media,
    is_remote,
    resolve_media,
)
from videollava.serve.metrics import ServerMetrics

log = logging.getLogger("videollava.serve")

CHAT_PATH = "/v1/chat/completions"
_KNOWN_PATHS = (CHAT_PATH, "/v1/models", "/health", "/metrics")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
# More images and videos than any context holds: 16 images of 256 visual tokens fill 4096 positions.
MAX_MEDIA_PARTS = 16
MAX_CACHE_SALT_CHARS = 256
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# settings and errors


@dataclass
class ServeSettings:
    """What one server instance allows and how much work it takes on."""

    model_name: str = "videollava"
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_body_bytes: int = 48 * 2**20
    default_max_tokens: int = 256
    prepare_workers: int = 2  # threads encoding media (CPU)
    read_workers: int = 4  # threads reading local files and decoding data URLs (disk)
    max_remote_fetches: int = 16  # requests fetching remote media at once; more get 429


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, error.type, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


def internal_error(request_id: str, what: str = "internal server error") -> APIError:
    """What a client learns of a server fault: that it happened, and the id to find it in the log."""
    return APIError(
        500,
        f"{what} (request id {request_id}; the server log has the details)",
        "server_error",
        code="internal_error",
    )


def generation_failed(completion: Completion) -> str:
    """The engine's account of a failed generation meant for the caller (its `error` is for the log)."""
    return f"generation failed: {completion.client_error}" if completion.client_error else "generation failed"


def busy_error(message: str, code: str) -> APIError:
    return APIError(429, message, "rate_limit_error", None, code, {"Retry-After": "1"})


def api_error_from(error: Exception) -> APIError:
    """The status and shape a library error is answered with."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestCancelled):
        return APIError(CLIENT_CLOSED, "client closed the request", code="client_closed_request")
    if isinstance(error, MediaForbiddenError):
        return APIError(403, str(error), "permission_error", "messages", "media_forbidden")
    if isinstance(error, MediaTooLargeError):
        return APIError(413, str(error), "invalid_request_error", "messages", "media_too_large")
    if isinstance(error, QueueFullError):
        return busy_error(str(error), "queue_full")
    if isinstance(error, VideoLlavaError):
        return APIError(400, str(error), "invalid_request_error", "messages", None)
    return APIError(500, "internal server error", "server_error")


# --------------------------------------------------------------------------------------------
# request parsing


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_body(raw: bytes) -> Any:
    """The body as JSON, strictly: no NaN or Infinity, and nesting bounded by the parser's recursion limit."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON (it is nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, integers of thousands of digits
        raise APIError(400, f"the request body is not valid JSON ({error})") from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields this server honours; others are accepted and ignored, like most servers do."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what a 64-bit generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    num_frames: int | None = Field(default=None, ge=1, le=64)
    # vLLM's field: requests with different salts never share prefix-cache entries (nor learn of each other's)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)


@dataclass
class Turn:
    role: str
    text: str
    media: list[tuple[str, str]] = field(default_factory=list)  # (kind, url) in message order


@dataclass
class ChatRequest:
    """A checked request: the conversation, its media URLs and the sampling parameters."""

    system: str | None
    turns: list[Turn]
    params: SamplingParams
    stream: bool
    include_usage: bool
    num_frames: int | None
    cache_salt: str | None = None

    @property
    def media(self) -> list[tuple[str, str]]:
        """Every (kind, url) of the conversation, in message order."""
        return [part for turn in self.turns for part in turn.media]


def parse_chat_request(body: Any, settings: ServeSettings) -> ChatRequest:
    """Check a request body without touching any media, so refusals are cheap."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    if request.model is not None and request.model != settings.model_name:
        raise APIError(
            404,
            f"the model {request.model!r} does not exist; this server serves {settings.model_name!r}",
            param="model",
            code="model_not_found",
        )
    if request.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    for unsupported in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(unsupported):
            raise APIError(400, f"{unsupported} are not supported by this server", param=unsupported)
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        raise APIError(400, "only text responses are supported", param="response_format")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(
            400,
            f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters",
            param="stop",
        )
    max_tokens = request.max_completion_tokens or request.max_tokens or settings.default_max_tokens
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=request.temperature if request.temperature is not None else 0.0,
            top_p=request.top_p if request.top_p is not None else 1.0,
            seed=request.seed,
            stop=stop,
        )
    except VideoLlavaError as error:  # the message names the parameter; name it as the request did
        length_field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        message = str(error).replace("max_new_tokens", length_field)
        fields = ("temperature", "top_p", "seed", "stop", length_field)
        raise APIError(400, message, param=next((f for f in fields if message.startswith(f)), None)) from None
    system, turns = parse_messages(request.messages)
    return ChatRequest(
        system=system,
        turns=turns,
        params=params,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        num_frames=request.num_frames,
        cache_salt=request.cache_salt,
    )


def parse_messages(messages: list[dict[str, Any]]) -> tuple[str | None, list[Turn]]:
    """System text and the user/assistant turns, with every content part checked."""
    system: list[str] = []
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            text, media = _parse_content(content, f"{where}.content", allow_media=False)
            system.append(text)
        elif role in (USER, ASSISTANT):
            if role == ASSISTANT and (message.get("tool_calls") or message.get("function_call")):
                raise APIError(400, f"{where}: tool calls are not supported", param=where)
            text, media = _parse_content(content, f"{where}.content", allow_media=role == USER)
            turns.append(Turn(role, text, media))
        else:
            raise APIError(
                400, f"{where}: role {role!r} is not supported; use system, user or assistant", param=where
            )
    if not turns:
        raise APIError(400, "messages hold no user message", param="messages")
    for number, turn in enumerate(turns):
        expected = USER if number % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise APIError(
                400,
                "user and assistant messages must alternate, starting with the user"
                f" (message {number + 1} is from the {turn.role})",
                param="messages",
            )
    if turns[-1].role != USER:
        raise APIError(400, "the last message must be from the user", param="messages")
    if sum(len(turn.media) for turn in turns) > MAX_MEDIA_PARTS:
        raise APIError(400, f"messages hold more than {MAX_MEDIA_PARTS} images and videos", param="messages")
    return ("\n".join(system) if system else None), turns


def _parse_content(content: Any, where: str, allow_media: bool) -> tuple[str, list[tuple[str, str]]]:
    if isinstance(content, str):
        return content, []
    if content is None:
        raise APIError(400, f"{where} is missing", param=where)
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of parts", param=where)
    texts: list[str] = []
    media: list[tuple[str, str]] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{here} must be an object with a type", param=here)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{here}.text must be a string", param=here)
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            if not allow_media:
                raise APIError(400, f"{here}: only user messages can hold images and videos", param=here)
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise APIError(400, f'{here}.{kind} must be {{"url": "..."}}', param=here)
            media.append((kind.removesuffix("_url"), url))
        else:
            raise APIError(
                400,
                f"{here}: content part type {kind!r} is not supported; use text, image_url or video_url",
                param=here,
            )
    return "\n".join(texts), media


def turn_text(text: str, n_images: int, n_videos: int) -> str:
    """A user turn as the template sees it: placeholders first unless the text places them itself."""
    if any(count_placeholders(text)):
        check_placeholders(text, n_images, n_videos)
        return text
    if n_images or n_videos:
        return VIDEO_PLACEHOLDER * n_videos + IMAGE_PLACEHOLDER * n_images + "\n" + text
    return text


def read_chat_media(
    chat: ChatRequest, fetched: dict[int, MediaItem], policy: MediaPolicy, cancelled: Callable[[], bool]
) -> list[MediaItem]:
    """Every image and video of the conversation, in message order: remote ones already fetched, the
    others read here (a worker thread: files wait on disks)."""
    items: list[MediaItem] = []
    for index, (kind, url) in enumerate(chat.media):
        if cancelled():
            raise RequestCancelled("the client closed the connection")
        items.append(fetched[index] if index in fetched else resolve_media(url, kind, policy))
    return items


def prepare_chat(
    pipeline: Pipeline, chat: ChatRequest, media: list[MediaItem], cancelled: Callable[[], bool]
) -> Prepared:
    """Build the prompt and encode the media: CPU work, so it runs off the event loop, and stops
    (RequestCancelled) between decoding stages once `cancelled()` turns true."""
    history: list[tuple[str, str]] = []
    for turn in chat.turns[:-1]:
        if turn.role == ASSISTANT:
            if any(count_placeholders(turn.text)):
                raise PromptError("an assistant message contains a media placeholder")
            # the template already puts a space after "ASSISTANT:"; answers as generated follow it
            history.append((ASSISTANT, turn.text.strip()))
        else:
            n_images = sum(k == "image" for k, _ in turn.media)
            history.append((USER, turn_text(turn.text, n_images, len(turn.media) - n_images)))
    last = chat.turns[-1]
    n_images = sum(k == "image" for k, _ in last.media)
    n_videos = len(last.media) - n_images
    if chat.system is None:
        prompt = pipeline.build_prompt(last.text, n_images, n_videos, history=history)
    else:
        template = pipeline.template
        if template.style == "two":
            template = dataclasses.replace(template, system=chat.system)
        prompt = build_prompt(last.text, n_images, n_videos, template, history)
    return pipeline.prepare(prompt, media, num_frames=chat.num_frames, cancelled=cancelled)


# --------------------------------------------------------------------------------------------
# one request never hurts another: client watch, bounded pools


def _forget(task: asyncio.Future) -> None:
    """Collect the outcome of work nobody waits for any more, so it is not reported as lost."""
    if not task.cancelled():
        task.exception()


class ClientWatch:
    """Notices the client going away: for the event loop (to stop waiting), for worker threads (a flag
    they poll between stages) and for callbacks (to cancel a generation).

    After the body is read, the only message left for a request is `http.disconnect`: a task waits
    for it, so a departure is seen at once, even while nothing is being sent.
    """

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]):
        self.stage = "parse"  # where the request is: parse, fetch, read, prepare, generate
        self._gone = threading.Event()
        self._gone_async = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a connection that cannot be read from has no one left at its end
            log.debug("receive failed while watching for a disconnect", exc_info=True)
        self._gone.set()
        self._gone_async.set()
        for callback in self._callbacks:
            callback()

    def cancelled(self) -> bool:
        """True once the client has gone; safe to call from any thread."""
        return self._gone.is_set()

    def on_gone(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        if self.cancelled():
            callback()

    async def run(self, work: Awaitable[T]) -> T:
        """The result of `work`, or RequestCancelled (with `work` cancelled) if the client goes first."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self._gone_async.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            finished = task.done()
            if not finished:
                task.cancel()
                task.add_done_callback(_forget)
        if not finished:
            raise RequestCancelled("the client closed the connection")
        return task.result()

    def close(self) -> None:
        self._task.cancel()


class WorkPool:
    """A thread pool that counts the tasks it holds, so /health can tell when it is saturated.

    Work of a request cancelled before a worker takes it up never runs; work already running stops
    at its own pace (it sees the same cancellation between stages).
    """

    def __init__(self, name: str, workers: int):
        self.name = name
        self.workers = max(1, workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"videollava-{name}")
        self._held = 0
        self._lock = threading.Lock()

    async def run(self, cancelled: Callable[[], bool], function: Callable[..., T], *args: Any) -> T:
        def work() -> T:
            if cancelled():
                raise RequestCancelled("the client closed the connection")
            return function(*args)

        with self._lock:
            self._held += 1
        future = self._executor.submit(work)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future) -> None:
        with self._lock:
            self._held -= 1

    @property
    def saturated(self) -> bool:
        """Every worker busy and work waiting for one."""
        return self._held > self.workers

    def state(self) -> dict[str, int]:
        held = self._held
        return {
            "busy": min(held, self.workers),
            "waiting": max(0, held - self.workers),
            "workers": self.workers,
        }

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class FetchSlots:
    """At most `limit` requests fetch remote media at once; a request that finds none free gets 429
    rather than waiting, so slow hosts cost their own requests only. Used on the event loop alone."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.busy = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.busy >= self.limit:
            raise busy_error(
                f"all {self.limit} remote media fetches are in progress; try again later", "remote_fetch_busy"
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    @property
    def saturated(self) -> bool:
        return self.busy >= self.limit

    def state(self) -> dict[str, int]:
        return {"busy": self.busy, "limit": self.limit}


# --------------------------------------------------------------------------------------------
# the engine bridge


class EngineBridge:
    """Carries one Handle's events from the engine thread to the event loop, without blocking the loop."""

    def __init__(
        self, handle: Handle, loop: asyncio.AbstractEventLoop, on_done: Callable[[Completion], None]
    ):
        self.handle = handle
        self.queue: asyncio.Queue[StreamDelta | Completion] = asyncio.Queue()
        self._loop = loop
        self._on_done = on_done
        threading.Thread(target=self._pump, name="videollava-stream", daemon=True).start()

    def _pump(self) -> None:
        for delta in self.handle:
            self._put(delta)
        completion = self.handle.result()
        self._on_done(completion)
        self._put(completion)

    def _put(self, item: StreamDelta | Completion) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody will read
            self.handle.cancel()

    async def completion(self) -> Completion:
        while True:
            item = await self.queue.get()
            if isinstance(item, Completion):
                return item


class _EventStream(StreamingResponse):
    """A server-sent event stream that cancels its generation however the response ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def usage_json(completion: Completion) -> dict[str, Any]:
    generated = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
        "visual_tokens": completion.visual_tokens,
        "prompt_tokens_details": {"cached_tokens": completion.reused_prefix_tokens},
    }


# --------------------------------------------------------------------------------------------
# the app


class _Guard:
    """ASGI middleware, outermost: request id, API key, body size limit, per-status request counts,
    and the last word on any exception nobody else answered (500 with the id, traceback in the log)."""

    def __init__(self, app, settings: ServeSettings, metrics: ServerMetrics):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = (
            path if path in _KNOWN_PATHS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        )
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status_seen: list[int] = []

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send, path)
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, scope.get("method"), path)
            if status_seen:  # a stream already under way: it can only be cut short
                return
            await _send_error(counting_send, internal_error(request_id))
        finally:
            # no response at all: the client left before one was due
            self.metrics.observe_request(endpoint, status_seen[0] if status_seen else CLIENT_CLOSED)

    async def _guarded(self, scope, receive, send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.settings.api_key
        if key and (path.startswith("/v1") or path == "/metrics"):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if not given:
                await _send_error(
                    send,
                    APIError(
                        401,
                        "missing API key: send 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
                return
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                await _send_error(
                    send,
                    APIError(
                        401,
                        "incorrect API key",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    ),
                )
                return
        limit = self.settings.max_body_bytes
        too_large = APIError(
            413, f"the request body is larger than {limit / 2**20:g} MiB", code="request_too_large"
        )
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, too_large)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error_body(error.message, error.type, error.param, error.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(pipeline: Pipeline, settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    """The server app; the engine is started when the app starts and stopped when it stops."""
    engine = engine or Engine.for_pipeline(pipeline)
    metrics = ServerMetrics()
    # Fetching waits on other hosts, reading on disks, encoding keeps the CPU busy: each has its own
    # bound, so none of them can hold up requests that do not need it.
    fetch_slots = FetchSlots(settings.max_remote_fetches)
    readers = WorkPool("read", settings.read_workers)
    preparers = WorkPool("prepare", settings.prepare_workers)
    capacity = engine.max_queue + engine.max_batch_size
    in_flight = 0  # admitted requests: being read or prepared, or held by the engine
    in_flight_lock = threading.Lock()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            readers.shutdown()
            preparers.shutdown()

    app = FastAPI(title="Video-LLaVA", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, settings=settings, metrics=metrics)
    app.state.engine = engine
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error_response(
            APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), kind))

    def full_error() -> APIError:
        return busy_error(f"the server holds {in_flight} requests; try again later", "queue_full")

    def admit() -> None:
        nonlocal in_flight
        with in_flight_lock:
            if in_flight >= capacity:
                raise full_error()
            in_flight += 1

    def release() -> None:
        nonlocal in_flight
        with in_flight_lock:
            in_flight -= 1

    def finished(completion: Completion) -> None:
        metrics.observe_completion(completion)
        release()

    def pool_states() -> tuple[dict[str, dict[str, int]], list[str]]:
        pools = {
            "remote_fetch": fetch_slots.state(),
            "read": readers.state(),
            "prepare": preparers.state(),
            "admission": {"busy": in_flight, "limit": capacity},
            "engine_queue": {"waiting": engine.queue_depth, "limit": engine.max_queue},
        }
        saturated = [
            name
            for name, full in (
                ("remote_fetch", fetch_slots.saturated),
                ("read", readers.saturated),
                ("prepare", preparers.saturated),
                ("admission", in_flight >= capacity),
                ("engine_queue", engine.queue_depth >= engine.max_queue),
            )
            if full
        ]
        return pools, saturated

    @app.get("/health")
    async def health() -> dict[str, Any]:
        pools, saturated = pool_states()
        return {
            "status": "degraded" if saturated else "ok",
            "saturated": saturated,
            "model": settings.model_name,
            "queue_depth": engine.queue_depth,
            "running": engine.running,
            "pools": pools,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            metrics.render(engine, pipeline.feature_cache),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "videollava"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != settings.model_name:
            raise APIError(
                404, f"the model {name!r} does not exist", "not_found_error", "model", "model_not_found"
            )
        return model_card()

    async def fetch_remote(chat: ChatRequest, watch: ClientWatch) -> dict[int, MediaItem]:
        """The request's http(s) media by position, fetched in one slot; before admission, so a slow host
        holds a fetch slot and nothing else."""
        wanted = [(i, kind, url) for i, (kind, url) in enumerate(chat.media) if is_remote(url)]
        if not wanted:
            return {}
        fetched: dict[int, MediaItem] = {}
        with fetch_slots.hold():
            for index, kind, url in wanted:
                fetched[index] = await watch.run(fetch_media(url, kind, settings.media))
        return fetched

    async def start(chat: ChatRequest, watch: ClientWatch) -> Handle:
        """Fetch, read, prepare and submit; each stage stops when the client goes, and a request that
        does not reach the engine gives its place back at once."""
        if in_flight >= capacity:  # refuse before fetching anything
            raise full_error()
        watch.stage = "fetch"
        fetched = await fetch_remote(chat, watch)
        admit()
        try:
            watch.stage = "read"
            media: list[MediaItem] = []
            if chat.media:
                media = await watch.run(
                    readers.run(
                        watch.cancelled, read_chat_media, chat, fetched, settings.media, watch.cancelled
                    )
                )
            watch.stage = "prepare"
            prepared = await watch.run(
                preparers.run(watch.cancelled, prepare_chat, pipeline, chat, media, watch.cancelled)
            )
            if watch.cancelled():
                raise RequestCancelled("the client closed the connection")
            handle = engine.submit(prepared, chat.params, cache_salt=chat.cache_salt)
        except BaseException:
            release()
            raise
        watch.stage = "generate"
        watch.on_gone(handle.cancel)
        return handle

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request):
        request_id = request.state.request_id
        chat = parse_chat_request(parse_json_body(await request.body()), settings)
        watch = ClientWatch(request.receive)
        streaming = False
        try:
            handle = await start(chat, watch)
            bridge = EngineBridge(handle, asyncio.get_running_loop(), finished)
            if chat.stream:
                streaming = True

                def closed() -> None:
                    if not handle.done:  # the client left mid-stream
                        metrics.observe_cancelled("generate")
                    handle.cancel()
                    watch.close()

                return _EventStream(
                    stream_chunks(bridge, request_id, settings.model_name, chat.include_usage), closed
                )
            completion = await watch.run(bridge.completion())
            if completion.finish_reason == "cancelled" and watch.cancelled():
                raise RequestCancelled("the client closed the connection")
        except RequestCancelled:
            metrics.observe_cancelled(watch.stage)
            return error_response(api_error_from(RequestCancelled()))
        except VideoLlavaError as error:
            raise api_error_from(error) from None
        finally:
            if not streaming:
                watch.close()
        if completion.finish_reason == "cancelled":  # stopped by the server (shutting down)
            raise APIError(503, "the server stopped the request; try again", "server_error")
        if completion.finish_reason == "error":
            log.error("request %s: generation failed: %s", request_id, completion.error)
            raise internal_error(request_id, generation_failed(completion))
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "logprobs": None,
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": usage_json(completion),
        }

    return app


async def stream_chunks(
    bridge: EngineBridge, request_id: str, model_name: str, include_usage: bool
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events: the role, the text as it comes, the finish reason, then [DONE]."""
    created = int(time.time())
    completion_id = f"chatcmpl-{request_id}"

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        payload = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            item = await bridge.queue.get()
            if isinstance(item, StreamDelta):
                if item.text:
                    yield chunk({"content": item.text})
                continue
            if item.finish_reason == "error":
                log.error("request %s: generation failed: %s", request_id, item.error)
                error = internal_error(request_id, generation_failed(item))
                yield f"data: {json.dumps(error_body(error.message, error.type, error.param, error.code))}\n\n"
            elif item.finish_reason in ("stop", "length"):
                yield chunk({}, item.finish_reason)
                if include_usage:
                    payload = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_name,
                        "choices": [],
                        "usage": usage_json(item),
                    }
                    yield f"data: {json.dumps(payload)}\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        bridge.handle.cancel()  # a no-op when finished; stops generation when the client went away


# --------------------------------------------------------------------------------------------
# CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat completions API",
        description="Serve /v1/chat/completions (with images and videos), /v1/models, /health and /metrics.",
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: bundled ShapesWorld model)"
    )
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: folder name)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VIDEOLLAVA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $VIDEOLLAVA_API_KEY, else none)",
    )
    parser.add_argument(
        "--allowed-media-dir",
        default=None,
        metavar="DIR",
        help="folder whose files requests may name by path or file:// URL (default: no local files)",
    )
    parser.add_argument(
        "--allow-remote-media",
        nargs="+",
        default=[],
        metavar="DOMAIN",
        help="domains (and their subdomains) whose http(s) media URLs are fetched (default: none)",
    )
    parser.add_argument(
        "--remote-timeout",
        type=float,
        default=20.0,
        help="seconds to fetch one remote media item, all told: connecting, headers and body",
    )
    parser.add_argument(
        "--max-remote-fetches",
        type=int,
        default=16,
        help="requests fetching remote media at once; more are answered 429 (default: 16)",
    )
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together")
    parser.add_argument("--max-body-mb", type=float, default=48.0, help="largest request body (413 above)")
    parser.add_argument("--max-media-mb", type=float, default=32.0, help="largest image or video (413 above)")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length when a request sets none")
    parser.add_argument(
        "--frames", type=int, default=None, help="frames sampled per video (default: the model's)"
    )
    parser.set_defaults(func=run)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, made before the model loads: a busy port is then an
    error at once, and nothing is printed that claims the server is up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise VideoLlavaError(f"--host {host}: not an address of this machine ({error})") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # reuse only after TIME_WAIT
    try:
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        raise VideoLlavaError(
            f"cannot listen on {host}:{port} ({error.strerror}); is another server using it? choose another --port"
        ) from None
    return listener


def run(args: argparse.Namespace) -> int:
    for name in ("max_queue", "max_batch_size", "max_tokens", "max_remote_fetches"):
        if getattr(args, name) < 1:
            raise VideoLlavaError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_body_mb <= 0 or args.max_media_mb <= 0:
        raise VideoLlavaError("--max-body-mb and --max-media-mb must be positive")
    if not args.remote_timeout > 0:
        raise VideoLlavaError("--remote-timeout must be positive")
    if not 0 <= args.port <= 65535:
        raise VideoLlavaError(f"--port {args.port}: not a port number (0 to 65535)")
    media_dir = None
    if args.allowed_media_dir:
        media_dir = Path(args.allowed_media_dir).expanduser()
        if not media_dir.is_dir():
            raise VideoLlavaError(f"--allowed-media-dir {media_dir}: not a folder")
    listener = listening_socket(args.host, args.port)
    try:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        pipeline = Pipeline.from_pretrained(args.model, dtype=args.dtype, num_frames=args.frames)
        name = args.served_model_name or (Path(args.model).name if args.model else "videollava-shapesworld")
        settings = ServeSettings(
            model_name=name,
            api_key=args.api_key,
            media=MediaPolicy(
                allowed_dir=media_dir,
                allowed_domains=args.allow_remote_media,
                max_bytes=int(args.max_media_mb * 2**20),
                fetch_timeout=args.remote_timeout,
            ),
            max_body_bytes=int(args.max_body_mb * 2**20),
            default_max_tokens=args.max_tokens,
            max_remote_fetches=args.max_remote_fetches,
        )
        engine = Engine.for_pipeline(pipeline, max_batch_size=args.max_batch_size, max_queue=args.max_queue)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            log.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
        app = create_app(pipeline, settings, engine)
        port = listener.getsockname()[1]
        shown_host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"serving {name!r} on http://{shown_host}:{port}/v1", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    finally:
        listener.close()
    return 0
