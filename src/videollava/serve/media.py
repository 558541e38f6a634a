"""Turning the URL of an `image_url` / `video_url` message part into media bytes, under a safety policy.

A server reads no local file unless the operator named a folder for them, and fetches nothing remote
unless the operator named the domains to trust. Every source is read into memory with a size limit,
so a file swapped after the check, an endless stream or a huge upload cannot slip through; a remote
fetch has one deadline for all of it (name lookup, connecting, headers, body), so a host that answers
one byte at a time cannot hold a request forever.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
import stat
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

from videollava.data.images import load_image
from videollava.errors import MediaError
from videollava.infer.request import MediaItem

MEDIA_KINDS = ("image", "video")
REMOTE_SCHEMES = ("http", "https")


class MediaForbiddenError(MediaError):
    """A media source that this server's policy does not allow (HTTP 403)."""


class MediaTooLargeError(MediaError):
    """A media source over the size limit (HTTP 413)."""


@dataclass
class MediaPolicy:
    """Where media may come from, and how much of it one item may be."""

    allowed_dir: Path | None = None
    allowed_domains: list[str] = field(default_factory=list)
    max_bytes: int = 32 * 2**20
    fetch_timeout: float = 20.0  # seconds for the whole of one remote fetch, redirects included
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.allowed_dir is not None:
            self.allowed_dir = Path(self.allowed_dir).expanduser().resolve()
        self.allowed_domains = [d.strip().lower().rstrip(".") for d in self.allowed_domains if d.strip()]

    def domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


def url_scheme(url: str) -> str:
    """The lower-case scheme of a URL, or "" for a plain path (a one-letter "scheme" is a Windows drive)."""
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    return scheme if len(scheme) > 1 and "/" not in scheme else ""


def is_remote(url: str) -> bool:
    """True for http(s) URLs: those wait on another host and go through `fetch_media`."""
    return url_scheme(url) in REMOTE_SCHEMES


def resolve_media(url: str, kind: str, policy: MediaPolicy) -> MediaItem:
    """The media item a part's URL stands for: a data URL, a local path / file URL, or an http(s) URL.

    Blocks while it reads or fetches; a server calls it for data URLs and local files only, and
    awaits `fetch_media` for remote ones.
    """
    _check_kind(kind)
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"{kind}_url", "the url is empty")
    url = url.strip()
    scheme = url_scheme(url)
    if scheme == "data":
        return MediaItem(kind, _read_data_url(url, kind, policy), name=f"data URL ({kind})")
    _check_characters(url)
    if scheme in REMOTE_SCHEMES:
        return asyncio.run(fetch_media(url, kind, policy))
    if scheme == "file":
        parsed = _split(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaForbiddenError(_short(url), "file URLs of other hosts are not supported")
        path = urllib.parse.unquote(parsed.path)
        _check_characters(path, shown=url)
        return MediaItem(kind, _read_local(path, policy, shown=_short(url)), name=_short(url))
    if scheme:
        raise MediaError(_short(url), f"unsupported URL scheme {scheme!r}; use data:, file:, http: or https:")
    return MediaItem(kind, _read_local(url, policy, shown=_short(url)), name=_short(url))


def resolve_frames(urls: Sequence[str], policy: MediaPolicy) -> MediaItem:
    """Images sent one per part as the frames of one video, joined into one animated PNG (lossless).

    Each frame is read under the same policy and limits as any image; frames of another size are
    resized to the first one's. The video is then sampled like any other (first and last frame kept).
    """
    frames = []
    for number, url in enumerate(urls):
        item = resolve_media(url, "image", policy)
        image = load_image(item.source, name=f"frame {number} ({item.display_name()})")
        if frames and image.size != frames[0].size:
            image = image.resize(frames[0].size, Image.Resampling.BICUBIC)
        frames.append(image)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:], duration=40)
    return MediaItem("video", buffer.getvalue(), name=f"{len(frames)} image frames")


async def fetch_media(url: str, kind: str, policy: MediaPolicy) -> MediaItem:
    """An http(s) media item, fetched within `policy.fetch_timeout` seconds all told.

    Cancelling the awaiting task (the client went away) closes the connection at once.
    """
    _check_kind(kind)
    url = url.strip()
    _check_characters(url)
    shown = _short(url)
    try:
        data = await asyncio.wait_for(_download(url, policy, shown), policy.fetch_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):  # noqa: UP041 (not the builtin before Python 3.11)
        raise MediaError(shown, f"could not be fetched in {policy.fetch_timeout:g} s") from None
    return MediaItem(kind, data, name=shown)


def _check_kind(kind: str) -> None:
    if kind not in MEDIA_KINDS:
        raise ValueError(f"unknown media kind {kind!r}")


def _check_characters(text: str, shown: str | None = None) -> None:
    """Paths and URLs never need control characters; a NUL or a tab would only confuse what reads them."""
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise MediaError(_short(shown or text), f"contains the control character {bad!r}")


def _split(url: str) -> urllib.parse.SplitResult:
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018 (checks the port)
    except ValueError as error:
        raise MediaError(_short(url), f"is not a valid URL ({error})") from None
    return parsed


def _short(url: str, limit: int = 120) -> str:
    """A URL fit for a message: cut short, control characters escaped."""
    url = url if len(url) <= limit else url[: limit - 3] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in url)


def _limit_text(policy: MediaPolicy) -> str:
    return f"{policy.max_bytes / 2**20:g} MiB"


def _read_data_url(url: str, kind: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("data URL", "has no ',' between its header and its data")
    params = header[len("data:") :].split(";")
    mime = params[0].strip().lower()
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError("data URL", "must be base64-encoded (data:<type>;base64,...)")
    if mime and mime != "application/octet-stream":
        family = mime.split("/", 1)[0]
        if family not in MEDIA_KINDS:
            raise MediaError("data URL", f"has type {mime!r}; expected image/* or video/*")
        # An animated GIF / WebP / PNG is a video with an image type; the decoder tells it from a still.
        if family == "video" and kind == "image":
            raise MediaError(
                "data URL", f"holds {mime!r} but was sent as image_url; send it as a video_url part"
            )
    payload = payload.strip()
    if len(payload) * 3 // 4 > policy.max_bytes + 3:
        raise MediaTooLargeError("data URL", f"is larger than the {_limit_text(policy)} media limit")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("data URL", "its data is not valid base64") from None
    if not data:
        raise MediaError("data URL", "holds no data")
    if len(data) > policy.max_bytes:
        raise MediaTooLargeError("data URL", f"is larger than the {_limit_text(policy)} media limit")
    return data


def _read_local(path_text: str, policy: MediaPolicy, shown: str) -> bytes:
    if policy.allowed_dir is None:
        raise MediaForbiddenError(
            shown, "local files are not served; start the server with --allowed-media-dir DIR"
        )
    _check_characters(path_text, shown)
    root = policy.allowed_dir
    # "~" is not expanded: "~user/x.png" names a file inside the folder like any other name, so an
    # answer never depends on which users this machine has.
    path = Path(path_text)
    if not path.is_absolute():
        path = root / path
    # realpath follows symlinks and removes '..'; unlike Path.resolve it never raises on a loop,
    # which then fails below as a file that cannot be opened.
    resolved = Path(os.path.realpath(path))
    if not resolved.is_relative_to(root):
        raise MediaForbiddenError(shown, "is outside the allowed media folder")
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise MediaError(shown, "no such file") from None
    except OSError as error:
        raise MediaError(shown, f"cannot be opened ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(shown, "is not a regular file")
        if info.st_size > policy.max_bytes:
            raise MediaTooLargeError(shown, f"is larger than the {_limit_text(policy)} media limit")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:
        raise MediaTooLargeError(shown, f"is larger than the {_limit_text(policy)} media limit")
    if not data:
        raise MediaError(shown, "is empty")
    return data


def _check_remote(url: str, policy: MediaPolicy, shown: str) -> None:
    if not policy.allowed_domains:
        raise MediaForbiddenError(
            shown, "remote media is not fetched; start the server with --allow-remote-media DOMAIN"
        )
    _check_characters(url, shown)
    parsed = _split(url)
    if parsed.scheme.lower() not in REMOTE_SCHEMES:
        raise MediaForbiddenError(shown, f"redirects to a {parsed.scheme!r} URL")
    host = parsed.hostname or ""
    if not policy.domain_allowed(host):
        raise MediaForbiddenError(shown, f"the domain {host!r} is not in --allow-remote-media")


async def _download(url: str, policy: MediaPolicy, shown: str) -> bytes:
    """The body of `url`, following redirects only to allowed domains, refused past the size limit."""
    # httpx's own time-outs bound each step; the caller's deadline bounds the whole.
    timeout = httpx.Timeout(policy.fetch_timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            _check_remote(url, policy, shown)
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urllib.parse.urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise MediaError(shown, f"could not be fetched (HTTP {response.status_code})")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > policy.max_bytes:
                        raise MediaTooLargeError(
                            shown, f"is larger than the {_limit_text(policy)} media limit"
                        )
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > policy.max_bytes:
                            raise MediaTooLargeError(
                                shown, f"is larger than the {_limit_text(policy)} media limit"
                            )
                        chunks.append(chunk)
            except httpx.TimeoutException:
                raise
            except (httpx.HTTPError, httpx.InvalidURL, ValueError) as error:
                raise MediaError(shown, f"could not be fetched ({type(error).__name__}: {error})") from None
            data = b"".join(chunks)
            if not data:
                raise MediaError(shown, "the server sent no data")
            return data
    raise MediaError(shown, f"more than {policy.max_redirects} redirects")
