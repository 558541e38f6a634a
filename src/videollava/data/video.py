"""Videos in PyAV containers: sampled frames reached by seeking, or by a full decode when seeking is unsafe.

Each wanted frame is reached by seeking to the keyframe before it and decoding forward, which for
long videos is many times faster than decoding everything; any sign that timestamps do not map to
frame indices (variable frame rate, wrong frame count, broken index) falls back to decoding every
frame, so the result is always the frames a full decode would pick. All frames of one clip come out
at one size, even when the stream changes resolution part way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.error
import numpy as np

from videollava.data.decode_limits import DecodeBudget, DecodeLimits, check_pixels
from videollava.data.frame_sampling import FrameShaper, SampledFrames, VideoClip, frame_indices
from videollava.data.images import Shrink
from videollava.data.media_kind import has_container_signature, is_picture_demuxer, video_streams
from videollava.data.media_source import RewindableSource
from videollava.errors import MediaError

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


def open_container(src: RewindableSource) -> av.container.InputContainer:
    """The file as a PyAV container; a refusal says whether it is a damaged video or no media at all."""
    try:
        return av.open(src.open(), mode="r", metadata_errors="ignore")
    except PermissionError:
        raise MediaError(src.name, "cannot read: permission denied") from None
    except (av.error.FFmpegError, OSError, ValueError):
        if has_container_signature(src):
            raise MediaError(
                src.name, "truncated or corrupt video (the container cannot be parsed)"
            ) from None
        raise MediaError(src.name, "not a media file (unrecognised format)") from None


def video_stream(
    container: av.container.InputContainer, src: RewindableSource, limits: DecodeLimits | None = None
) -> av.video.stream.VideoStream:
    """The stream to decode; with `limits`, its frame size is checked and enforced by the decoder."""
    streams = video_streams(container)
    if not streams:
        if container.streams.audio:
            raise MediaError(src.name, "no video stream (audio only)")
        raise MediaError(src.name, "no video stream")
    if is_picture_demuxer(container):
        raise MediaError(src.name, "not a video: it is a still image")
    stream = streams[0]
    pixels = stream.codec_context.width * stream.codec_context.height
    if limits is not None:
        width, height = stream.codec_context.width, stream.codec_context.height
        check_pixels(src.name, width, height, limits.max_pixels, "video frames")
        # The decoder itself refuses larger frames, should the size change part way.
        stream.codec_context.options = {"max_pixels": str(limits.max_pixels)}
    stream.thread_type = "AUTO" if pixels <= _FRAME_THREADS_MAX_PIXELS else "SLICE"
    return stream


@dataclass
class _Decoder:
    """Frames of one stream in presentation order, skipping packets the decoder rejects."""

    container: av.container.InputContainer
    stream: av.video.stream.VideoStream
    budget: DecodeBudget
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
        budget: DecodeBudget,
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
    shaper: FrameShaper,
    budget: DecodeBudget,
) -> VideoClip | None:
    seeker = _Seeker(container, stream, tl, budget)
    try:
        n = tl.n_frames if count_known else seeker.find_end()
        clip = SampledFrames(frame_indices(n, num_frames).tolist())
        for i in clip.wanted():
            clip.put(i, shaper.av_frame(seeker.get(i)))
        if n - 1 in clip and not seeker.is_last():
            raise _SeekFailed("more frames than the container declares")
    except _SeekFailed:
        return None
    assert clip.array is not None
    return VideoClip(clip.array, n)


def _read_by_decoding(
    src: RewindableSource,
    num_frames: int,
    declared: int,
    guess: int,
    shrink: Shrink | None,
    budget: DecodeBudget,
) -> VideoClip:
    """Decode every frame; pick by the count actually decoded."""
    kept = SampledFrames(frame_indices(guess, num_frames).tolist() if guess > 0 else [])
    every: list[np.ndarray] | None = []
    n = 0
    shaper = FrameShaper(src.name, shrink, budget.limits.max_pixels)
    with open_container(src) as container:
        decoder = _Decoder(container, video_stream(container, src, budget.limits), budget)
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
    kept = SampledFrames(indices)
    with open_container(src) as container:
        stream = video_stream(container, src, budget.limits)
        for i, frame in enumerate(_Decoder(container, stream, budget).frames()):
            if i in kept:
                kept.put(i, shaper.av_frame(frame))
            if i >= indices[-1]:
                break
    if not kept.complete():
        raise MediaError(src.name, "truncated or corrupt: frames changed between two decodes")
    return VideoClip(kept.array, n)  # type: ignore[arg-type]


def read_container_video(
    src: RewindableSource, num_frames: int, shrink: Shrink | None, budget: DecodeBudget
) -> VideoClip:
    """``num_frames`` sampled frames of a video file: by seeking when timestamps allow, else by decoding all."""
    with open_container(src) as container:
        stream = video_stream(container, src, budget.limits)
        declared = max(0, stream.frames)
        tl = _timeline(container, stream)
        if tl is not None:
            shaper = FrameShaper(src.name, shrink, budget.limits.max_pixels)
            clip = _read_by_seeking(
                container, stream, tl, num_frames, count_known=declared > 0, shaper=shaper, budget=budget
            )
            if clip is not None:
                return clip
    guess = declared or (tl.n_frames if tl else 0)
    return _read_by_decoding(src, num_frames, declared, guess, shrink, budget)
