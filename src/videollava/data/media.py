"""Decoding of images and videos into RGB pixels, with the work one item may cost bounded.

Every failure becomes a `MediaError` naming the file, so a bad upload or a broken dataset entry
reads as one line rather than a PyAV or PIL traceback.

Video frames are sampled like the reference: indices ``linspace(0, n - 1, T)`` rounded down, first
and last frame included, frame rate ignored. They are reached by seeking to the keyframe before
each wanted frame and decoding forward, which for long videos is many times faster than decoding
everything; any sign that timestamps do not map to frame indices (variable frame rate, wrong frame
count, broken index) falls back to decoding every frame, so the result is always the frames a full
decode would pick.

What a file claims does not decide what it costs: only regular files are read (a device or a named
pipe would never end), pictures and frames over a pixel limit are refused before they are decoded,
decoding stops after a number of frames or seconds (`DecodeLimits`), a caller may stop it between
frames (``cancelled``), and with ``shrink`` a picture much larger than the model needs is made
smaller while still 8-bit (by the JPEG decoder itself, by the video scaler, or by a box filter), so
it never exists at full resolution in a wider type. All frames of one clip come out at one size,
even when the stream changes resolution part way.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import av.error
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from videollava.errors import MediaError, RequestCancelled

MediaSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
# (height, width) of a decoded picture -> the integer its sides may be divided by before use (1 keeps
# every pixel). It must not depend on which side is which: EXIF may turn a photo after decoding.
Shrink = Callable[[int, int], int]
# Asked between frames; True stops the work with RequestCancelled.
Cancelled = Callable[[], bool]

# Formats PIL opens that may hold several frames; only these count as videos when animated
# (a multi-frame MPO from a camera or a multi-page TIFF is still a photo).
_ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
# Formats PIL identifies but cannot treat as a picture.
_NOT_IMAGE_FORMATS = frozenset({"MPEG"})
# Signatures of containers: when PyAV rejects such a file it is damaged, not of an unknown kind.
_CONTAINER_MAGIC = (
    (4, b"ftyp"),  # mp4 / mov
    (4, b"moov"),
    (4, b"mdat"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"OggS"),
    (0, b"FLV"),
)
# Frames continued by decoding rather than by seeking when the next wanted frame is this close.
_FORWARD_LIMIT = 16
# Fully decoded frames are kept in memory up to this many bytes, saving a second pass.
_KEEP_ALL_BYTES = 256 * 2**20
# A declared frame count may exceed the decodable frames by this fraction (edit lists, a damaged
# last frame) before the file is called truncated.
_COUNT_SLACK = 0.01
# Frame threading keeps several decoded frames per thread; above 4K UHD the decoder splits each
# frame between threads instead (at 8192 x 8192 this halves the decoder's memory).
_FRAME_THREADS_MAX_PIXELS = 3840 * 2160
# Deep (16-bit, 32-bit, float) pictures are brought to 8 bits this many pixels at a time.
_STRIP_PIXELS = 1 << 22
# PIL modes that `Image.reduce` works on; others become RGB first.
_REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "CMYK"})
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


@dataclass(frozen=True)
class DecodeLimits:
    """How much one image or video may cost to decode, whatever its file claims.

    The defaults lie beyond what ordinary media reach on a 2-core CPU. Sampling by seeking decodes
    at most one keyframe interval per sampled frame (a few thousand frames at worst); decoding
    every frame, the fallback for a variable frame rate, ran at about 750 frames a second for a
    synthetic 1080p H.264 clip here, so the time limit covers minutes of such video. PIL needs
    40-65 ms per frame of a 3000 x 3000 animated GIF, so one of a thousand such frames is stopped.
    """

    max_pixels: int = 8192 * 8192  # per still image or video frame, as decoded
    # PIL keeps several full canvases of an animation (the frame, the previous one, the disposal).
    max_animation_pixels: int = 4096 * 4096
    max_frames: int = 100_000  # frames decoded (scanned) for one item, including skipped ones
    max_seconds: float = 60.0  # wall-clock decoding time for one item

    def __post_init__(self) -> None:
        if min(self.max_pixels, self.max_animation_pixels, self.max_frames) < 1 or not self.max_seconds > 0:
            raise ValueError(f"decode limits must be positive: {self}")


@dataclass(frozen=True)
class VideoClip:
    """The frames the model sees and the file's frame count, which places them in time."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    n_frames: int  # frames in the file; the sampled ones are frame_indices(n_frames, T)


def frame_indices(n_frames: int, num_frames: int) -> np.ndarray:
    """Indices of the frames the model sees: evenly spread, both ends included, as the reference."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, n_frames - 1, num_frames).astype(int)


def frame_times(n_frames: int, num_frames: int) -> np.ndarray:
    """(num_frames,) where the sampled frames lie in the clip: 0 = first frame, 1 = last."""
    return frame_indices(n_frames, num_frames) / max(1, n_frames - 1)


def raise_if_cancelled(cancelled: Cancelled | None, what: str) -> None:
    """Stop with RequestCancelled when the caller has gone away."""
    if cancelled is not None and cancelled():
        raise RequestCancelled(f"cancelled while {what}")


# --------------------------------------------------------------------------------------------
# work limits


class _Budget:
    """Frames and seconds spent decoding one item, checked between frames."""

    def __init__(self, name: str, limits: DecodeLimits, cancelled: Cancelled | None):
        self.name = name
        self.limits = limits
        self.cancelled = cancelled
        self.frames = 0
        self.start = time.monotonic()

    def check(self) -> None:
        raise_if_cancelled(self.cancelled, f"decoding {self.name}")
        seconds = time.monotonic() - self.start
        if self.frames > self.limits.max_frames or seconds > self.limits.max_seconds:
            raise MediaError(
                self.name,
                f"decoding stopped after {self.frames} frames / {seconds:.1f} s: more work than one media "
                f"item may cost (limits: {self.limits.max_frames} frames, {self.limits.max_seconds:g} s)",
            )

    def tick(self) -> None:
        """One more frame decoded."""
        self.frames += 1
        self.check()


def _check_pixels(name: str, width: int, height: int, limit: int, what: str) -> None:
    if width * height > limit:
        raise MediaError(
            name,
            f"{what} too large: {width} x {height} = {width * height:,} pixels, over the limit of {limit:,}",
        )


def _bomb(name: str, error: Exception, limit: int, what: str = "image") -> MediaError:
    """PIL's own decompression-bomb refusal (far over our limit), restated with the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    count = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL decodes safely"
    return MediaError(name, f"{what} too large: {count}, over the limit of {limit:,}")


# --------------------------------------------------------------------------------------------
# sources


_OS_PROBLEMS = {
    errno.ENOENT: "file not found (no such file or directory)",
    errno.ENOTDIR: "file not found (a part of the path is not a folder)",
    errno.ELOOP: "cannot open: too many levels of symbolic links (a symlink loop)",
    errno.EACCES: "cannot read: permission denied",
    errno.EPERM: "cannot read: permission denied",
    errno.ENAMETOOLONG: "cannot open: the path is too long",
    errno.EISDIR: "is a directory, not a media file",
}


def _os_problem(error: OSError) -> str:
    return _OS_PROBLEMS.get(error.errno, f"cannot read: {error.strerror or error}")


def _kind_problem(mode: int) -> str | None:
    """Why a file of this type cannot be media (reading a device or a pipe may never end)."""
    for is_kind, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if is_kind(mode):
            return f"is {what}, not a media file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def open_media_file(path: str | os.PathLike, name: str | None = None) -> BinaryIO:
    """Open a local file for reading only if it is a non-empty regular file (symlinks followed).

    The type is checked before opening, so a FIFO or a device is never opened, and again on the
    opened file, so one swapped in between is refused too.
    """
    label = name or os.fspath(path)
    try:
        problem = _kind_problem(os.stat(path).st_mode)
    except ValueError:  # an embedded NUL character
        raise MediaError(label, "invalid path: it contains a NUL character") from None
    except OSError as e:
        raise MediaError(label, _os_problem(e)) from None
    if problem:
        raise MediaError(label, problem)
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise MediaError(label, _os_problem(e)) from None
    info = os.fstat(fd)
    problem = _kind_problem(info.st_mode) or ("empty file (0 bytes)" if info.st_size == 0 else None)
    if problem:
        os.close(fd)
        raise MediaError(label, problem)
    return os.fdopen(fd, "rb")


@dataclass
class _Source:
    """A path, or an in-memory file that can be rewound for each reader."""

    name: str
    path: Path | None = None
    data: BinaryIO | None = None
    start: int = 0

    def open(self) -> str | BinaryIO:
        if self.path is not None:
            return str(self.path)
        assert self.data is not None
        self.data.seek(self.start)
        return self.data

    def head(self, n: int = 16) -> bytes:
        if self.path is not None:
            with open_media_file(self.path, self.name) as f:
                return f.read(n)
        assert self.data is not None
        self.data.seek(self.start)
        return self.data.read(n)


def _as_source(source: MediaSource, name: str | None) -> _Source:
    if isinstance(source, str | os.PathLike):
        label = name or os.fspath(source)
        with open_media_file(source, label):
            pass
        return _Source(label, path=Path(source))
    label = name or "<bytes>"
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise MediaError(label, "empty file (0 bytes)")
        return _Source(label, data=io.BytesIO(bytes(source)))
    if hasattr(source, "read"):
        seekable = getattr(source, "seekable", None)
        if seekable is not None and seekable():
            start = source.tell()
            first = source.read(1)
            source.seek(start)
            data, offset = source, start
        else:
            data, offset = io.BytesIO(source.read()), 0
            first = data.read(1)
        if not first:
            raise MediaError(label, "empty file (0 bytes)")
        return _Source(label, data=data, start=offset)
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


# --------------------------------------------------------------------------------------------
# images


def _deep_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey -> 8-bit "L", scaled rather than clipped.

    Converted a strip of rows at a time, so a large picture never has a full-size wider copy.
    """
    width, height = img.size
    rows = max(1, _STRIP_PIXELS // max(1, width))
    strips = [(0, y, width, min(height, y + rows)) for y in range(0, height, rows)]
    out = np.empty((height, width), np.uint8)
    if img.mode == "F":
        top = -np.inf
        for box in strips:
            strip = np.asarray(img.crop(box))
            top = max(top, float(np.max(strip, initial=-np.inf, where=~np.isnan(strip))))
        scale = 255.0 if height * width and top <= 1.0 else 1.0
        for box in strips:
            strip = np.nan_to_num(np.asarray(img.crop(box)).astype(np.float64) * scale)
            out[box[1] : box[3]] = np.clip(np.rint(strip), 0, 255).astype(np.uint8)
    else:
        deep = img.mode.startswith("I;16") or (img.getextrema()[1] or 0) > 255  # type: ignore[index]
        scale = 255.0 / (65535.0 if deep else 255.0)
        for box in strips:
            strip = np.asarray(img.crop(box)).astype(np.float64)
            out[box[1] : box[3]] = np.clip(np.rint(strip * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode, so pixels mean the same thing for every input.

    Transparency is composited on white (a transparent logo on black would turn into a black
    square); 16-bit and float images are scaled rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _DEEP_MODES:
        return _deep_to_l(img).convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block leaves the picture as stored."""
    try:
        turned = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not make a readable photo unusable
        return img
    return turned if turned is not None else img


def _divided(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """(width, height) divided by factor, rounded up as `Image.reduce` does."""
    return -(-size[0] // factor), -(-size[1] // factor)


def _factor(shrink: Shrink | None, width: int, height: int) -> int:
    return max(1, int(shrink(height, width))) if shrink is not None else 1


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """A box-filtered copy `factor` times smaller, still 8-bit."""
    if factor == 1:
        return img
    if img.mode not in _REDUCIBLE_MODES:
        img = to_rgb(img)
    return img.reduce(factor)


def load_image(
    source: MediaSource,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> Image.Image:
    """Read a still image as upright 8-bit RGB; animated images are refused (read them as videos).

    With ``shrink``, a picture much larger than needed comes back smaller (see `Shrink`).
    """
    src = _as_source(source, name)
    raise_if_cancelled(cancelled, f"reading {src.name}")
    return _load_image(src, shrink, limits or DecodeLimits())


def _load_image(src: _Source, shrink: Shrink | None, limits: DecodeLimits) -> Image.Image:
    try:
        img = Image.open(src.open())
    except Image.DecompressionBombError as e:
        raise _bomb(src.name, e, limits.max_pixels) from None
    except UnidentifiedImageError:
        raise MediaError(src.name, _why_not_image(src)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(src.name, f"truncated or corrupt image ({e})") from None
    with img:
        if img.format in _NOT_IMAGE_FORMATS:
            raise MediaError(src.name, _why_not_image(src))
        n = _n_frames(img)
        if img.format in _ANIMATED_FORMATS and n > 1:
            raise MediaError(
                src.name, f"not a still image: animated {img.format} with {n} frames (read it as a video)"
            )
        factor = _factor(shrink, *img.size)
        if factor > 1:
            # JPEG decodes straight to 1/2, 1/4 or 1/8 of its size; other formats ignore this.
            img.draft(None, (max(1, img.width // factor), max(1, img.height // factor)))
        _check_pixels(src.name, img.width, img.height, limits.max_pixels, "image")
        try:
            img.load()
            picture = _deep_to_l(img) if img.mode in _DEEP_MODES else img
            picture = _reduce(picture, _factor(shrink, *picture.size))
            return to_rgb(_upright(picture))
        except Image.DecompressionBombError as e:
            raise _bomb(src.name, e, limits.max_pixels) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise MediaError(src.name, f"truncated or corrupt image ({e})") from None


def _n_frames(img: Image.Image) -> int:
    try:
        return int(getattr(img, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, EOFError):
        return 1


def _why_not_image(src: _Source) -> str:
    try:
        with av.open(src.open(), mode="r") as container:
            fmt = container.format.name
            # FFmpeg reads a damaged picture as a one-frame "video" of an image format.
            if _video_streams(container) and fmt != "image2" and not fmt.endswith("_pipe"):
                return "not an image: it is a video"
    except (av.error.FFmpegError, OSError, ValueError):
        pass
    return "not an image file (unrecognised format, or corrupt)"


def _sniff_image(src: _Source) -> str | None:
    """'still' or 'animated' if PIL recognises the content, else None."""
    try:
        with Image.open(src.open()) as img:
            if img.format in _NOT_IMAGE_FORMATS:
                return None
            animated = img.format in _ANIMATED_FORMATS and _n_frames(img) > 1
            return "animated" if animated else "still"
    except Image.DecompressionBombError:
        return "still"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


class _ClipArray:
    """A clip's (T, H, W, 3) frames, written as each wanted frame is decoded, so none is held twice.

    An index wanted more than once (a clip shorter than T) fills several slots.
    """

    def __init__(self, indices: list[int]):
        self.count = len(indices)
        self.slots: dict[int, list[int]] = {}
        for slot, index in enumerate(indices):
            self.slots.setdefault(index, []).append(slot)
        self.filled: set[int] = set()
        self.array: np.ndarray | None = None

    def wanted(self) -> list[int]:
        return sorted(self.slots)

    def __contains__(self, index: int) -> bool:
        return index in self.slots

    def put(self, index: int, rgb: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty((self.count, *rgb.shape), np.uint8)  # (T, H, W, 3)
        for slot in self.slots[index]:
            self.array[slot] = rgb
        self.filled.add(index)

    def complete(self) -> bool:
        return self.array is not None and len(self.filled) == len(self.slots)


class _Shaper:
    """Decoded frames -> uint8 RGB arrays of one size: the first frame's, divided by `shrink`'s factor.

    A frame of another size (a stream that changes resolution) is scaled to that size on its own.
    """

    def __init__(self, name: str, shrink: Shrink | None, max_pixels: int):
        self.name = name
        self.shrink = shrink
        self.max_pixels = max_pixels
        self.factor = 1
        self.size: tuple[int, int] | None = None  # (width, height) of every frame returned

    def _fix_size(self, width: int, height: int) -> tuple[int, int]:
        _check_pixels(self.name, width, height, self.max_pixels, "video frame")
        if self.size is None:
            self.factor = _factor(self.shrink, width, height)
            self.size = _divided((width, height), self.factor)
        return self.size

    def av_frame(self, frame: av.VideoFrame) -> np.ndarray:
        width, height = self._fix_size(frame.width, frame.height)
        if (frame.width, frame.height) == (width, height):
            return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8
        # Scaled and converted in one pass of the scaler: the full-size RGB frame never exists.
        scaled = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
        return scaled.to_ndarray()

    def picture(self, img: Image.Image) -> np.ndarray:
        size = self._fix_size(img.width, img.height)
        if _divided(img.size, self.factor) == size:
            rgb = to_rgb(_reduce(img, self.factor))
        else:
            rgb = to_rgb(img).resize(size, Image.Resampling.BOX)
        return np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)


def _read_animated_image(src: _Source, num_frames: int, shrink: Shrink | None, budget: _Budget) -> VideoClip:
    """Frames of an animated GIF / WebP / PNG, composited by PIL (disposal, transparency).

    PIL composites every frame up to the last one wanted; it is asked for one frame at a time so
    that the budget is checked, and each frame's canvas size before that frame is loaded.
    """
    limit = budget.limits.max_animation_pixels
    try:
        with Image.open(src.open()) as img:
            n = _n_frames(img)
            clip = _ClipArray(frame_indices(n, num_frames).tolist())
            shaper = _Shaper(src.name, shrink, limit)
            for i in range(clip.wanted()[-1] + 1):
                if i:
                    img.seek(i)
                budget.tick()
                _check_pixels(src.name, img.width, img.height, limit, f"animation frame {i}")
                if i in clip:
                    clip.put(i, shaper.picture(img))
    except Image.DecompressionBombError as e:
        raise _bomb(src.name, e, limit, "animation frame") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(src.name, f"truncated or corrupt animation ({e})") from None
    assert clip.array is not None
    return VideoClip(clip.array, n)


# --------------------------------------------------------------------------------------------
# videos


def _video_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    """Video streams, without cover art (an mp3's album picture is not a video)."""
    attached = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not (s.disposition & attached)]


def _open_container(src: _Source) -> av.container.InputContainer:
    try:
        return av.open(src.open(), mode="r", metadata_errors="ignore")
    except PermissionError:
        raise MediaError(src.name, "cannot read: permission denied") from None
    except (av.error.FFmpegError, OSError, ValueError):
        head = src.head()
        if any(head[o : o + len(m)] == m for o, m in _CONTAINER_MAGIC):
            raise MediaError(
                src.name, "truncated or corrupt video (the container cannot be parsed)"
            ) from None
        raise MediaError(src.name, "not a media file (unrecognised format)") from None


def _video_stream(
    container: av.container.InputContainer, src: _Source, limits: DecodeLimits | None = None
) -> av.video.stream.VideoStream:
    """The stream to decode; with `limits`, its frame size is checked and enforced by the decoder."""
    streams = _video_streams(container)
    if not streams:
        if container.streams.audio:
            raise MediaError(src.name, "no video stream (audio only)")
        raise MediaError(src.name, "no video stream")
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise MediaError(src.name, "not a video: it is a still image")
    stream = streams[0]
    pixels = stream.codec_context.width * stream.codec_context.height
    if limits is not None:
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(src.name, width, height, limits.max_pixels, "video frames")
        # The decoder itself refuses larger frames, should the size change part way.
        stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
    stream.thread_type = "AUTO" if pixels <= _FRAME_THREADS_MAX_PIXELS else "SLICE"
    return stream


@dataclass
class _Decoder:
    """Frames of one stream in presentation order, skipping packets the decoder rejects."""

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    budget: _Budget
    errors: int = 0

    def frames(self) -> Iterator[av.VideoFrame]:
        packets = self.container.demux(self.stream)
        while True:
            self.budget.check()
            try:
                packet = next(packets)
            except StopIteration:
                return
            except (av.error.FFmpegError, OSError):
                # Unreadable container data: drain what the decoder still holds and stop.
                self.errors += 1
                try:
                    drained = self.stream.codec_context.decode(None)
                except (av.error.FFmpegError, ValueError):
                    drained = []
                for frame in drained:
                    self.budget.tick()
                    yield frame
                return
            try:
                decoded = packet.decode()
            except (av.error.FFmpegError, ValueError):
                self.errors += 1
                continue
            for frame in decoded:
                self.budget.tick()
                yield frame


@dataclass
class _Timeline:
    """Frame index <-> pts for a constant-frame-rate stream."""

    start: int
    step: Fraction  # pts ticks per frame
    n_frames: int
    tolerance: Fraction = field(init=False)

    def __post_init__(self) -> None:
        # Muxers with a coarse time base (1/1000 in Matroska) round each timestamp.
        self.tolerance = max(Fraction(1), self.step / 8)

    def pts(self, index: int) -> int:
        return self.start + int(round(index * self.step))

    def index(self, pts: int | None) -> int | None:
        """The frame index a pts stands for, or None if it is off the grid (not constant rate)."""
        if pts is None:
            return None
        i = int(round((pts - self.start) / self.step))
        if abs(pts - self.start - i * self.step) > self.tolerance:
            return None
        return i


class _SeekFailed(Exception):
    """Timestamps did not behave as a constant frame rate would make them: decode everything."""


def _timeline(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> _Timeline | None:
    tb = stream.time_base
    rate = stream.average_rate or stream.guessed_rate
    if not tb or not rate or rate <= 0:
        return None
    step = 1 / (Fraction(rate) * Fraction(tb))
    start = stream.start_time if stream.start_time is not None else 0
    n = stream.frames
    if n <= 0:
        if stream.duration:
            seconds = Fraction(stream.duration) * Fraction(tb)
        elif container.duration:
            seconds = Fraction(container.duration, av.time_base)
        else:
            return None
        n = int(round(seconds * Fraction(rate)))
        if n < 1:
            return None
    return _Timeline(start, step, n)


class _Seeker:
    """Reaches frames by index: seek to the keyframe before, decode forward, check every pts."""

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        tl: _Timeline,
        budget: _Budget,
    ):
        self.container = container
        self.stream = stream
        self.tl = tl
        self.budget = budget
        self.frames: Iterator[av.VideoFrame] | None = None
        self.pos = -1  # index of the last frame taken from self.frames
        self.frame: av.VideoFrame | None = None
        self.may_seek = True

    def _next(self) -> tuple[int, av.VideoFrame] | None:
        assert self.frames is not None
        frame = next(self.frames, None)
        if frame is None:
            return None
        index = self.tl.index(frame.pts)
        if index is None:
            raise _SeekFailed("pts off the constant-rate grid")
        if index < 0:
            # Frames before the stream's start time would shift every index of a full decode.
            raise _SeekFailed("frame before the stream start")
        return index, frame

    def _seek(self, target: int) -> None:
        back = 0
        while True:
            ts = self.tl.pts(max(0, target - back))
            try:
                self.container.seek(ts, backward=True, any_frame=False, stream=self.stream)
            except (av.error.FFmpegError, OSError) as e:
                raise _SeekFailed(f"seek failed: {e}") from None
            self.frames = _Decoder(self.container, self.stream, self.budget).frames()
            got = self._next()
            if got is None:
                raise _SeekFailed("nothing decodes after the seek point")
            index, frame = got
            if index <= target:
                if index <= self.pos:
                    # Keyframes are too sparse for seeking to save work: decode forward from now on.
                    self.may_seek = False
                self.pos, self.frame = index, frame
                return
            if target - back <= 0:
                raise _SeekFailed("seeking never lands before the target")
            # Landed after the target (a keyframe indexed by decode time): aim earlier.
            back = back * 4 if back else 16

    def get(self, target: int) -> av.VideoFrame:
        if self.frames is not None and self.pos == target and self.frame is not None:
            return self.frame
        if self.frames is None or target < self.pos or (self.may_seek and target - self.pos > _FORWARD_LIMIT):
            self._seek(target)
        while self.pos < target:
            got = self._next()
            if got is None:
                raise _SeekFailed(f"stream ended before frame {target}")
            index, frame = got
            if index != self.pos + 1:
                raise _SeekFailed(f"frame {self.pos} followed by frame {index}")
            self.pos, self.frame = index, frame
        if self.pos != target or self.frame is None:
            raise _SeekFailed(f"wanted frame {target}, decoded frame {self.pos}")
        return self.frame

    def is_last(self) -> bool:
        """True if the frame just taken ends the stream (confirms the frame count)."""
        return self._next() is None if self.frames is not None else False

    def find_end(self) -> int:
        """Number of frames, measured by decoding from the keyframe before the estimated end."""
        estimate = self.tl.n_frames
        self._seek(max(0, estimate - 1))
        while True:
            got = self._next()
            if got is None:
                break
            index, frame = got
            if index != self.pos + 1:
                raise _SeekFailed(f"frame {self.pos} followed by frame {index}")
            self.pos, self.frame = index, frame
        self.frames = None
        self.may_seek = True
        n = self.pos + 1
        self.pos = -1
        return n


def _read_by_seeking(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    tl: _Timeline,
    num_frames: int,
    count_known: bool,
    shaper: _Shaper,
    budget: _Budget,
) -> VideoClip | None:
    seeker = _Seeker(container, stream, tl, budget)
    try:
        n = tl.n_frames if count_known else seeker.find_end()
        clip = _ClipArray(frame_indices(n, num_frames).tolist())
        for i in clip.wanted():
            clip.put(i, shaper.av_frame(seeker.get(i)))
        if n - 1 in clip and not seeker.is_last():
            raise _SeekFailed("more frames than the container declares")
    except _SeekFailed:
        return None
    assert clip.array is not None
    return VideoClip(clip.array, n)


def _read_by_decoding(
    src: _Source, num_frames: int, declared: int, guess: int, shrink: Shrink | None, budget: _Budget
) -> VideoClip:
    """Decode every frame; pick by the count actually decoded."""
    kept = _ClipArray(frame_indices(guess, num_frames).tolist() if guess > 0 else [])
    every: list[np.ndarray] | None = []
    n = 0
    shaper = _Shaper(src.name, shrink, budget.limits.max_pixels)
    with _open_container(src) as container:
        decoder = _Decoder(container, _video_stream(container, src, budget.limits), budget)
        for frame in decoder.frames():
            rgb = shaper.av_frame(frame) if (n in kept or every is not None) else None
            if n in kept:
                kept.put(n, rgb)
            if every is not None:
                every.append(rgb)
                if len(every) * rgb.nbytes > _KEEP_ALL_BYTES:
                    every = None
            n += 1
    if n == 0:
        problem = "no decodable video frames" + (" (corrupt)" if decoder.errors else "")
        raise MediaError(src.name, problem)
    if declared > 0 and n < declared - max(1, int(declared * _COUNT_SLACK)):
        raise MediaError(src.name, f"truncated or corrupt: decoded only {n} of {declared} frames")
    indices = frame_indices(n, num_frames).tolist()
    if n == guess and kept.complete():
        return VideoClip(kept.array, n)  # type: ignore[arg-type]
    if every is not None:
        return VideoClip(np.stack([every[i] for i in indices]), n)  # (T, H, W, 3)
    # Too long to keep in memory and the count differs from the header: second pass by index.
    kept = _ClipArray(indices)
    with _open_container(src) as container:
        stream = _video_stream(container, src, budget.limits)
        for i, frame in enumerate(_Decoder(container, stream, budget).frames()):
            if i in kept:
                kept.put(i, shaper.av_frame(frame))
            if i >= indices[-1]:
                break
    if not kept.complete():
        raise MediaError(src.name, "truncated or corrupt: frames changed between two decodes")
    return VideoClip(kept.array, n)  # type: ignore[arg-type]


def _read_av_video(src: _Source, num_frames: int, shrink: Shrink | None, budget: _Budget) -> VideoClip:
    with _open_container(src) as container:
        stream = _video_stream(container, src, budget.limits)
        declared = max(0, stream.frames)
        tl = _timeline(container, stream)
        if tl is not None:
            shaper = _Shaper(src.name, shrink, budget.limits.max_pixels)
            clip = _read_by_seeking(
                container, stream, tl, num_frames, count_known=declared > 0, shaper=shaper, budget=budget
            )
            if clip is not None:
                return clip
    guess = declared or (tl.n_frames if tl else 0)
    return _read_by_decoding(src, num_frames, declared, guess, shrink, budget)


def read_video_clip(
    source: MediaSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> VideoClip:
    """Sample ``num_frames`` RGB frames the way the model was trained, and say which they were.

    Fewer distinct frames than ``num_frames`` repeat (linspace over n - 1 does that). Animated
    GIF / WebP / PNG count as videos; a still image does not. With ``shrink``, frames much larger
    than needed come back smaller (see `Shrink`); all frames have the size of the first.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    src = _as_source(source, name)
    budget = _Budget(src.name, limits or DecodeLimits(), cancelled)
    budget.check()
    kind = _sniff_image(src)
    if kind == "still":
        raise MediaError(src.name, "not a video: it is a still image")
    if kind == "animated":
        return _read_animated_image(src, num_frames, shrink, budget)
    return _read_av_video(src, num_frames, shrink, budget)


def read_video_frames(
    source: MediaSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> np.ndarray:
    """``read_video_clip``'s frames alone: uint8 array (T, H, W, 3)."""
    clip = read_video_clip(source, num_frames, name=name, shrink=shrink, limits=limits, cancelled=cancelled)
    return clip.frames


def is_video_file(source: MediaSource, *, name: str | None = None) -> bool:
    """True for content that decodes as a video (incl. animated images), judged by content.

    Raises MediaError only when nothing can be read (missing, not a regular file, empty).
    """
    src = _as_source(source, name)
    kind = _sniff_image(src)
    if kind is not None:
        return kind == "animated"
    try:
        with _open_container(src) as container:
            _video_stream(container, src)
    except MediaError:
        return False
    return True


def load_media(
    source: MediaSource,
    num_frames: int = 8,
    *,
    name: str | None = None,
    shrink: Shrink | None = None,
    limits: DecodeLimits | None = None,
    cancelled: Cancelled | None = None,
) -> Image.Image | np.ndarray:
    """An RGB PIL image for a still picture, else ``read_video_frames`` (T, H, W, 3) uint8."""
    src = _as_source(source, name)
    budget = _Budget(src.name, limits or DecodeLimits(), cancelled)
    budget.check()
    kind = _sniff_image(src)
    if kind == "still":
        return _load_image(src, shrink, budget.limits)
    if kind == "animated":
        return _read_animated_image(src, num_frames, shrink, budget).frames
    return _read_av_video(src, num_frames, shrink, budget).frames
