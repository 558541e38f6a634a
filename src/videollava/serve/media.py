"""Turning the URL of an `image_url` / `video_url` message part into media bytes, under a safety policy.

A server reads no local file unless the operator named a folder for them, and fetches nothing remote
unless the operator named the domains to trust. Every source is read into memory with a size limit,
so a file swapped after the check, an endless stream or a huge upload cannot slip through.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from videollava.errors import MediaError
from videollava.infer.pipeline import MediaItem

MEDIA_KINDS = ("image", "video")


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
    fetch_timeout: float = 20.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.allowed_dir is not None:
            self.allowed_dir = Path(self.allowed_dir).expanduser().resolve()
        self.allowed_domains = [d.strip().lower().rstrip(".") for d in self.allowed_domains if d.strip()]

    def domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


def resolve_media(url: str, kind: str, policy: MediaPolicy) -> MediaItem:
    """The media item a part's URL stands for: a data URL, a local path / file URL, or an http(s) URL."""
    if kind not in MEDIA_KINDS:
        raise ValueError(f"unknown media kind {kind!r}")
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"{kind}_url", "the url is empty")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return MediaItem(kind, _read_data_url(url, kind, policy), name=f"data URL ({kind})")
    if scheme in ("http", "https"):
        return MediaItem(kind, _fetch(url, policy), name=_short(url))
    if scheme == "file":
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaForbiddenError(_short(url), "file URLs of other hosts are not supported")
        path = urllib.parse.unquote(parsed.path)
        return MediaItem(kind, _read_local(path, policy, shown=_short(url)), name=_short(url))
    if len(scheme) > 1 and "/" not in scheme:  # a one-letter "scheme" is a Windows drive
        raise MediaError(_short(url), f"unsupported URL scheme {scheme!r}; use data:, file:, http: or https:")
    return MediaItem(kind, _read_local(url, policy, shown=url), name=url)


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."


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
        if family != kind:
            raise MediaError(
                "data URL", f"holds {mime!r} but was sent as {kind}_url; send it as a {family}_url part"
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
    root = policy.allowed_dir
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = root / path
    resolved = path.resolve()  # follows symlinks and removes '..'
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


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    """Download with a time-out and a size limit, following redirects only to allowed domains."""
    import httpx

    shown = _short(url)
    timeout = httpx.Timeout(policy.fetch_timeout)
    deadline = time.monotonic() + policy.fetch_timeout  # a whole-download bound, not only per read
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            host = urllib.parse.urlparse(url).hostname or ""
            if not policy.allowed_domains:
                raise MediaForbiddenError(
                    shown, "remote media is not fetched; start the server with --allow-remote-media DOMAIN"
                )
            if not policy.domain_allowed(host):
                raise MediaForbiddenError(shown, f"the domain {host!r} is not in --allow-remote-media")
            try:
                with client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urllib.parse.urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise MediaError(shown, f"could not be fetched (HTTP {response.status_code})")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise MediaTooLargeError(
                            shown, f"is larger than the {_limit_text(policy)} media limit"
                        )
                    chunks: list[bytes] = []
                    size = 0
                    for chunk in response.iter_bytes():
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("download too slow")
                        size += len(chunk)
                        if size > policy.max_bytes:
                            raise MediaTooLargeError(
                                shown, f"is larger than the {_limit_text(policy)} media limit"
                            )
                        chunks.append(chunk)
            except httpx.TimeoutException:
                raise MediaError(shown, f"could not be fetched in {policy.fetch_timeout:g} s") from None
            except httpx.HTTPError as error:
                raise MediaError(shown, f"could not be fetched ({type(error).__name__}: {error})") from None
            data = b"".join(chunks)
            if not data:
                raise MediaError(shown, "the server sent no data")
            return data
    raise MediaError(shown, f"more than {policy.max_redirects} redirects")
