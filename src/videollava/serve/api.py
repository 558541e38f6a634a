"""`videollava serve`: an OpenAI-compatible chat completions server over one continuously batching engine.

Requests are parsed and checked on the event loop; remote media are fetched there too (asynchronously,
each fetch under one deadline, in a bounded number of slots), local files read and media encoded in
worker threads, then the request is submitted to the engine, whose thread-side stream is carried back
to the loop by a small pump thread per request, so the loop never blocks on the model.

One request never hurts another: fetching, reading and encoding each have their own bounded pool, so
a slow remote host holds up nothing but its own request; a client that goes away stops its fetch, its
preparation and its generation, and gives back its place at once (`serve.isolation`). Every refusal is
an OpenAI-style JSON error with a meaningful status (`serve.protocol` checks requests and writes the
JSON); a genuine server error is logged with its traceback under a request id, and the client gets that
id, never the internals.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from videollava.arguments import add_model_options, add_visual_tokens_option
from videollava.data.conversation import ChatHistory
from videollava.errors import RequestCancelled, VideoLlavaError
from videollava.infer.engine import Engine, Handle, QueueFullError
from videollava.infer.pipeline import Pipeline
from videollava.infer.request import Completion, MediaItem, Prepared, StreamDelta
from videollava.serve.isolation import ClientWatch, EngineBridge, FetchSlots, WorkPool
from videollava.serve.media import (
    MediaForbiddenError,
    MediaPolicy,
    MediaTooLargeError,
    fetch_media,
    is_remote,
    resolve_frames,
    resolve_media,
)
from videollava.serve.metrics import ServerMetrics
from videollava.serve.ports import add_address_options, claim_port
from videollava.serve.protocol import (
    STREAM_END,
    APIError,
    ChatRequest,
    busy_error,
    chunk_event,
    completion_body,
    error_event,
    internal_error,
    parse_chat_request,
    parse_json_body,
    usage_json,
)

log = logging.getLogger("videollava.serve")

CHAT_PATH = "/v1/chat/completions"
_KNOWN_PATHS = (CHAT_PATH, "/v1/models", "/health", "/metrics")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away before the answer


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
    # A user message's image parts (two or more, no video) are the frames of one video, as lmms-eval
    # sends the videos it decodes itself.
    image_frames_as_video: bool = False


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def generation_failed(completion: Completion) -> str:
    """The engine's account of a failed generation meant for the caller (its `error` is for the log)."""
    return f"generation failed: {completion.client_error}" if completion.client_error else "generation failed"


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
# media and prompt


def read_chat_media(
    chat: ChatRequest, fetched: dict[int, MediaItem], policy: MediaPolicy, cancelled: Callable[[], bool]
) -> list[MediaItem]:
    """Every image and video of the conversation, in message order: remote ones already fetched, the
    others read here (a worker thread: files wait on disks)."""
    items: list[MediaItem] = []
    for index, (kind, url) in enumerate(chat.media):
        if cancelled():
            raise RequestCancelled("the client closed the connection")
        if index in fetched:
            items.append(fetched[index])
        elif isinstance(url, tuple):
            items.append(resolve_frames(url, policy))
        else:
            items.append(resolve_media(url, kind, policy))
    return items


def prepare_chat(
    pipeline: Pipeline, chat: ChatRequest, media: list[MediaItem], cancelled: Callable[[], bool]
) -> Prepared:
    """Build the prompt and encode the media (in message order): CPU work, so it runs off the event loop,
    and stops (RequestCancelled) between decoding stages once `cancelled()` turns true."""
    history: ChatHistory[MediaItem] = ChatHistory(pipeline.template, system=chat.system)
    shown = iter(media)
    *earlier, last = chat.turns
    for question, answer in zip(earlier[::2], earlier[1::2], strict=True):
        history.add(question.text, [next(shown) for _ in question.media], answer.text)
    prompt = history.prompt(last.text, list(shown))
    return pipeline.prepare(
        prompt, media, num_frames=chat.num_frames, cancelled=cancelled, visual_tokens=chat.visual_tokens
    )


# --------------------------------------------------------------------------------------------
# streaming


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
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def create_app(pipeline: Pipeline, settings: ServeSettings, engine: Engine | None = None) -> FastAPI:
    """The server app; the engine is started when the app starts and stopped when it stops."""
    engine = engine or Engine.for_pipeline(pipeline)
    metrics = ServerMetrics(engine, pipeline.feature_cache)
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
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

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
        wanted = [
            (i, kind, url)
            for i, (kind, url) in enumerate(chat.media)
            if isinstance(url, str) and is_remote(url)
        ]
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
        body = parse_json_body(await request.body())
        chat = parse_chat_request(
            body, settings.model_name, settings.default_max_tokens, settings.image_frames_as_video
        )
        watch = ClientWatch(request.receive)
        streaming = False
        try:
            handle = await start(chat, watch)
            bridge = EngineBridge(handle, asyncio.get_running_loop(), finished)
            if chat.stream:
                streaming = True

                def closed() -> None:
                    # The stream's own end cancels the handle too, so `handle.done` cannot tell
                    # whether the client left: whether the answer's end was sent can.
                    if not bridge.delivered:  # the client left mid-stream
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
        return completion_body(f"chatcmpl-{request_id}", settings.model_name, completion)

    return app


async def stream_chunks(
    bridge: EngineBridge, request_id: str, model_name: str, include_usage: bool
) -> AsyncIterator[str]:
    """`chat.completion.chunk` events: the role, the text as it comes, the finish reason, then [DONE]."""
    created = int(time.time())
    completion_id = f"chatcmpl-{request_id}"
    try:
        yield chunk_event(completion_id, created, model_name, {"role": "assistant", "content": ""})
        while True:
            item = await bridge.next()
            if isinstance(item, StreamDelta):
                if item.text:
                    yield chunk_event(completion_id, created, model_name, {"content": item.text})
                continue
            if item.finish_reason == "error":
                log.error("request %s: generation failed: %s", request_id, item.error)
                yield error_event(internal_error(request_id, generation_failed(item)))
            elif item.finish_reason in ("stop", "length"):
                yield chunk_event(completion_id, created, model_name, {}, item.finish_reason)
                if include_usage:
                    yield chunk_event(completion_id, created, model_name, None, usage=usage_json(item))
            break
        yield STREAM_END
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
    add_model_options(parser)
    parser.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: folder name)"
    )
    add_address_options(parser, default_port=8000)
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
    parser.add_argument(
        "--image-frames-as-video",
        action="store_true",
        help="read a user message's two or more image parts (and no video part) as the frames of one video, "
        "as lmms-eval's openai model sends the videos it decodes itself",
    )
    add_visual_tokens_option(parser)  # the default of requests that send no visual_tokens
    parser.set_defaults(func=run)


BUSY_PORT = "cannot listen on {address} ({reason}); is another server using it? choose another --port"


def run(args: argparse.Namespace) -> int:
    for name in ("max_queue", "max_batch_size", "max_tokens", "max_remote_fetches"):
        if getattr(args, name) < 1:
            raise VideoLlavaError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_body_mb <= 0 or args.max_media_mb <= 0:
        raise VideoLlavaError("--max-body-mb and --max-media-mb must be positive")
    if not args.remote_timeout > 0:
        raise VideoLlavaError("--remote-timeout must be positive")
    media_dir = None
    if args.allowed_media_dir:
        media_dir = Path(args.allowed_media_dir).expanduser()
        if not media_dir.is_dir():
            raise VideoLlavaError(f"--allowed-media-dir {media_dir}: not a folder")
    # Claimed before the model loads: a busy port is an error at once, and nothing says the server is up.
    listener = claim_port(args.host, args.port, BUSY_PORT, backlog=2048)
    try:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        pipeline = Pipeline.from_pretrained(
            args.model,
            dtype=args.dtype,
            device=args.device,
            num_frames=args.frames,
            visual_tokens=args.visual_tokens,
            quantize=args.quantize,
        )
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
            image_frames_as_video=args.image_frames_as_video,
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
