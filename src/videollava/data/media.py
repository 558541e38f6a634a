"""Decoding of images and videos into RGB pixels.

Every failure becomes a `MediaError` naming the file, so a bad upload or a broken dataset entry
reads as one line rather than a PyAV or PIL traceback.

Video frames are sampled like the reference: indices ``linspace(0, n - 1, T)`` rounded down, first
and last frame included, frame rate ignored. They are reached by seeking to the keyframe before
each wanted frame and decoding forward, which for long videos is many times faster than decoding
everything; any sign that timestamps do not map to frame indices (variable frame rate, wrong frame
count, broken index) falls back to decoding every frame, so the result is always the frames a full
decode would pick.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import av.error
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from videollava.errors import MediaError

MediaSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

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


# --------------------------------------------------------------------------------------------
# sources


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
            with open(self.path, "rb") as f:
                return f.read(n)
        assert self.data is not None
        self.data.seek(self.start)
        return self.data.read(n)


def _as_source(source: MediaSource, name: str | None) -> _Source:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(source)
        try:
            if not path.exists():
                raise MediaError(label, "file not found")
            if path.is_dir():
                raise MediaError(label, "is a directory, not a media file")
            if path.stat().st_size == 0:
                raise MediaError(label, "empty file (0 bytes)")
            with open(path, "rb"):
                pass
        except PermissionError:
            raise MediaError(label, "cannot read: permission denied") from None
        except OSError as e:
            raise MediaError(label, f"cannot read: {e.strerror or e}") from None
        return _Source(label, path=path)
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


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB whatever the mode, so pixels mean the same thing for every input.

    Transparency is composited on white (a transparent logo on black would turn into a black
    square); 16-bit and float images are scaled rather than clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
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


def load_image(source: MediaSource, *, name: str | None = None) -> Image.Image:
    """Read a still image as upright 8-bit RGB; animated images are refused (read them as videos)."""
    return _load_image(_as_source(source, name))


def _load_image(src: _Source) -> Image.Image:
    try:
        img = Image.open(src.open())
    except Image.DecompressionBombError as e:
        raise MediaError(src.name, f"image too large to decode safely ({e})") from None
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
        try:
            img.load()
            return to_rgb(_upright(img))
        except Image.DecompressionBombError as e:
            raise MediaError(src.name, f"image too large to decode safely ({e})") from None
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
            if _video_streams(container):
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


def _read_animated_image(src: _Source, num_frames: int) -> VideoClip:
    """Frames of an animated GIF / WebP / PNG, composited by PIL (disposal, transparency)."""
    try:
        with Image.open(src.open()) as img:
            n = _n_frames(img)
            indices = frame_indices(n, num_frames)
            picked: dict[int, np.ndarray] = {}
            for i in sorted(set(indices.tolist())):
                img.seek(i)
                picked[i] = np.asarray(to_rgb(img), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(src.name, f"truncated or corrupt animation ({e})") from None
    return VideoClip(np.stack([picked[i] for i in indices.tolist()]), n)  # (T, H, W, 3)


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


def _video_stream(container: av.container.InputContainer, src: _Source) -> av.video.stream.VideoStream:
    streams = _video_streams(container)
    if not streams:
        if container.streams.audio:
            raise MediaError(src.name, "no video stream (audio only)")
        raise MediaError(src.name, "no video stream")
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise MediaError(src.name, "not a video: it is a still image")
    stream = streams[0]
    stream.thread_type = "AUTO"
    return stream


@dataclass
class _Decoder:
    """Frames of one stream in presentation order, skipping packets the decoder rejects."""

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    errors: int = 0

    def frames(self) -> Iterator[av.VideoFrame]:
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except (av.error.FFmpegError, OSError):
                # Unreadable container data: drain what the decoder still holds and stop.
                self.errors += 1
                try:
                    yield from self.stream.codec_context.decode(None)
                except (av.error.FFmpegError, ValueError):
                    pass
                return
            try:
                decoded = packet.decode()
            except (av.error.FFmpegError, ValueError):
                self.errors += 1
                continue
            yield from decoded


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8


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
        self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, tl: _Timeline
    ):
        self.container = container
        self.stream = stream
        self.tl = tl
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
            self.frames = _Decoder(self.container, self.stream).frames()
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
) -> VideoClip | None:
    seeker = _Seeker(container, stream, tl)
    try:
        n = tl.n_frames if count_known else seeker.find_end()
        indices = frame_indices(n, num_frames)
        picked: dict[int, np.ndarray] = {}
        for i in sorted(set(indices.tolist())):
            picked[i] = _rgb(seeker.get(i))
        if n - 1 in picked and not seeker.is_last():
            raise _SeekFailed("more frames than the container declares")
    except _SeekFailed:
        return None
    return VideoClip(np.stack([picked[i] for i in indices.tolist()]), n)  # (T, H, W, 3)


def _read_by_decoding(src: _Source, num_frames: int, declared: int, guess: int) -> VideoClip:
    """Decode every frame; pick by the count actually decoded."""
    wanted = set(frame_indices(guess, num_frames).tolist()) if guess > 0 else set()
    kept: dict[int, np.ndarray] = {}
    every: list[np.ndarray] | None = []
    n = 0
    with _open_container(src) as container:
        decoder = _Decoder(container, _video_stream(container, src))
        for frame in decoder.frames():
            rgb = _rgb(frame) if (n in wanted or every is not None) else None
            if n in wanted:
                kept[n] = rgb
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
    if n == guess:
        return VideoClip(np.stack([kept[i] for i in indices]), n)  # (T, H, W, 3)
    if every is not None:
        return VideoClip(np.stack([every[i] for i in indices]), n)
    # Too long to keep in memory and the count differs from the header: second pass by index.
    wanted = set(indices)
    kept = {}
    with _open_container(src) as container:
        for i, frame in enumerate(_Decoder(container, _video_stream(container, src)).frames()):
            if i in wanted:
                kept[i] = _rgb(frame)
            if i >= indices[-1]:
                break
    if len(kept) != len(wanted):
        raise MediaError(src.name, "truncated or corrupt: frames changed between two decodes")
    return VideoClip(np.stack([kept[i] for i in indices]), n)


def _read_av_video(src: _Source, num_frames: int) -> VideoClip:
    with _open_container(src) as container:
        stream = _video_stream(container, src)
        declared = max(0, stream.frames)
        tl = _timeline(container, stream)
        if tl is not None:
            frames = _read_by_seeking(container, stream, tl, num_frames, count_known=declared > 0)
            if frames is not None:
                return frames
    return _read_by_decoding(src, num_frames, declared, declared or (tl.n_frames if tl else 0))


def read_video_clip(source: MediaSource, num_frames: int = 8, *, name: str | None = None) -> VideoClip:
    """Sample ``num_frames`` RGB frames the way the model was trained, and say which they were.

    Fewer distinct frames than ``num_frames`` repeat (linspace over n - 1 does that). Animated
    GIF / WebP / PNG count as videos; a still image does not.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    src = _as_source(source, name)
    kind = _sniff_image(src)
    if kind == "still":
        raise MediaError(src.name, "not a video: it is a still image")
    if kind == "animated":
        return _read_animated_image(src, num_frames)
    return _read_av_video(src, num_frames)


def read_video_frames(source: MediaSource, num_frames: int = 8, *, name: str | None = None) -> np.ndarray:
    """``read_video_clip``'s frames alone: uint8 array (T, H, W, 3)."""
    return read_video_clip(source, num_frames, name=name).frames


def is_video_file(source: MediaSource, *, name: str | None = None) -> bool:
    """True for content that decodes as a video (incl. animated images), judged by content.

    Raises MediaError only when nothing can be read (missing, directory, empty).
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
    source: MediaSource, num_frames: int = 8, *, name: str | None = None
) -> Image.Image | np.ndarray:
    """An RGB PIL image for a still picture, else ``read_video_frames`` (T, H, W, 3) uint8."""
    src = _as_source(source, name)
    kind = _sniff_image(src)
    if kind == "still":
        return _load_image(src)
    if kind == "animated":
        return _read_animated_image(src, num_frames).frames
    return _read_av_video(src, num_frames).frames
