"""The OpenAI chat completions protocol as this server speaks it: the request fields it honours, the
checks that turn a body into a `ChatRequest` (messages, content parts, sampling parameters), the error
body every refusal takes, and the JSON of answers, stream chunks and usage.

Nothing here touches media or the model, so a malformed request is refused before any work starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from videollava.data.conversation import ASSISTANT, USER
from videollava.errors import VideoLlavaError
from videollava.infer.request import Completion
from videollava.infer.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams

# More images and videos than any context holds: 16 images of 256 visual tokens fill 4096 positions.
MAX_MEDIA_PARTS = 16
# Images sent one per part as the frames of one video (lmms-eval decodes videos that way) count as
# one video; this many parts at most make one.
MAX_FRAME_PARTS = 512
MAX_CACHE_SALT_CHARS = 256
STREAM_END = "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------
# errors


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

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients read an error from."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(request_id: str, what: str = "internal server error") -> APIError:
    """What a client learns of a server fault: that it happened, and the id to find it in the log."""
    return APIError(
        500,
        f"{what} (request id {request_id}; the server log has the details)",
        "server_error",
        code="internal_error",
    )


def busy_error(message: str, code: str) -> APIError:
    """A refusal for want of room: the client may try again in a second."""
    return APIError(429, message, "rate_limit_error", None, code, {"Retry-After": "1"})


# --------------------------------------------------------------------------------------------
# requests


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
    # vLLM's per-request media options; {"video": {"num_frames": N}} sets the frames per video
    media_io_kwargs: dict[str, Any] | None = None
    # Patch tokens kept per image or video frame (the ones the tower's CLS attends to most); this
    # server's own field, sent in the extra body like cache_salt. Default: the server's --visual-tokens.
    visual_tokens: StrictInt | None = Field(default=None, ge=1, le=2**31 - 1)
    # vLLM's field: requests with different salts never share prefix-cache entries (nor learn of each other's)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)


@dataclass
class Turn:
    """A user or assistant message: its text parts joined, its images and videos."""

    role: str
    text: str
    # (kind, url) in message order; a video made of image parts has the tuple of their URLs
    media: list[tuple[str, str | tuple[str, ...]]] = field(default_factory=list)


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
    visual_tokens: int | None = None

    @property
    def media(self) -> list[tuple[str, str | tuple[str, ...]]]:
        """Every (kind, url) of the conversation, in message order."""
        return [part for turn in self.turns for part in turn.media]


def parse_chat_request(
    body: Any, model_name: str, default_max_tokens: int, image_frames_as_video: bool = False
) -> ChatRequest:
    """Check a request body for the model `model_name` without touching any media, so refusals are cheap;
    an answer's length is `default_max_tokens` unless the request sets one. With `image_frames_as_video`,
    a user message's two or more image parts (and no video part) are the frames of one video."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
    if request.model is not None and request.model != model_name:
        raise APIError(
            404,
            f"the model {request.model!r} does not exist; this server serves {model_name!r}",
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
    max_tokens = request.max_completion_tokens or request.max_tokens or default_max_tokens
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
    system, turns = parse_messages(request.messages, image_frames_as_video)
    return ChatRequest(
        system=system,
        turns=turns,
        params=params,
        stream=request.stream,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        num_frames=_frames_asked(request),
        cache_salt=request.cache_salt,
        visual_tokens=request.visual_tokens,
    )


def _frames_asked(request: ChatCompletionRequest) -> int | None:
    """Frames per video: `num_frames`, or vLLM's `media_io_kwargs.video.num_frames`; both must agree."""
    where = "media_io_kwargs.video.num_frames"
    video = (request.media_io_kwargs or {}).get("video")
    if video is None:
        return request.num_frames
    if not isinstance(video, dict):
        raise APIError(400, "media_io_kwargs.video must be an object", param="media_io_kwargs")
    frames = video.get("num_frames")
    if frames is None:
        return request.num_frames
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 64:
        raise APIError(400, f"{where} must be a whole number from 1 to 64, got {frames!r:.40}", param=where)
    if request.num_frames is not None and request.num_frames != frames:
        raise APIError(400, f"num_frames {request.num_frames} and {where} {frames} disagree", param=where)
    return frames


def parse_messages(
    messages: list[dict[str, Any]], image_frames_as_video: bool = False
) -> tuple[str | None, list[Turn]]:
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
            if image_frames_as_video and len(media) >= 2 and all(kind == "image" for kind, _ in media):
                if len(media) > MAX_FRAME_PARTS:
                    raise APIError(400, f"{where}: more than {MAX_FRAME_PARTS} image frames", param=where)
                media = [("video", tuple(url for _, url in media))]
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


# --------------------------------------------------------------------------------------------
# answers


def usage_json(completion: Completion) -> dict[str, Any]:
    """OpenAI's usage object, with the visual tokens and the prefix-cache hits this server adds."""
    generated = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
        "visual_tokens": completion.visual_tokens,
        "prompt_tokens_details": {"cached_tokens": completion.reused_prefix_tokens},
    }


def completion_body(completion_id: str, model: str, completion: Completion) -> dict[str, Any]:
    """A whole `chat.completion` answer."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
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


def chunk_event(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> str:
    """One `chat.completion.chunk` as a server-sent event; without a delta, the usage chunk (no choices)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    payload: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


def error_event(error: APIError) -> str:
    """An error in the middle of a stream, as a server-sent event."""
    return f"data: {json.dumps(error.body())}\n\n"
