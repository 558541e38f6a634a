"""Where a chat request's media may come from: data URLs, the allowed folder, allow-listed domains."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from videollava.errors import MediaError
from videollava.serve.media import MediaForbiddenError, MediaPolicy, MediaTooLargeError, resolve_media


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /file/NAME serves a file (/slow-file/NAME after 3 s), and endpoints that misbehave."""

    files: dict[str, bytes] = {}
    seen: list[str] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.seen.append(self.path)
        host, port = self.server.server_address[:2]
        if self.path.startswith(("/file/", "/slow-file/")):
            if self.path.startswith("/slow-file/"):
                time.sleep(3.0)
            data = self.files.get(self.path.rsplit("/", 1)[-1])
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/redirect-in":
            self.send_response(302)
            self.send_header("Location", "/file/clip.mp4")
            self.end_headers()
        elif self.path == "/redirect-out":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/file/clip.mp4")
            self.end_headers()
        elif self.path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**20))
            self.end_headers()
        elif self.path == "/big-undeclared":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.wfile.write(b"x" * 65536)
        elif self.path == "/slow":
            time.sleep(2.0)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_error(404)


@contextlib.contextmanager
def media_http_server(files: dict[str, bytes], seen: list[str] | None = None) -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 serving `files` under /file/; yields its base URL.

    The paths it was asked for are appended to `seen`, to know when a client has got this far.
    """
    handler = type("Handler", (_Handler,), {"files": files, "seen": seen if seen is not None else []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TricklingServer:
    """A TCP server that answers every connection with an HTTP status line sent one byte per
    `interval`, never finishing its headers; it records when each connection was closed by the client."""

    def __init__(self, interval: float):
        self.interval = interval
        self.accepted = 0
        self.closed_by_client: list[float] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        status = b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nX-Padding: " + b"x" * 10_000
        with connection:
            for byte in status:
                if self._stop.wait(self.interval):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    self.closed_by_client.append(time.monotonic())
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()


@contextlib.contextmanager
def trickling_server(interval: float = 0.1) -> Iterator[TricklingServer]:
    server = TricklingServer(interval)
    try:
        yield server
    finally:
        server.close()


def animated_gif(frames: int = 4, size: tuple[int, int] = (32, 24)) -> bytes:
    """A small animated GIF: one colour per frame."""
    from PIL import Image

    images = [Image.new("RGB", size, (60 * i % 256, 90, 200 - 40 * i % 256)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return out.getvalue()


@pytest.fixture
def media_dir(tmp_path: Path, sample_videos: Path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "clip.mp4").write_bytes((sample_videos / "bikes.mp4").read_bytes())
    (root / "sub").mkdir()
    (tmp_path / "secret.txt").write_text("not for you")
    return root


def test_data_url_is_decoded_and_typed() -> None:
    payload = b"\x89PNG fake bytes"
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    item = resolve_media(url, "image", MediaPolicy())
    assert item.kind == "image" and item.source == payload


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("data:image/png,plain", "base64"),
        ("data:image/png;base64,@@@notbase64@@@", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", r"expected image/\* or video/\*"),
        ("data:video/mp4;base64,aGVsbG8=", "send it as a video_url part"),
        ("data:image/png;base64", "no ','"),
        ("ftp://example.org/a.png", "unsupported URL scheme"),
    ],
)
def test_bad_data_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(MediaError, match=problem):
        resolve_media(url, "image", MediaPolicy())


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1", "not a valid URL"),
        ("http://127.0.0.1:99999/a.png", "not a valid URL"),
        ("http://exa\tmple.org/a.png", "control character"),
        ("http://example.org/a\x00.png", "control character"),
        ("file:///a%00b.png", "control character"),
    ],
)
def test_malformed_urls_name_the_problem(url: str, problem: str, tmp_path: Path) -> None:
    policy = MediaPolicy(allowed_dir=tmp_path, allowed_domains=["example.org", "127.0.0.1"])
    with pytest.raises(MediaError, match=problem) as caught:
        resolve_media(url, "image", policy)
    assert type(caught.value) is MediaError


def test_data_url_over_the_limit_is_too_large() -> None:
    url = "data:video/mp4;base64," + base64.b64encode(b"x" * 5000).decode()
    with pytest.raises(MediaTooLargeError):
        resolve_media(url, "video", MediaPolicy(max_bytes=4000))


def test_local_files_need_an_allowed_folder(media_dir: Path) -> None:
    with pytest.raises(MediaForbiddenError, match="--allowed-media-dir"):
        resolve_media(str(media_dir / "clip.mp4"), "video", MediaPolicy())


def test_local_files_inside_the_folder_are_read(media_dir: Path) -> None:
    policy = MediaPolicy(allowed_dir=media_dir)
    expected = (media_dir / "clip.mp4").read_bytes()
    assert resolve_media(str(media_dir / "clip.mp4"), "video", policy).source == expected
    assert resolve_media("clip.mp4", "video", policy).source == expected  # relative to the folder
    assert resolve_media((media_dir / "clip.mp4").as_uri(), "video", policy).source == expected
    assert resolve_media(str(media_dir / "sub" / ".." / "clip.mp4"), "video", policy).source == expected


def test_escapes_from_the_folder_are_refused(media_dir: Path, tmp_path: Path) -> None:
    policy = MediaPolicy(allowed_dir=media_dir)
    (media_dir / "link.mp4").symlink_to(tmp_path / "secret.txt")
    (media_dir / "dirlink").symlink_to(tmp_path)
    for url in (
        str(tmp_path / "secret.txt"),
        str(media_dir / ".." / "secret.txt"),
        "../secret.txt",
        "sub/../../secret.txt",
        str(media_dir / "link.mp4"),
        "dirlink/secret.txt",
        (tmp_path / "secret.txt").as_uri(),
        "file:///etc/passwd",
        "/etc/passwd",
    ):
        with pytest.raises(MediaForbiddenError, match="outside the allowed media folder"):
            resolve_media(url, "video", policy)


def test_local_problems_are_named(media_dir: Path) -> None:
    policy = MediaPolicy(allowed_dir=media_dir, max_bytes=1000)
    with pytest.raises(MediaError, match="no such file"):
        resolve_media("missing.mp4", "video", policy)
    with pytest.raises(MediaError, match="not a regular file"):
        resolve_media("sub", "video", policy)
    with pytest.raises(MediaTooLargeError, match="larger than"):
        resolve_media("clip.mp4", "video", policy)
    with pytest.raises(MediaForbiddenError, match="other hosts"):
        resolve_media("file://example.org/clip.mp4", "video", policy)


def test_remote_media_is_refused_without_the_allow_list() -> None:
    with pytest.raises(MediaForbiddenError, match="--allow-remote-media"):
        resolve_media("https://example.org/a.mp4", "video", MediaPolicy())
    with pytest.raises(MediaForbiddenError, match="not in --allow-remote-media"):
        resolve_media("https://evil.example.com/a.mp4", "video", MediaPolicy(allowed_domains=["example.org"]))


def test_remote_media_is_fetched_from_allowed_domains(sample_videos: Path) -> None:
    clip = (sample_videos / "bikes.mp4").read_bytes()
    with media_http_server({"clip.mp4": clip}) as base:
        policy = MediaPolicy(allowed_domains=["127.0.0.1"], max_bytes=2**20, fetch_timeout=1.0)
        assert resolve_media(f"{base}/file/clip.mp4", "video", policy).source == clip
        assert resolve_media(f"{base}/redirect-in", "video", policy).source == clip
        with pytest.raises(MediaForbiddenError, match="'localhost' is not in"):
            resolve_media(f"{base}/redirect-out", "video", policy)
        with pytest.raises(MediaError, match="HTTP 404"):
            resolve_media(f"{base}/file/missing.mp4", "video", policy)
        with pytest.raises(MediaTooLargeError):
            resolve_media(f"{base}/big-declared", "video", policy)
        with pytest.raises(MediaTooLargeError):
            resolve_media(f"{base}/big-undeclared", "video", policy)
        started = time.monotonic()
        with pytest.raises(MediaError, match="could not be fetched in 1 s"):
            resolve_media(f"{base}/slow", "video", policy)
        assert time.monotonic() - started < 1.9


def test_animated_image_data_urls_are_videos() -> None:
    gif = animated_gif()
    url = "data:image/gif;base64," + base64.b64encode(gif).decode()
    assert resolve_media(url, "video", MediaPolicy()).source == gif
    assert resolve_media(url, "image", MediaPolicy()).source == gif


def test_hostile_local_paths_are_plain_errors(media_dir: Path) -> None:
    """Loops, '~user' names and NUL bytes: each a MediaError naming the problem, never another exception."""
    policy = MediaPolicy(allowed_dir=media_dir)
    (media_dir / "loop-a").symlink_to(media_dir / "loop-b")
    (media_dir / "loop-b").symlink_to(media_dir / "loop-a")
    with pytest.raises(MediaError, match="cannot be opened") as caught:
        resolve_media("loop-a", "video", policy)
    assert type(caught.value) is MediaError
    # "~" is a character like any other: whether the user exists makes no difference to the answer
    answers = []
    for url in ("~nosuchuser/x.png", "~root/x", "~/x.png"):
        with pytest.raises(MediaError) as caught:
            resolve_media(url, "image", policy)
        assert type(caught.value) is MediaError
        answers.append(caught.value.problem)
    assert answers == ["no such file"] * 3
    for url in ("clip\x00.mp4", str(media_dir / "clip.mp4") + "\x00", "sub/\x00/../clip.mp4"):
        with pytest.raises(MediaError, match="control character"):
            resolve_media(url, "video", policy)


def test_slow_headers_hit_the_fetch_deadline() -> None:
    """A host sending its headers one byte at a time is cut off at the deadline, not per byte."""
    policy = MediaPolicy(allowed_domains=["127.0.0.1"], fetch_timeout=1.0)
    with trickling_server(interval=0.05) as server:
        started = time.monotonic()
        with pytest.raises(MediaError, match="could not be fetched in 1 s"):
            resolve_media(f"{server.url}/clip.mp4", "video", policy)
        assert time.monotonic() - started < 1.6
        assert server.accepted == 1
